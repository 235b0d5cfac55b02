"""Independent audit attacks (written apart from the project's evaluation code).

Only uses: dqa_ext.robust.data.load_mnist5k, dqa_ext.robust.train.load_model, and the DQAReLU
module's attributes (effective_step, qmax) to build surrogate copies of a model.
"""
import copy
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dqa_ext
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.train import load_model

import os
EPS = float(os.environ.get("AUDIT_EPS_SMOKE", "0.3"))  # smoke tests only; the audit uses 0.3
# The report to audit (a `dqa reproduce --out DIR` folder) and where the audit writes.
REPORT = os.environ.get("DQA_AUDIT_REPORT", "dqa-report")
MODELS_DIR = os.path.join(REPORT, "models")
RESULTS = os.path.join(REPORT, "results.json")
OUT = os.environ.get("DQA_AUDIT_OUT", "audit-out")
os.makedirs(OUT, exist_ok=True)


def data200():
    d = load_mnist5k()
    return d.x_test[:200].clone(), d.y_test[:200].clone()


def fresh(name):
    return load_model(f"{MODELS_DIR}/{name}.pt").eval()


def claimed_robust(name):
    """Indices (0..199) the report marks robust in its worst case."""
    r = json.load(open(RESULTS))
    for e in r["models"]:
        if e.get("name") == name or e.get("model") == name:
            ev = e.get("eval") or e.get("evaluation") or e
            rob = ev["worst_case"]["robust"]
            assert len(rob) == 200, len(rob)
            return [i for i, v in enumerate(rob) if v == 1], e
    raise KeyError(name)


# ----------------------------------------------------------------- surrogate quantizers
class Surrogate(nn.Module):
    """Stand-in for a DQAReLU: y = g(x / s) * s with g one of
    hard  : clamp(round(v), 0, q)            (exact replica, zero gradient a.e.)
    soft  : sum_k sigmoid((v - k + .5) / T)  (smooth staircase, -> hard as T -> 0)
    clamp : clamp(v, 0, q)                   (the line the staircase follows)
    ste   : hard forward, clamp backward     (BPDA)
    softste: hard forward, soft backward     (BPDA with the smooth staircase's gradient)
    """

    def __init__(self, step, qmax, kind="soft", T=0.3):
        super().__init__()
        self.register_buffer("s", step.detach().clone().float())
        self.qmax = qmax
        self.kind = kind
        self.T = T

    def _sv(self, x):
        s = self.s
        if s.numel() == 1:
            return s.reshape([1] * x.dim())
        shape = [1] * x.dim()
        shape[1] = -1
        return s.reshape(shape)

    def forward(self, x):
        sv = self._sv(x)
        v = x / sv
        hard = torch.clamp(torch.round(v), 0, self.qmax)
        if self.kind == "hard":
            return hard * sv
        if self.kind == "clamp":
            return torch.clamp(v, 0, self.qmax) * sv
        soft = None
        if self.kind in ("soft", "softste"):
            ks = torch.arange(1, self.qmax + 1, dtype=x.dtype, device=x.device) - 0.5
            soft = torch.sigmoid((v.unsqueeze(-1) - ks) / self.T).sum(-1)
        if self.kind == "soft":
            return soft * sv
        if self.kind == "ste":
            c = torch.clamp(v, 0, self.qmax)
            return (c + (hard - c).detach()) * sv
        if self.kind == "softste":
            return (soft + (hard - soft).detach()) * sv
        raise ValueError(self.kind)


def surrogate(model, kind, T=0.3):
    m = copy.deepcopy(model).eval()
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, dqa_ext.DQAReLU):
                setattr(mod, cname, Surrogate(child.effective_step, child.qmax, kind, T))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def set_T(m, T):
    for mod in m.modules():
        if isinstance(mod, Surrogate):
            mod.T = T


def is_quantized(model):
    return any(isinstance(mod, dqa_ext.DQAReLU) for mod in model.modules())


# ----------------------------------------------------------------- losses / helpers
def margin(logits, y):
    """z_y - max_{j != y} z_j  (negative = misclassified)."""
    zy = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], -float("inf"))
    return zy - other.max(1).values


