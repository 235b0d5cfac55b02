"""Re-verify saved breaks on freshly loaded, unmodified models: python verify.py [MODEL ...]"""
import os
import json, sys
import numpy as np, torch
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.train import load_model
torch.set_num_threads(1)
d = load_mnist5k(); x, y = d.x_test[:200], d.y_test[:200]
r = json.load(open(os.path.join(os.environ.get("DQA_AUDIT_REPORT", "dqa-report"), "results.json")))
rob = {e["name"]: e["eval"]["worst_case"]["robust"] for e in r["models"]}
for name in sys.argv[1:] or ["relu-pgd", "fixed2-pgd", "dqa2-pgd"]:
    z = np.load(os.path.join(os.environ.get("DQA_AUDIT_OUT", "audit-out"), f"{name}.npz"))
    m = load_model(os.path.join(os.environ.get("DQA_AUDIT_REPORT", "dqa-report"), "models", f"{name}.pt")).eval()
    ok = []
    for i, xa in zip(z["indices"], z["x_adv"]):
        xa = torch.from_numpy(xa)[None]
        with torch.no_grad():
            lg = m(xa)
        pred = int(lg.argmax(1))
        dist = float((xa - x[i:i + 1]).abs().max())
        good = pred != int(y[i]) and dist <= 0.3 + 1e-6 and float(xa.min()) >= 0 and float(xa.max()) <= 1 and rob[name][i] == 1
        srt = lg[0].sort(descending=True).values
        print(f"{name} idx {i}: label {int(y[i])} pred {pred} linf {dist:.7f} range [{float(xa.min()):.3f},{float(xa.max()):.3f}] "
              f"claimed_robust {rob[name][i]} logit gap {float(lg[0, pred] - lg[0, int(y[i])]):.4f} -> {'VERIFIED' if good else 'FAIL'}")
        ok.append(good)
    c = sum(rob[name])
    print(f"{name}: claimed robust {c}/200 = {c/200:.3f}; verified breaks {sum(ok)}; corrected {(c-sum(ok))/200:.3f}")
