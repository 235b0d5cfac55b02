"""Independent attack code (no code shared with dqa_ext.robust.attacks): a helper wrote it without
reading the suite, to check the suite's numbers. Only the model loader and the data come from dqa_ext.

DQA_INDEP_REPORT: a report folder of `dqa reproduce` (its models/ and results.json); DQA_INDEP_OUT:
where logs and adversarial images go."""
import copy, json, math, os, time
import torch
import torch.nn as nn
import torch.nn.functional as F

from dqa_ext.robust.train import load_model
from dqa_ext.robust.data import load_mnist5k

EPS = 0.3
N = 200
MODELS = [f"{a}-{t}" for a in ("relu", "fixed2", "dqa2") for t in ("standard", "pgd")]
REPORT = os.environ.get("DQA_INDEP_REPORT", "dqa-report")
OUT = os.environ.get("DQA_INDEP_OUT", "indep-out")


def data():
    ds = load_mnist5k()
    return ds.x_test[:N].clone().float(), ds.y_test[:N].clone().long()


def real_model(name):
    m = load_model(f"{REPORT}/models/{name}.pt").eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def is_dqa(m):
    return type(m).__name__ == "DQAReLU"


def has_dqa(model):
    return any(is_dqa(m) for m in model.modules())


class Surrogate(nn.Module):
    """Replaces a DQAReLU. kind: clamp | sig:T | relu | bpda_sig:T | bpda_relu | bpda_clamp | real
    | rsig (random T per call, EOT-style) | softclamp:beta"""

    def __init__(self, orig, kind):
        super().__init__()
        self.orig = orig
        self.kind = kind
        s = orig.effective_step.detach().float()
        self.register_buffer("s", s)
        self.q = orig.qmax

    def _s(self, x):
        shape = [1] * x.dim()
        shape[1] = -1
        return self.s.view(shape)

    def smooth(self, x, kind):
        s = self._s(x)
        if kind == "clamp":
            return torch.minimum(torch.relu(x), self.q * s)
        if kind == "relu":
            return torch.relu(x)
        if kind.startswith("softclamp"):
            b = float(kind.split(":")[1])
            # smooth clamp via softplus on both sides (beta in units of the step)
            u = x / s
            y = F.softplus(u, beta=b) - F.softplus(u - self.q, beta=b)
            return y * s
        if kind.startswith("sig") or kind == "rsig":
            if kind == "rsig":
                T = float(torch.empty(1).uniform_(0.03, 0.5))
            else:
                T = float(kind.split(":")[1])
            u = x / s
            y = 0
            for k in range(1, self.q + 1):
                y = y + torch.sigmoid((u - (k - 0.5)) / T)
            return y * s
        raise ValueError(kind)

    def forward(self, x):
        k = self.kind
        if k == "real":
            return self.orig(x)
        if k.startswith("bpda_"):
            sm = self.smooth(x, k[5:])
            with torch.no_grad():
                hard = self.orig(x)
            return sm + (hard - sm).detach()
        return self.smooth(x, k)


def twin(model, kinds):
    """kinds: str (same for every DQAReLU) or list per DQAReLU layer in order."""
    t = copy.deepcopy(model)
    names = [n for n, m in t.named_modules() if is_dqa(m)]
    if isinstance(kinds, str):
        kinds = [kinds] * len(names)
    for n, k in zip(names, kinds):
        parent = t
        parts = n.split(".")
        for p in parts[:-1]:
            parent = getattr(parent, p)
        setattr(parent, parts[-1], Surrogate(getattr(parent, parts[-1]), k))
    return t.eval()


# ---------------------------------------------------------------- losses
def dlr_loss(z, y):
    zs, ind = z.sort(1)
    zy = z.gather(1, y[:, None])[:, 0]
    top_is_y = (ind[:, -1] == y)
    other = torch.where(top_is_y, zs[:, -2], zs[:, -1])
    return -(zy - other) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_targeted(z, y, t):
    zs, _ = z.sort(1)
    zy = z.gather(1, y[:, None])[:, 0]
    zt = z.gather(1, t[:, None])[:, 0]
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def margin_loss(z, y):
    zy = z.gather(1, y[:, None])[:, 0]
    zo = z.clone()
    zo.scatter_(1, y[:, None], -1e9)
    return zo.max(1)[0] - zy


def make_loss(name):
    if name == "ce":
        return lambda z, y, t: F.cross_entropy(z, y, reduction="none")
    if name == "dlr":
        return lambda z, y, t: dlr_loss(z, y)
    if name == "dlrt":
        return lambda z, y, t: dlr_targeted(z, y, t)
    if name == "cet":
        return lambda z, y, t: -F.cross_entropy(z, t, reduction="none")
    if name == "margin":
        return lambda z, y, t: margin_loss(z, y)
    raise ValueError(name)


def project(xa, x, eps):
    return torch.clamp(torch.min(torch.max(xa, x - eps), x + eps), 0.0, 1.0)


