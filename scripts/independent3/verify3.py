"""Standalone check of the saved breaks: a freshly loaded model, a plain no-grad forward.

Usage: python verify3.py --report dqa-report --out audit3-out relu-pgd fixed2-pgd dqa2-pgd
Writes audit3-out/summary.json and prints a table.
"""
import argparse
import json
import os

import numpy as np
import torch

from dqa_ext.robust.checkpoint import load_model
from dqa_ext.robust.data import load_mnist5k

EPS = 0.3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--report", default=os.environ.get("DQA_REPORT", "dqa-report"))
    ap.add_argument("--out", default="audit3-out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = json.load(open(os.path.join(args.report, "results.json")))
    d = load_mnist5k()
    X, Y = d.x_test[:200].float(), d.y_test[:200].long()
    summary = {}
    for name in args.models:
        robust = [m for m in results["models"] if m["name"] == name][0]["eval"]["worst_case"]["robust"]
        claimed = {i for i, r in enumerate(robust) if int(r) == 1}
        f = os.path.join(args.out, f"{name}.npz")
        rec = {"claimed_robust": len(claimed), "broken": [], "rejected": []}
        if os.path.exists(f):
            a = np.load(f)
            idx = torch.from_numpy(a["indices"]).long()
            xadv = torch.from_numpy(a["x_adv"]).float()
            model = load_model(os.path.join(args.report, "models", f"{name}.pt"))
            with torch.no_grad():
                z = model(xadv)
            for k, i in enumerate(idx.tolist()):
                y = int(Y[i])
                zk = z[k]
                other = torch.cat([zk[:y], zk[y + 1:]]).max()
                linf = float((xadv[k].double() - X[i].double()).abs().max())
                inbox = bool(((xadv[k] >= 0) & (xadv[k] <= 1)).all())
                pred = int(zk.argmax())
                ok = pred != y and linf <= EPS + 1e-6 and inbox and i in claimed
                (rec["broken"] if ok else rec["rejected"]).append(
                    {"index": i, "label": y, "pred": pred, "margin": float(zk[y] - other), "linf": linf,
                     "in_box": inbox, "claimed": i in claimed})
        nb = len(rec["broken"])
        rec["n_broken"] = nb
        rec["upper_bound_robust_acc_pct"] = 100.0 * (len(claimed) - nb) / 200
        rec["claimed_robust_acc_pct"] = 100.0 * len(claimed) / 200
        summary[name] = rec
        print(f"{name}: claimed {len(claimed)} ({rec['claimed_robust_acc_pct']:.1f}%), verified breaks {nb}, "
              f"rejected {len(rec['rejected'])}, upper bound {rec['upper_bound_robust_acc_pct']:.1f}%")
        print("  broken:", [(b["index"], round(b["margin"], 4)) for b in rec["broken"]])
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