def project(xa, x, eps=EPS):
    return torch.clamp(torch.min(torch.max(xa, x - eps), x + eps), 0, 1)


def loss_fn(kind, logits, y, t=None):
    """A loss to MAXIMISE."""
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if kind == "cw":
        return -margin(logits, y)
    if kind == "dlr":
        srt = logits.sort(1, descending=True).values
        zy = logits.gather(1, y[:, None])[:, 0]
        other = logits.clone(); other.scatter_(1, y[:, None], -float("inf"))
        return -(zy - other.max(1).values) / (srt[:, 0] - srt[:, 2] + 1e-12)
    if kind == "tcw":  # targeted: push z_t above z_y and everything else
        zt = logits.gather(1, t[:, None])[:, 0]
        other = logits.clone(); other.scatter_(1, t[:, None], -float("inf"))
        return zt - other.max(1).values
    if kind == "tce":
        return -F.cross_entropy(logits, t, reduction="none")
    raise ValueError(kind)


class Tracker:
    """Keeps, per image, a verified-on-the-exact-model adversarial point and the point of
    smallest exact margin seen (a starting point for later attacks)."""

    def __init__(self, exact, x, y):
        self.exact, self.x, self.y = exact, x, y
        n = len(x)
        self.broken = torch.zeros(n, dtype=torch.bool)
        self.adv = x.clone()
        self.best_m = torch.full((n,), float("inf"))
        self.best_x = x.clone()
        self.by = [None] * n
        self.queries = 0

    @torch.no_grad()
    def check(self, xa, idx, tag):
        """xa: candidate points for images idx (with repeats allowed)."""
        xa = project(xa, self.x[idx])
        lg = self.exact(xa)
        self.queries += len(xa)
        m = margin(lg, self.y[idx])
        idx = torch.as_tensor(idx)
        cand = torch.nonzero((m < self.best_m[idx]) | ((m < 0) & ~self.broken[idx])).flatten()
        for j in cand.tolist():
            i = int(idx[j])
            if m[j] < self.best_m[i]:
                self.best_m[i] = m[j]
                self.best_x[i] = xa[j]
            if m[j] < 0 and not self.broken[i]:
                self.broken[i] = True
                self.adv[i] = xa[j]
                self.by[i] = tag
        return m


def pgd(tracker, model_fwd, idx, restarts, steps, loss="cw", targets=None, anneal=None,
        init="uniform", tag="pgd", momentum=0.75, check_every=1, alpha0=None, alpha1=None, gen=None):
    """Sign-PGD with momentum and cosine step decay on `model_fwd`, every iterate checked on
    the exact model. idx: image indices (still-unbroken); each repeated `restarts` times.
    targets: tensor [len(idx)*restarts] of target classes for targeted losses.
    anneal: (T0, T1) geometric temperature schedule for soft surrogates (model_fwd must be one)."""
    x0 = tracker.x[idx].repeat(restarts, 1, 1, 1)
    y0 = tracker.y[idx].repeat(restarts)
    rid = torch.as_tensor(idx).repeat(restarts)
    if init == "uniform":
        xa = x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * EPS
    elif init == "corner":
        xa = x0 + torch.sign(torch.rand(x0.shape, generator=gen) - 0.5) * EPS
    elif init == "best":
        xa = tracker.best_x[rid] + (torch.rand(x0.shape, generator=gen) * 2 - 1) * 0.05
    elif init == "zero":
        xa = x0.clone()
    else:
        xa = init.clone()
    xa = project(xa, x0)
    a0 = alpha0 if alpha0 is not None else EPS / 2
    a1 = alpha1 if alpha1 is not None else EPS / 100
    g_m = torch.zeros_like(xa)
    for k in range(steps):
        if anneal is not None:
            T0, T1 = anneal
            set_T(model_fwd, T0 * (T1 / T0) ** (k / max(1, steps - 1)))
        xa.requires_grad_(True)
        lg = model_fwd(xa)
        L = loss_fn(loss, lg, y0, targets).sum()
        g, = torch.autograd.grad(L, xa)
        xa = xa.detach()
        g = g / (g.abs().flatten(1).mean(1).view(-1, 1, 1, 1) + 1e-20)
        g_m = momentum * g_m + g
        alpha = a1 + 0.5 * (a0 - a1) * (1 + math.cos(math.pi * k / steps))
        xa = project(xa + alpha * torch.sign(g_m), x0)
        if (k + 1) % check_every == 0 or k == steps - 1:
            tracker.check(xa, rid, tag)
    return xa


