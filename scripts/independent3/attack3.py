"""Independent audit attack (third audit) against the images a dqa report claims robust.

Written from scratch; it uses only dqa_ext.robust.checkpoint.load_model, dqa_ext.robust.data.load_mnist5k
and the public attributes of dqa_ext.DQAReLU (effective_step, qmax, channel_dim).

Phases (each time-boxed, results verified and saved after every phase):
  P0 clean      claimed-robust images that the exact model misclassifies without any perturbation
  P1 transfer   (quantized targets) PGD on the float relu-pgd model, every iterate checked on the target
  P2 surrogates BPDA / surrogate-forward PGD with many quantizer surrogates (see Quant), CW margin loss,
                momentum sign steps, every iterate checked on the exact model
  P3 targeted   targeted margin attacks toward each wrong class, from the best point so far,
                cycling over the surrogates that worked best
  P4 square     gradient-free Square attack (Andriushchenko et al. 2020) on the exact model, from the
                best point so far
  P5 restarts   more random restarts cycling over surrogates / losses until the budget is spent

Usage: python attack3.py --model fixed2-pgd --report dqa-report --out audit3-out --budget 470
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dqa_ext import DQAReLU
from dqa_ext.robust.checkpoint import load_model
from dqa_ext.robust.data import load_mnist5k

EPS = 0.3
N_IMAGES = 200


# ----------------------------------------------------------------------------------------------
# quantizer surrogates
# ----------------------------------------------------------------------------------------------

class Quant(nn.Module):
    """Replaces one DQAReLU. Exact forward: clamp(round_half_even(x/s), 0, qmax) * s.

    modes (forward / backward):
      exact     exact / zero a.e.
      ste_id    exact / identity                      (BPDA with the identity)
      ste_wide  exact / 1 on -0.5s < x < (qmax+0.5)s   (STE with a wider clip than the op's own)
      ste_relu  exact / 1 on x > 0                    (STE of a plain ReLU, no upper clip)
      clip      clamp(x, 0, qmax*s) both ways         (float clipped-ReLU network)
      relu      relu(x) both ways                     (float ReLU network)
      tanh      DSQ-style tanh soft rounding, sharpness k (annealed), then clamp
      pwl       piecewise-linear soft staircase, ramp width w (annealed; w=1 is the identity)
      gauss     E[q(v + sigma*eps)], eps ~ N(0,1): the exact expectation of the staircase under
                Gaussian noise before the quantizer (sum of normal CDFs), sigma annealed
      mcnoise   exact quantizer applied to v + sigma*eps (a fresh noise draw per forward) with an
                identity backward: expectation over noise by sampling
    """

    def __init__(self, m: DQAReLU):
        super().__init__()
        self.register_buffer("s", m.effective_step.detach().float().clone())
        self.qmax = float(m.qmax)
        self.cd = int(m.channel_dim)
        self.mode = "exact"
        self.k = 4.0
        self.w = 0.5
        self.sigma = 0.3

    def sv(self, x):
        shape = [1] * x.dim()
        if self.s.numel() > 1:
            shape[self.cd % x.dim()] = -1
        return self.s.view(shape)

    def forward(self, x):
        s = self.sv(x)
        qm = self.qmax
        m = self.mode
        q = torch.clamp(torch.round(x / s), 0.0, qm) * s
        if m == "exact":
            return q
        if m == "ste_id":
            return q.detach() + (x - x.detach())
        if m == "ste_wide":
            c = torch.clamp(x, -0.5 * s, (qm + 0.5) * s)
            return q.detach() + (c - c.detach())
        if m == "ste_relu":
            c = F.relu(x)
            return q.detach() + (c - c.detach())
        if m == "clip":
            return torch.minimum(F.relu(x), qm * s)
        if m == "relu":
            return F.relu(x)
        v = x / s
        if m == "tanh":
            fl = torch.floor(v).detach()
            r = v - fl - 0.5
            t = fl + 0.5 + 0.5 * torch.tanh(self.k * r) / math.tanh(self.k / 2)
            return torch.clamp(t, 0.0, qm) * s
        if m == "pwl":
            fl = torch.floor(v).detach()
            r = v - fl - 0.5
            t = fl + torch.clamp(r / self.w + 0.5, 0.0, 1.0)
            return torch.clamp(t, 0.0, qm) * s
        if m == "gauss":
            out = 0.0
            for j in range(1, int(qm) + 1):
                out = out + 0.5 * (1 + torch.erf((v - (j - 0.5)) / (self.sigma * math.sqrt(2))))
            return out * s
        if m == "mcnoise":
            vn = v + self.sigma * torch.randn_like(v)
            qn = torch.clamp(torch.round(vn), 0.0, qm) * s
            return qn.detach() + (x - x.detach())
        raise ValueError(m)


def build_surrogate(path):
    sur = load_model(path)
    quants = []

    def rec(mod):
        for name, ch in mod.named_children():
            if isinstance(ch, DQAReLU):
                q = Quant(ch)
                setattr(mod, name, q)
                quants.append(q)
            else:
                rec(ch)

    rec(sur)
    sur.eval()
    for p in sur.parameters():
        p.requires_grad_(False)
    return sur, quants


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def margin_of(z, y):
    """z_y - max_{j != y} z_j (negative: misclassified)."""
    zy = z.gather(1, y[:, None])[:, 0]
    zo = z.clone()
    zo.scatter_(1, y[:, None], -float("inf"))
    return zy - zo.max(1).values


def project(x, x0):
    return torch.clamp(torch.min(torch.max(x, x0 - EPS), x0 + EPS), 0.0, 1.0)


class State:
    """Per-image bookkeeping over the claimed-robust set."""

    def __init__(self, model, x, y, idx):
        self.model = model
        self.x = x          # clean images of the claimed-robust set
        self.y = y
        self.idx = idx      # their test indices
        n = len(idx)
        self.broken = torch.zeros(n, dtype=torch.bool)
        self.xadv = x.clone()
        self.best_x = x.clone()
        with torch.no_grad():
            self.best_m = margin_of(model(x), y)
        self.found_by = [None] * n
        self.t0 = time.time()

    def active(self):
        return (~self.broken).nonzero().reshape(-1)

    @torch.no_grad()
    def check(self, rows, xc, phase, z=None):
        """Exact-model check of candidate points xc for the given rows (indices into the set).
        Returns a bool mask (per candidate row): misclassified by the exact model."""
        if z is None:
            z = self.model(xc)
        m = margin_of(z, self.y[rows])
        pred_wrong = z.argmax(1) != self.y[rows]
        better = m < self.best_m[rows]
        if better.any():
            r = rows[better]
            self.best_m[r] = m[better]
            self.best_x[r] = xc[better]
        new = pred_wrong & ~self.broken[rows]
        if new.any():
            r = rows[new]
            self.broken[r] = True
            self.xadv[r] = xc[new]
            for i in r.tolist():
                self.found_by[i] = phase
        return pred_wrong


def cosine(a0, a1, t, T):
    return a1 + 0.5 * (a0 - a1) * (1 + math.cos(math.pi * min(t, T) / max(T, 1)))


# ----------------------------------------------------------------------------------------------
# gradient attack (momentum sign PGD on a surrogate, exact check every iterate)
# ----------------------------------------------------------------------------------------------

def set_mode(quants, mode, frac=0.0):
    for q in quants:
        q.mode = mode
        if mode == "tanh":   # sharpness 2 -> 40 (geometric)
            q.k = 2.0 * (20.0 ** frac)
        elif mode == "pwl":  # ramp width 1 (identity) -> 0.05
            q.w = 1.0 * (0.05 ** frac)
        elif mode == "gauss":  # noise std 0.6 -> 0.05 (in units of the step)
            q.sigma = 0.6 * ((0.05 / 0.6) ** frac)
        elif mode == "mcnoise":
            q.sigma = 0.5 * (1 - frac) + 0.05


def pgd(st, sur, quants, mode, rows, steps, loss="cw", init="sign", target=None, deadline=None,
        a0=0.1, a1=0.004, mu=0.75, phase="", gen=None, anneal=True, model_fn=None):
    """Minimises a margin on the surrogate for the given rows; returns number of new breaks."""
    rows = rows[~st.broken[rows]]
    if len(rows) == 0:
        return 0
    x0 = st.x[rows]
    y = st.y[rows]
    tgt = target[rows] if target is not None else None
    if init == "clean":
        x = x0.clone()
    elif init == "rand":
        x = project(x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * EPS, x0)
    elif init == "sign":
        x = project(x0 + torch.sign(torch.rand(x0.shape, generator=gen) - 0.5) * EPS, x0)
    elif init == "best":
        x = project(st.best_x[rows] + (torch.rand(x0.shape, generator=gen) * 2 - 1) * EPS * 0.15, x0)
    else:
        raise ValueError(init)
    mom = torch.zeros_like(x)
    new_total = 0
    fwd = model_fn if model_fn is not None else sur
    for t in range(steps):
        if deadline is not None and time.time() > deadline:
            break
        if quants:
            set_mode(quants, mode, t / max(steps - 1, 1) if anneal else 0.0)
        x.requires_grad_(True)
        z = fwd(x)
        if loss == "cw":
            l = margin_of(z, y)
        elif loss == "ce":
            l = -F.cross_entropy(z, y, reduction="none")
        elif loss == "tgt":
            l = z.gather(1, y[:, None])[:, 0] - z.gather(1, tgt[:, None])[:, 0]
        elif loss == "cwce":  # CW margin on log-softmax (scale free)
            l = margin_of(F.log_softmax(z, 1), y)
        else:
            raise ValueError(loss)
        g, = torch.autograd.grad(l.sum(), x)
        with torch.no_grad():
            g = g / (g.abs().flatten(1).mean(1).view(-1, 1, 1, 1) + 1e-12)
            mom = mu * mom + g
            alpha = cosine(a0, a1, t, steps)
            step = torch.sign(mom)
            # rows whose gradient is exactly zero: random sign step (escape flat regions)
            dead = (g.flatten(1).abs().sum(1) == 0)
            if dead.any():
                step[dead] = torch.sign(torch.rand(step[dead].shape, generator=gen) - 0.5)
            x = project(x.detach() - alpha * step, x0)
            wrong = st.check(rows, x, phase)
            new_total += int(wrong.sum())
            keep = ~wrong
            if not keep.all():
                rows, x, x0, y, mom = rows[keep], x[keep], x0[keep], y[keep], mom[keep]
                if tgt is not None:
                    tgt = tgt[keep]
                if len(rows) == 0:
                    break
    return new_total


# ----------------------------------------------------------------------------------------------
# Square attack (L-inf) on the exact model
# ----------------------------------------------------------------------------------------------

def p_selection(p_init, it, n_iters):
    it = int(it / n_iters * 10000)
    for th, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                    (8000, 256)):
        if it <= th:
            return p_init / div
    return p_init / 512


@torch.no_grad()
def square(st, rows, deadline, n_iters_est, phase="P4-square", gen=None, p_init=0.8, start="best"):
    rows = rows[~st.broken[rows]]
    if len(rows) == 0:
        return 0
    x0 = st.x[rows]
    y = st.y[rows]
    c, h, w = x0.shape[1:]
    if start == "best":
        x = st.best_x[rows].clone()
    else:  # vertical stripes, as in the paper
        x = project(x0 + EPS * torch.sign(torch.rand(x0.shape[0], c, 1, w, generator=gen) - 0.5), x0)
    z = st.model(x)
    m = margin_of(z, y)
    new_total = 0
    it = 0
    while time.time() < deadline and len(rows) > 0:
        p = p_selection(p_init, it, n_iters_est)
        s = max(int(round(math.sqrt(p * h * w))), 1)
        s = min(s, h - 1)
        n = len(rows)
        xn = x.clone()
        hs = torch.randint(0, h - s + 1, (n,), generator=gen)
        ws = torch.randint(0, w - s + 1, (n,), generator=gen)
        signs = torch.sign(torch.rand(n, c, generator=gen) - 0.5)
        for i in range(n):
            a, b = int(hs[i]), int(ws[i])
            xn[i, :, a:a + s, b:b + s] = x0[i, :, a:a + s, b:b + s] + EPS * signs[i].view(c, 1, 1)
        xn = project(xn, x0)
        zn = st.model(xn)
        mn = margin_of(zn, y)
        acc = mn <= m
        x[acc] = xn[acc]
        m[acc] = mn[acc]
        wrong = st.check(rows, xn, phase, z=zn) & acc
        new_total += int(wrong.sum())
        keep = ~(st.broken[rows])
        if not keep.all():
            rows, x, x0, y, m = rows[keep], x[keep], x0[keep], y[keep], m[keep]
        it += 1
    return new_total, it


# ----------------------------------------------------------------------------------------------
# verification on a freshly loaded model, saving
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def verify(path, idx, xadv, xclean, y):
    fresh = load_model(path)
    z = fresh(xadv)
    pred = z.argmax(1)
    linf = (xadv.double() - xclean.double()).abs().flatten(1).max(1).values
    inb = ((xadv >= 0) & (xadv <= 1)).flatten(1).all(1)
    ok = (pred != y) & (linf <= EPS + 1e-6) & inb
    marg = margin_of(z, y)
    return ok, pred, marg, linf


def save(st, path, name, out, log):
    rows = st.broken.nonzero().reshape(-1)
    res = {"verified": [], "rejected": []}
    if len(rows):
        ok, pred, marg, linf = verify(path, st.idx[rows], st.xadv[rows], st.x[rows], st.y[rows])
        good = rows[ok]
        for r, o, p, mg, lf in zip(rows.tolist(), ok.tolist(), pred.tolist(), marg.tolist(), linf.tolist()):
            rec = {"index": int(st.idx[r]), "label": int(st.y[r]), "pred": p, "margin_y_minus_max_other": mg,
                   "linf": lf, "found_by": st.found_by[r]}
            (res["verified"] if o else res["rejected"]).append(rec)
    else:
        good = rows
    tmp = os.path.join(out, f".{name}.tmp.npz")
    np.savez(tmp, indices=st.idx[good].numpy().astype(np.int64), x_adv=st.xadv[good].numpy().astype(np.float32),
             labels=st.y[good].numpy().astype(np.int64))
    os.replace(tmp, os.path.join(out, f"{name}.npz"))
    log["breaks"] = res
    log["n_broken_verified"] = len(res["verified"])
    log["elapsed_s"] = time.time() - st.t0
    tmp = os.path.join(out, f".{name}.tmp.json")
    with open(tmp, "w") as f:
        json.dump(log, f, indent=1)
    os.replace(tmp, os.path.join(out, f"{name}.json"))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--report", default=os.environ.get("DQA_REPORT", "dqa-report"))
    ap.add_argument("--out", default="audit3-out")
    ap.add_argument("--budget", type=float, default=470.0)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    T0 = time.time()
    end = T0 + args.budget

    results = json.load(open(os.path.join(args.report, "results.json")))
    entry = [m for m in results["models"] if m["name"] == args.model]
    assert len(entry) == 1, f"model {args.model} not in report"
    robust = entry[0]["eval"]["worst_case"]["robust"]
    assert len(robust) == N_IMAGES
    claimed = [i for i, r in enumerate(robust) if int(r) == 1]
    path = os.path.join(args.report, "models", f"{args.model}.pt")

    d = load_mnist5k()
    X = d.x_test[:N_IMAGES].float()
    Y = d.y_test[:N_IMAGES].long()
    idx = torch.tensor(claimed, dtype=torch.long)
    model = load_model(path)
    for p in model.parameters():
        p.requires_grad_(False)
    sur, quants = build_surrogate(path)
    quantized = len(quants) > 0
    log = {"model": args.model, "report": args.report, "claimed_robust": len(claimed),
           "claimed_indices": claimed, "budget_s": args.budget, "seed": args.seed,
           "n_quantizers": len(quants), "phases": []}

    # sanity: my exact quantizer reproduces the model
    with torch.no_grad():
        set_mode(quants, "exact")
        za = model(X)
        zb = sur(X)
        log["exact_surrogate_max_abs_logit_diff"] = float((za - zb).abs().max())
        log["clean_acc_first200"] = float((za.argmax(1) == Y).float().mean())
        if quantized:
            log["steps_per_quantizer"] = [[float(q.s.min()), float(q.s.max()), q.s.numel()] for q in quants]

    st = State(model, X[idx], Y[idx], idx)
    all_rows = torch.arange(len(idx))

    def phase(name, fn):
        t = time.time()
        before = int(st.broken.sum())
        extra = fn()
        rec = {"phase": name, "seconds": round(time.time() - t, 1), "new_breaks": int(st.broken.sum()) - before,
               "new_indices": [int(st.idx[i]) for i in range(len(idx)) if st.found_by[i] is not None
                               and st.found_by[i].startswith(name)],
               "cumulative": int(st.broken.sum()), "remaining": int((~st.broken).sum())}
        if extra is not None:
            rec["info"] = extra
        log["phases"].append(rec)
        save(st, path, args.model, args.out, log)
        print(json.dumps({k: v for k, v in rec.items() if k != "info"}), flush=True)

    B = args.budget

    # P0: clean
    def p0():
        with torch.no_grad():
            st.check(all_rows, st.x, "P0-clean")
    phase("P0-clean", p0)

    # P1: transfer from the float relu-pgd model (quantized targets only)
    if quantized:
        def p1():
            src_path = os.path.join(args.report, "models", "relu-pgd.pt")
            if not os.path.exists(src_path):
                return "no relu-pgd checkpoint"
            src = load_model(src_path)
            for p in src.parameters():
                p.requires_grad_(False)
            dl = time.time() + 0.06 * B
            for loss, init in (("cw", "sign"), ("ce", "rand"), ("cw", "clean")):
                pgd(st, None, [], None, all_rows, 60, loss=loss, init=init, deadline=dl, phase="P1-transfer",
                    gen=gen, model_fn=src)
            return "sources: relu-pgd (float), losses cw/ce/cw"
        phase("P1-transfer", p1)

    # P2: surrogate sweep
    mode_hits = {}
    if quantized:
        modes = ["ste_id", "ste_wide", "ste_relu", "clip", "relu", "tanh", "pwl", "gauss", "mcnoise"]
        plan = [(m, "cw", "sign") for m in modes]
        p2_share = 0.40
    else:
        modes = ["exact"]
        plan = [("exact", "cw", "sign"), ("exact", "ce", "rand"), ("exact", "cw", "clean"),
                ("exact", "cwce", "rand"), ("exact", "cw", "rand")]
        p2_share = 0.35

    def p2():
        dl = time.time() + p2_share * B
        per = p2_share * B / len(plan)
        info = {}
        for j, (mode, loss, init) in enumerate(plan):
            tag = f"P2-surrogates:{mode}/{loss}/{init}"
            n = pgd(st, sur, quants, mode, all_rows, 200, loss=loss, init=init,
                    deadline=min(dl, time.time() + per * 1.5), phase=tag, gen=gen)
            info[tag] = n
            mode_hits[mode] = mode_hits.get(mode, 0) + n
        return info
    phase("P2-surrogates", p2)

    ranked = sorted(mode_hits, key=lambda m: -mode_hits[m]) if quantized else ["exact"]
    best_modes = ranked[:3] if quantized else ["exact"]
    log["surrogate_ranking"] = {m: mode_hits[m] for m in ranked}

    # P3: targeted toward every wrong class (ranked by exact logit), from the best point so far
    def p3():
        dl = time.time() + 0.22 * B
        rows = st.active()
        if len(rows) == 0:
            return None
        with torch.no_grad():
            z = model(st.best_x[rows])
            z[torch.arange(len(rows)), st.y[rows]] = -float("inf")
            order = z.argsort(1, descending=True)[:, :9]
        info = {}
        k = 0
        for rank in range(9):
            for mode in best_modes:
                if time.time() > dl:
                    break
                tgt = torch.zeros(len(idx), dtype=torch.long)
                tgt[rows] = order[:, rank]
                tag = f"P3-targeted:{mode}/rank{rank}"
                n = pgd(st, sur, quants, mode, rows, 100, loss="tgt", target=tgt, init="best" if k % 2 == 0 else "sign",
                        deadline=dl, phase=tag, gen=gen, a0=0.08)
                info[tag] = n
                k += 1
        return info
    phase("P3-targeted", p3)

    # P4: Square attack on the exact model
    def p4():
        dl = time.time() + 0.22 * B
        # rough iteration estimate: time one forward of the active set
        rows = st.active()
        if len(rows) == 0:
            return None
        t = time.time()
        with torch.no_grad():
            st.model(st.x[rows])
        per = max(time.time() - t, 1e-3) * 1.3
        n_est = max(int((dl - time.time()) / per), 50)
        out = square(st, rows, dl, n_est, gen=gen)
        return {"iterations": out[1] if isinstance(out, tuple) else 0, "estimated": n_est}
    phase("P4-square", p4)

    # P5: restarts until the budget ends
    def p5():
        info = {}
        cyc = (best_modes + ["ste_id", "tanh", "gauss"]) if quantized else ["exact"]
        losses = ["cw", "ce", "cwce"]
        inits = ["sign", "rand", "best"]
        k = 0
        while time.time() < end - 3 and len(st.active()):
            mode = cyc[k % len(cyc)]
            loss = losses[(k // len(cyc)) % 3]
            init = inits[k % 3]
            tag = f"P5-restarts:{mode}/{loss}/{init}"
            n = pgd(st, sur, quants, mode, st.active(), 100, loss=loss, init=init, deadline=end - 3,
                    phase=tag, gen=gen, a0=0.12 if k % 2 else 0.06, mu=0.9 if k % 2 else 0.5)
            info[tag] = info.get(tag, 0) + n
            k += 1
        return info
    phase("P5-restarts", p5)

    log["total_s"] = round(time.time() - T0, 1)
    log["best_exact_margin_unbroken"] = {int(st.idx[i]): float(st.best_m[i]) for i in st.active().tolist()}
    save(st, path, args.model, args.out, log)
    print(f"{args.model}: claimed {len(claimed)}, broken {int(st.broken.sum())} in {log['total_s']} s", flush=True)


if __name__ == "__main__":
    main()
