"""Round 2 of the third audit: (a) deepen each saved break (push its exact logit margin further below 0,
so that it does not hinge on float rounding), (b) a focused attack on the claimed-robust images that
attack3.py came closest to breaking (lowest exact margins), then merge into NAME.npz / NAME.json.

Usage: python refine3.py --model relu-pgd --report dqa-report --out audit3-out --budget 150 [--focus 12]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attack3 as A  # noqa: E402
from dqa_ext.robust.checkpoint import load_model  # noqa: E402
from dqa_ext.robust.data import load_mnist5k  # noqa: E402


def deepen(model, sur, quants, mode, x0, y, xs, steps=150, a0=0.03, a1=0.001):
    """Minimise the exact margin starting from break points xs; keeps the lowest exact margin seen."""
    with torch.no_grad():
        best_m = A.margin_of(model(xs), y)
    best_x = xs.clone()
    x = xs.clone()
    mom = torch.zeros_like(x)
    for t in range(steps):
        if quants:
            A.set_mode(quants, mode, 0.0)
        x.requires_grad_(True)
        l = A.margin_of(sur(x), y)
        g, = torch.autograd.grad(l.sum(), x)
        with torch.no_grad():
            g = g / (g.abs().flatten(1).mean(1).view(-1, 1, 1, 1) + 1e-12)
            mom = 0.75 * mom + g
            x = A.project(x.detach() - A.cosine(a0, a1, t, steps) * torch.sign(mom), x0)
            m = A.margin_of(model(x), y)
            b = m < best_m
            best_m[b], best_x[b] = m[b], x[b]
    return best_x, best_m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--report", default=os.environ.get("DQA_REPORT", "dqa-report"))
    ap.add_argument("--out", default="audit3-out")
    ap.add_argument("--budget", type=float, default=150.0)
    ap.add_argument("--focus", type=int, default=12)
    ap.add_argument("--seed", type=int, default=54321)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    T0 = time.time()
    end = T0 + args.budget
    path = os.path.join(args.report, "models", f"{args.model}.pt")
    log_path = os.path.join(args.out, f"{args.model}.json")
    log = json.load(open(log_path))
    d = load_mnist5k()
    X, Y = d.x_test[:200].float(), d.y_test[:200].long()
    model = load_model(path)
    for p in model.parameters():
        p.requires_grad_(False)
    sur, quants = A.build_surrogate(path)
    modes = ["gauss", "ste_id", "tanh", "ste_wide", "pwl", "clip", "mcnoise"] if quants else ["exact"]
    r2 = {"budget_s": args.budget, "seed": args.seed, "phases": []}

    # (a) deepen the saved breaks
    t = time.time()
    npz = np.load(os.path.join(args.out, f"{args.model}.npz"))
    old_idx = torch.from_numpy(npz["indices"]).long()
    old_x = torch.from_numpy(npz["x_adv"]).float()
    deep = {}
    if len(old_idx):
        x0, y = X[old_idx], Y[old_idx]
        with torch.no_grad():
            m_before = A.margin_of(model(old_x), y)
        bx, bm = old_x.clone(), m_before.clone()
        for mode in modes[:2]:
            nx, nm = deepen(model, sur, quants, mode, x0, y, bx)
            b = nm < bm
            bx[b], bm[b] = nx[b], nm[b]
        for i, mb, ma in zip(old_idx.tolist(), m_before.tolist(), bm.tolist()):
            deep[i] = (mb, ma)
        old_x = bx
    r2["phases"].append({"phase": "R2a-deepen", "seconds": round(time.time() - t, 1),
                         "margins_before_after": deep})

    # (b) focused attack on the near misses
    t = time.time()
    near = sorted(log.get("best_exact_margin_unbroken", {}).items(), key=lambda kv: kv[1])[:args.focus]
    fidx = torch.tensor([int(k) for k, _ in near], dtype=torch.long)
    found = {}
    if len(fidx):
        st = A.State(model, X[fidx], Y[fidx], fidx)
        k = j = 0
        rows_all = torch.arange(len(fidx))
        while time.time() < end - 5 and len(st.active()):
            dl = min(end - 5, time.time() + 20)
            if k % 3 == 2:  # Square attack from the best point (small batch: many iterations)
                A.square(st, st.active(), dl, 3000, phase=f"R2b-square#{k}", gen=gen, p_init=0.3)
            else:
                mode = modes[j % len(modes)]
                loss = ("cw", "cwce", "ce")[j % 3]
                init = ("best", "sign", "rand", "best")[j % 4]
                j += 1
                A.pgd(st, sur, quants, mode, rows_all, 200, loss=loss, init=init, deadline=dl,
                      phase=f"R2b-pgd#{k}:{mode}/{loss}/{init}", gen=gen, a0=0.05 if init == "best" else 0.1)
            k += 1
        for r in st.broken.nonzero().reshape(-1).tolist():
            found[int(fidx[r])] = (st.xadv[r].clone(), st.found_by[r])
        r2["focus_indices"] = fidx.tolist()
        r2["focus_best_margin_after"] = {int(fidx[i]): float(st.best_m[i]) for i in st.active().tolist()}
        r2["focus_rounds"] = k
    r2["phases"].append({"phase": "R2b-focus", "seconds": round(time.time() - t, 1),
                         "new_indices": sorted(found), "found_by": {i: v[1] for i, v in found.items()}})

    # merge, verify on a fresh model, save
    idx_list = old_idx.tolist() + list(found)
    xs = [old_x[i] for i in range(len(old_idx))] + [v[0] for v in found.values()]
    if idx_list:
        I = torch.tensor(idx_list, dtype=torch.long)
        XA = torch.stack(xs)
        ok, pred, marg, linf = A.verify(path, I, XA, X[I], Y[I])
        I, XA = I[ok], XA[ok]
        r2["verified"] = [{"index": int(i), "label": int(Y[i]), "pred": int(p), "margin": float(m), "linf": float(l)}
                          for i, p, m, l, o in zip(idx_list, pred.tolist(), marg.tolist(), linf.tolist(), ok.tolist())
                          if o]
    else:
        I, XA = torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 28, 28)
        r2["verified"] = []
    np.savez(os.path.join(args.out, f"{args.model}.npz"), indices=I.numpy().astype(np.int64),
             x_adv=XA.numpy().astype(np.float32), labels=Y[I].numpy().astype(np.int64))
    r2["total_s"] = round(time.time() - T0, 1)
    log["round2"] = r2
    with open(log_path, "w") as f:
        json.dump(log, f, indent=1)
    print(json.dumps({k: v for k, v in r2.items() if k != "verified"}, default=str)[:3000])
    print(f"{args.model}: verified breaks after round 2: {len(I)} -> {sorted(I.tolist())}")


if __name__ == "__main__":
    main()