@torch.no_grad()
def square(tracker, idx, iters, p_init=0.3, tag="square", init="best", tie_model=None, gen=None,
           restarts=1):
    """Square attack (Andriushchenko et al. 2020), L-inf, on the exact model (margin loss);
    the score is the exact margin, ties broken by an optional smooth surrogate's margin
    (so that the search can move across the exact model's flat plateaus)."""
    idx = torch.as_tensor(idx)
    x0 = tracker.x[idx].repeat(restarts, 1, 1, 1)
    y0 = tracker.y[idx].repeat(restarts)
    rid = idx.repeat(restarts)
    n, c, h, w = x0.shape
    if init == "best":
        xa = tracker.best_x[rid].clone()
        xa[: len(idx)] = tracker.best_x[idx]
        if restarts > 1:  # other restarts: fresh vertical-stripe init
            st = torch.sign(torch.rand(n - len(idx), c, 1, w, generator=gen) - 0.5) * EPS
            xa[len(idx):] = x0[len(idx):] + st
    else:
        xa = x0 + torch.sign(torch.rand(n, c, 1, w, generator=gen) - 0.5) * EPS
    xa = project(xa, x0)

    def score(z):
        m = margin(tracker.exact(z), y0)
        tracker.queries += len(z)
        if tie_model is not None:
            return m + 1e-3 * torch.tanh(margin(tie_model(z), y0)), m
        return m, m

    sc, m = score(xa)
    tracker.check(xa, rid, tag)
    for it in range(iters):
        active = ~tracker.broken[rid]
        if not bool(active.any()):
            break
        # p schedule as in the paper (for 10k iterations), rescaled to iters
        frac = it / max(1, iters) * 10000
        p = p_init
        for th, div in ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128),
                        (6000, 256), (8000, 512)):
            if frac > th:
                p = p_init / div
        s = max(1, int(round(math.sqrt(p * h * w))))
        s = min(s, h - 1)
        xn = xa.clone()
        r = torch.randint(0, h - s + 1, (n,), generator=gen)
        cc = torch.randint(0, w - s + 1, (n,), generator=gen)
        delta = torch.sign(torch.rand(n, c, 1, 1, generator=gen) - 0.5) * EPS
        for j in range(n):
            if active[j]:
                xn[j, :, r[j]:r[j] + s, cc[j]:cc[j] + s] = x0[j, :, r[j]:r[j] + s, cc[j]:cc[j] + s] + delta[j]
        xn = project(xn, x0)
        scn, mn = score(xn)
        better = (scn <= sc) & active
        xa[better] = xn[better]
        sc[better] = scn[better]
        tracker.check(xn[better], rid[better], tag)
    return xa


def verify_and_save(name, x, y, idx_claimed, tracker_adv, tracker_broken, out):
    """Re-check every break on a freshly loaded model with no modification."""
    m = fresh(name)
    ids, advs = [], []
    for j, i in enumerate(idx_claimed):
        if not tracker_broken[j]:
            continue
        xa = tracker_adv[j:j + 1].clone()
        xi = x[i:i + 1]
        with torch.no_grad():
            pred = int(m(xa).argmax(1))
        ok = (pred != int(y[i]) and float((xa - xi).abs().max()) <= EPS + 1e-6
              and float(xa.min()) >= 0 and float(xa.max()) <= 1)
        if ok:
            ids.append(i)
            advs.append(xa[0].numpy())
    np.savez(out, indices=np.array(ids, dtype=np.int64),
             x_adv=np.stack(advs) if advs else np.zeros((0, 1, 28, 28), np.float32))
    return ids
