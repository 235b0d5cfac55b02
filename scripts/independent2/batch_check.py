"""Check that each saved break stays misclassified when evaluated inside a batch (200 images), 1 and 2 threads."""
import os
import numpy as np, torch
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.train import load_model
d = load_mnist5k(); x = d.x_test[:200].clone(); y = d.y_test[:200]
for th in (1, 2):
    torch.set_num_threads(th)
    for name in ["relu-pgd", "fixed2-pgd", "dqa2-pgd"]:
        z = np.load(os.path.join(os.environ.get("DQA_AUDIT_OUT", "audit-out"), f"{name}.npz")); m = load_model(os.path.join(os.environ.get("DQA_AUDIT_REPORT", "dqa-report"), "models", f"{name}.pt")).eval()
        xb = x.clone(); xb[z["indices"]] = torch.from_numpy(z["x_adv"])
        with torch.no_grad():
            p = m(xb).argmax(1)
        print(th, name, {int(i): (int(p[i]), int(y[i])) for i in z["indices"]}, all(int(p[i]) != int(y[i]) for i in z["indices"]))