class Checker:
    """Evaluates every iterate on the REAL model; keeps the first adversarial point per example."""

    def __init__(self, real, x, y):
        self.real, self.x, self.y = real, x, y
        self.broken = torch.zeros(len(x), dtype=torch.bool)
        self.adv = x.clone()

    @torch.no_grad()
    def check(self, xa, idx):
        """xa: candidates for examples idx (global indices). returns bool mask over idx of newly/already broken."""
        ok = ((xa - self.x[idx]).abs().flatten(1).max(1)[0] <= EPS + 1e-6) & (xa.flatten(1).min(1)[0] >= 0) & (
            xa.flatten(1).max(1)[0] <= 1)
        wrong = (self.real(xa).argmax(1) != self.y[idx]) & ok
        new = wrong & ~self.broken[idx]
        if new.any():
            gi = idx[new]
            self.adv[gi] = xa[new].detach()
            self.broken[gi] = True
        return self.broken[idx].clone()


def apgd(att_model, checker, idx, loss_name="ce", steps=100, restarts=1, targets=None, seed=0, eps=EPS,
         rho=0.75, bs=250, init="rand"):
    """APGD (Croce & Hein 2020) on att_model, every iterate checked on the real model via checker.
    idx: global indices to attack. targets: None, or int k meaning k-th most likely class (per example)."""
    lossf = make_loss(loss_name)
    x_all, y_all = checker.x, checker.y
    g = torch.Generator().manual_seed(seed)
    # checkpoints
    p = [0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ck = sorted(set(int(math.ceil(q * steps)) for q in p if q <= 1))
    for r in range(restarts):
        for b0 in range(0, len(idx), bs):
            bi = idx[b0:b0 + bs]
            bi = bi[~checker.broken[bi]]
            if len(bi) == 0:
                continue
            x, y = x_all[bi], y_all[bi]
            if targets is not None:
                with torch.no_grad():
                    z0 = att_model(x)
                t = z0.sort(1)[1][:, -(targets + 1)]
            else:
                t = y
            if init == "rand" and (r > 0 or restarts == 1 or True):
                xa = project(x + (2 * torch.rand(x.shape, generator=g) - 1) * eps, x, eps)
            else:
                xa = x.clone()
            eta = torch.full((len(bi), 1, 1, 1), 2 * eps)

            def grad_loss(xa):
                xa = xa.clone().requires_grad_(True)
                l = lossf(att_model(xa), y, t)
                gr, = torch.autograd.grad(l.sum(), xa)
                return l.detach(), gr.detach()

            checker.check(xa, bi)
            l, gr = grad_loss(xa)
            best_l = l.clone(); x_best = xa.clone(); g_best = gr.clone()
            xprev = xa.clone()
            x1 = project(xa + eta * gr.sign(), x, eps)
            checker.check(x1, bi)
            l1, g1 = grad_loss(x1)
            inc = (l1 > l).float()
            imp = l1 > best_l
            best_l = torch.where(imp, l1, best_l); x_best[imp] = x1[imp]; g_best[imp] = g1[imp]
            xk, gk = x1, g1
            last_ck = 0; best_at_last = best_l.clone(); eta_reduced_last = torch.ones(len(bi), dtype=torch.bool)
            lk = l1
            for k in range(1, steps):
                z = project(xk + eta * gk.sign(), x, eps)
                a = 0.75 if k > 1 else 1.0
                xn = project(xk + a * (z - xk) + (1 - a) * (xk - xprev), x, eps)
                checker.check(xn, bi)
                ln, gn = grad_loss(xn)
                inc += (ln > lk).float()
                imp = ln > best_l
                best_l = torch.where(imp, ln, best_l); x_best[imp] = xn[imp]; g_best[imp] = gn[imp]
                xprev, xk, gk, lk = xk, xn, gn, ln
                if k in ck and k > 0:
                    h = k - last_ck
                    c1 = inc < rho * h
                    c2 = (~eta_reduced_last) & (best_at_last >= best_l)
                    red = c1 | c2
                    eta[red] /= 2
                    xk = xk.clone(); gk = gk.clone()
                    xk[red] = x_best[red]; gk[red] = g_best[red]
                    eta_reduced_last = red
                    best_at_last = best_l.clone()
                    inc = torch.zeros_like(inc)
                    last_ck = k
    return checker.broken[idx]


def pgd(att_model, checker, idx, loss_name="ce", steps=100, alpha=0.01, restarts=1, seed=0, eps=EPS, bs=250,
        eot=1):
    lossf = make_loss(loss_name)
    g = torch.Generator().manual_seed(seed)
    for r in range(restarts):
        for b0 in range(0, len(idx), bs):
            bi = idx[b0:b0 + bs]
            bi = bi[~checker.broken[bi]]
            if len(bi) == 0:
                continue
            x, y = checker.x[bi], checker.y[bi]
            xa = project(x + (2 * torch.rand(x.shape, generator=g) - 1) * eps, x, eps)
            for k in range(steps):
                gr = 0
                for _ in range(eot):
                    xr = xa.clone().requires_grad_(True)
                    l = lossf(att_model(xr), y, y)
                    gr = gr + torch.autograd.grad(l.sum(), xr)[0]
                xa = project(xa + alpha * gr.sign(), x, eps).detach()
                checker.check(xa, bi)
    return checker.broken[idx]
