"""Quantization-aware adaptive attacks (Athalye et al. 2018; Tramer et al. 2020).

A quantizer's true derivative is zero almost everywhere, and the straight-through estimate (the
identity inside the clip range) may point the wrong way, so gradient attacks through DQAReLU can be
masked. Here each DQAReLU of a model is temporarily given another behaviour:

  twin      the forward itself is a smooth surrogate (the model becomes a differentiable twin with
            the same weights): ``clip`` = clamp(x, 0, qmax*s), or ``sigmoid`` =
            s * sum_k sigmoid((x/s - (k - 1/2)) / T), a staircase that tends to the quantizer as T -> 0;
  bpda      the exact forward, with the surrogate's derivative in the backward;
  zero      the exact forward, with the true derivative (zero): what a masking-blind evaluation sees.

Every one of these derivatives vanishes on dead (x < 0) and saturated (x > qmax*s) units, and PGD
training rewards a model for hiding its inputs there. Three surrogates do not saturate: ``identity``
(Athalye et al.'s BPDA for a quantizer: the derivative 1 everywhere), ``leaky_clip`` (the clip with
slope ``leak`` outside [0, qmax*s]) and ``leaky_sigmoid`` (the staircase plus ``leak`` * x).

Attacks on a twin are always checked on the real model (see whitebox.apgd's ``check``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import types

import torch
from torch import nn

from ..._backend import use_extension
from ..models import dqa_modules
from .common import ce_loss, dlr_loss, example_uniform, margin, project_linf
from .spec import Outcome, Target
from .whitebox import apgd_ce_then_t

SURROGATES = ("clip", "sigmoid", "identity", "leaky_clip", "leaky_sigmoid")


def step_like(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The step the quantizer ``m`` uses (DQAReLU.effective_step), shaped to broadcast against x
    along its channel dim."""
    s = m.effective_step
    shape = [1] * x.dim()
    if s.numel() > 1:
        shape[m.channel_dim % x.dim()] = -1
    return s.reshape(shape)


def surrogate(kind: str, x: torch.Tensor, s: torch.Tensor, qmax: int, temp=0.1, leak: float = 0.0) -> torch.Tensor:
    """A smooth stand-in for clamp(round(x / s), 0, qmax) * s. ``temp``: a number, or one per example
    (a tensor [N], for many temperature schedules in one batch)."""
    if kind == "identity":
        return x
    if kind in ("clip", "leaky_clip"):
        clipped = torch.minimum(torch.relu(x), qmax * s)
        return clipped + leak * (x - clipped) if kind == "leaky_clip" else clipped
    if kind in ("sigmoid", "leaky_sigmoid"):
        stairs = (_Staircase.apply(x, s, temp, qmax) if _fused_staircase(x, s)
                  else staircase_reference(x, s, qmax, temp))
        return stairs + leak * x if kind == "leaky_sigmoid" else stairs
    raise ValueError(f"unknown surrogate {kind!r}; choose from {', '.join(SURROGATES)}")


def staircase_reference(x: torch.Tensor, s: torch.Tensor, qmax: int, temp) -> torch.Tensor:
    """s * sum_k sigmoid((x/s - (k - 1/2)) / T) in PyTorch ops, autograd's derivative (what the
    fused CPU op dqa_ext::sigmoid_staircase computes in one pass)."""
    if torch.is_tensor(temp):
        temp = temp.reshape((-1,) + (1,) * (x.dim() - 1))
    v = x.float() / s
    # Clamped logits: far from a threshold the derivative underflows to denormals at low T,
    # which slows x86 arithmetic a hundredfold and adds nothing (sigmoid'(30) ~ 1e-13).
    return s * sum(torch.sigmoid(((v - (k - 0.5)) / temp).clamp(-30, 30)) for k in range(1, qmax + 1))


def _step_dim(x: torch.Tensor, s: torch.Tensor):
    """The dim of x that s (shaped to broadcast against it) holds one step per channel of, 0 for a
    single step, None for any other shape."""
    if s.numel() == 1:
        return 0
    dims = [d for d, n in enumerate(s.shape) if n != 1]
    if s.dim() != x.dim() or len(dims) != 1 or s.shape[dims[0]] != x.shape[dims[0]]:
        return None
    return dims[0]


def _fused_staircase(x: torch.Tensor, s: torch.Tensor) -> bool:
    """The fused op serves float32 CPU tensors, contiguous or channels_last (with the steps along
    dim 1), when the extension is built, for a step that needs no gradient (the attacks' steps are
    detached: the op gives none)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and s.dtype == torch.float32 and x.dim() >= 1
            and s.device.type == "cpu" and not s.requires_grad and use_extension("cpu")):
        return False
    dim = _step_dim(x, s)
    if dim is None:
        return False
    if x.is_contiguous():
        return True
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and (s.numel() == 1 or dim == 1)


class _Staircase(torch.autograd.Function):
    """s * u(x / s) and its derivative du/dv (= d(s * u(x / s))/dx) from dqa_ext::sigmoid_staircase."""

    @staticmethod
    def forward(ctx, x, s, temp, qmax):
        t = temp.reshape(-1).float() if torch.is_tensor(temp) else torch.tensor([float(temp)])
        y, d = torch.ops.dqa_ext.sigmoid_staircase(x, s.reshape(-1), t, qmax, _step_dim(x, s))
        ctx.save_for_backward(d)
        return y

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return grad * d, None, None, None


class _Zero(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), None


def _behaviour(mode: str, kind: str, temp, leak: float):
    def forward(self, x):
        if mode == "zero":
            return _Zero.apply(x, type(self).forward(self, x).detach())
        smooth = surrogate(kind, x, step_like(self, x), self.qmax, temp, leak).to(x.dtype)
        if mode == "twin":
            return smooth
        exact = type(self).forward(self, x).detach()
        return exact + (smooth - smooth.detach())  # bpda: the exact value, the surrogate's gradient

    return forward


@contextlib.contextmanager
def quantizers_as(model: nn.Module, mode: str, kind: str = "clip", temp=0.1, leak: float = 0.0):
    """Within the block every DQAReLU of ``model`` behaves as ``mode`` (twin, bpda or zero)."""
    if mode not in ("twin", "bpda", "zero"):
        raise ValueError(f"mode must be twin, bpda or zero, got {mode!r}")
    mods = [m for _, m in dqa_modules(model)]
    fn = _behaviour(mode, kind, temp, leak)
    for m in mods:
        m.forward = types.MethodType(fn, m)  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


def _twin_layout(model: nn.Module) -> nn.Module:
    """The model a twin runs: on a CPU, a channels_last copy of a convolutional model (its
    convolutions and pooling run about a third faster there: 27 against 36 ms for a step of 160
    MNIST CNN copies on 2 cores). A twin only gives gradients, and every attack decides success on
    the model itself, so the copy's last bits may differ from the model's; anything else (a GPU, no
    2-d convolution, a model that cannot be copied) runs the model itself."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    if any(p.device.type != "cpu" for p in model.parameters()):
        return model
    try:
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    except Exception:  # noqa: BLE001 (a user's model that deepcopy cannot copy runs as it is)
        return model


class Variant(nn.Module):
    """``model`` seen through quantizers_as(mode, kind, temp, leak): a callable for the attacks. A
    twin (its own forward) runs a channels_last copy on a CPU (_twin_layout); bpda and zero keep
    the model, whose exact forward decides success where no other check is given."""

    def __init__(self, model: nn.Module, mode: str, kind: str = "clip", temp=0.1, leak: float = 0.0):
        super().__init__()
        model = _twin_layout(model) if mode == "twin" else model
        self.model, self.mode, self.kind, self.temp, self.leak = model, mode, kind, temp, leak

    def forward(self, x):
        with quantizers_as(self.model, self.mode, self.kind, self.temp, self.leak):
            return self.model(x)


def has_quantizers(model: nn.Module) -> bool:
    return bool(dqa_modules(model))


# The masking demonstration of the paper-style table: PGD with the true (zero) derivative.
@contextlib.contextmanager
def true_gradient(model: nn.Module):
    """Within the block every DQAReLU of ``model`` back-propagates its true derivative (zero)."""
    with quantizers_as(model, "zero"):
        yield model


class TrueGradient(Variant):
    """``model`` whose DQAReLUs back-propagate zero (forward unchanged); ReLU models are unaffected."""

    def __init__(self, model: nn.Module):
        super().__init__(model, "zero")


# The first starts are the suite's historical restarts (their random streams and schedules unchanged),
# so a larger budget only adds to what they find: uniform starts cycling the CE, DLR and margin
# losses and alternating a smooth and a sharp temperature. Starts beyond them (the convergence
# rerun's second half, or a larger anneal_restarts) vary everything else too.
CLASSIC_STARTS = 40


def start_plan(r: int, t_start: float, t_start_low: float | None) -> dict:
    """What start ``r`` of the annealed twin does: its loss (0 CE, 1 DLR, 2 margin, 3 the margin
    towards one likely wrong class), starting temperature, start point (uniform in the ball, the
    image itself, a vertex of the ball), step-size factor and target class (its rank by the clean
    logits: 2 is the likeliest wrong class). Steps fall in thirds, without momentum."""
    t0 = t_start_low if (t_start_low is not None and r % 2) else t_start
    if r < CLASSIC_STARTS:
        return {"loss": r % 3, "t0": t0, "start": "uniform", "step": 1.0, "target_rank": 2}
    block = (r - CLASSIC_STARTS) // 8  # eight starts pair the four losses with the two temperatures
    return {"loss": (r // 2) % 4, "t0": t0, "start": ("uniform", "image", "vertex")[block % 3],
            "step": (1.0, 1.5, 0.67)[(block // 3) % 3], "target_rank": 2 + block % 3}


def near_plan(r: int, t_start: float, t_end: float) -> dict:
    """Start ``r`` from a near miss: a point within eps/6 of where the attacks came closest to
    breaking the image, already on the staircase's sharp end (t_start, then alternately a third of
    it, down to t_end), small cosine-decaying steps with momentum, the four losses in turn and the
    targets cycling over the three likeliest wrong classes. A local search of the real model's
    neighbourhood where the gradients of a smoother twin stopped helping."""
    return {"loss": (2, 0, 1, 3)[r % 4], "t0": t_start if r % 2 == 0 else max(t_end, t_start / 3), "t_end": t_end,
            "start": "near", "step": 1.0, "schedule": "cosine", "momentum": 0.75, "target_rank": 2 + (r // 4) % 3}


# Step sizes as fractions of eps: falling in thirds (the classic starts), or a cosine from the first
# to the second (near starts).
THIRDS = (1 / 6, 1 / 15, 1 / 37.5)
COSINE = (1 / 8, 1 / 100)


def _anneal_loss(logits, y, kind, target):
    """Per copy, the loss its start uses (kind: 0 CE, 1 DLR, 2 margin, 3 targeted margin)."""
    z = logits.float()
    z_t = z.gather(1, target[:, None]).squeeze(1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    losses = torch.stack([ce_loss(z, y), dlr_loss(z, y), -margin(z, y), z_t - z_y])
    return losses.gather(0, kind[None]).squeeze(0)


def _per_copy(values, x, like=None):
    t = torch.tensor(values, device=x.device, dtype=torch.float32)
    return t if like is None else t.view((-1,) + (1,) * (like.dim() - 1))


def anneal_starts(model: nn.Module, x, y, ids, eps, *, steps, restarts, t_start, t_end, t_start_low=None, seed=0,
                  tag="twin_anneal", batch_size=500, near=None, plan=None, origin=None):
    """PGD on the sigmoid-staircase twin while its temperature falls geometrically from each start's
    t0 to t_end (a smooth model first, then ever closer to the quantizer). Each image gets
    ``restarts`` starts (``plan(r)``, default start_plan), run as copies side by side in batches of
    ``batch_size``, each copy with its own temperature schedule, loss, start point, step sizes and
    momentum; every iterate is checked on the real model, and a copy stops when it breaks its image.

    Returns (broken bool [N] on the CPU, x_adv [N], hits int [N]): hits counts, per image, the starts
    that broke it, out of ``restarts``: a convergence measurement (an image that falls to 1 start of
    40 says others may fall to start 41). ``near``: a NearMisses that gets each copy's closest point
    on the real model; ``origin`` [N]: the points "near" starts start around. Found by an independent
    evaluation of this project's numbers to break PGD-trained quantized models that
    fixed-temperature twins leave standing."""
    n = len(x)
    plan = plan or (lambda r: start_plan(r, t_start, t_start_low))
    hits = torch.zeros(n, dtype=torch.long)
    x_adv = x.detach().clone()
    twin = Variant(model, "twin", "sigmoid", t_start)
    # Each iterate is checked on a channels_last copy of the model (40% faster on a CPU than the
    # model's own layout), and what it finds broken on the model itself: the copy's last bits may
    # differ, and only the model decides.
    checker = _twin_layout(model)
    copies = [(i, r) for r in range(restarts) for i in range(n)]  # start by start: every image early
    # Copies per batch: on a CPU a few hundred keep the activations in cache (160 ran faster than
    # 500 on 2 cores, by up to a quarter); a GPU wants them all.
    batch_size = batch_size if x.is_cuda else min(batch_size, 160)
    with torch.no_grad():
        ranked = torch.cat([model(x[i:i + batch_size]).float().argsort(1, descending=True)
                            for i in range(0, n, batch_size)]) if n else torch.zeros(0, 10, dtype=torch.long)
    for c in range(0, len(copies), batch_size):
        chunk = copies[c:c + batch_size]
        img = torch.tensor([i for i, _ in chunk])
        plans = [plan(r) for _, r in chunk]
        di = img.to(x.device)
        xb, yb = x[di], y[di]
        noise = torch.empty_like(xb)
        for r in sorted({r for _, r in chunk}):  # each start's own random stream per image
            at = torch.tensor([k for k, (_, rr) in enumerate(chunk) if rr == r], device=x.device)
            noise[at] = example_uniform(ids[img[at.cpu()]], tuple(x.shape[1:]), seed, f"{tag}/{r}").to(x.device)
        centre = xb.clone()
        for k, p in enumerate(plans):
            if p["start"] == "image":
                noise[k] = 0
            elif p["start"] == "vertex":
                noise[k] = noise[k].sign()
            elif p["start"] == "near":
                centre[k], noise[k] = origin[int(img[k])].to(x.device), noise[k] / 6
        kind = torch.tensor([p["loss"] for p in plans], device=x.device)
        target = ranked[img, torch.tensor([p["target_rank"] for p in plans]) - 1].to(x.device)
        t0 = _per_copy([p["t0"] for p in plans], x)
        t1 = _per_copy([p.get("t_end", t_end) for p in plans], x)
        factor = _per_copy([p["step"] for p in plans], x, like=x)
        cosine = torch.tensor([p.get("schedule") == "cosine" for p in plans], device=x.device)
        mu = _per_copy([p.get("momentum", 0.0) for p in plans], x, like=x)
        xa = project_linf(centre + eps * noise, xb, eps)
        g_m = torch.zeros_like(xa)
        act = torch.arange(len(chunk), device=x.device)  # copies that have not broken their image yet
        m_near, x_near = torch.full((len(chunk),), float("inf"), device=x.device), xb.clone()
        for k in range(steps):
            if not len(act):
                break
            frac = k / max(1, steps - 1)
            twin.temp = t0[act] * (t1[act] / t0[act]) ** frac
            xr = xa[act].detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(_anneal_loss(twin(xr), yb[act], kind[act], target[act]).sum(), xr)
            thirds = THIRDS[0] if k < steps // 3 else (THIRDS[1] if k < 2 * steps // 3 else THIRDS[2])
            cos = COSINE[1] + 0.5 * (COSINE[0] - COSINE[1]) * (1 + math.cos(math.pi * k / steps))
            step = torch.where(cosine[act], eps * cos, eps * thirds).view((-1,) + (1,) * (x.dim() - 1))
            with torch.no_grad():
                # sign(g) without momentum; with it, the sign of the running sum of gradients each
                # scaled by its mean magnitude
                g = g / (g.abs().flatten(1).mean(1).view((-1,) + (1,) * (x.dim() - 1)) + 1e-20)
                g_m[act] = mu[act] * g_m[act] + g
                xa[act] = project_linf(xr.detach() + step * factor[act] * g_m[act].sign(), xb[act], eps)
                real = checker(xa[act]).float()
                wrong = real.argmax(1) != yb[act]
                m = margin(real, yb[act])
                found = torch.nonzero(wrong).flatten()
                if len(found) and checker is not model:
                    exact = model(xa[act[found]]).float()
                    wrong[found] = exact.argmax(1) != yb[act[found]]
                    m[found] = margin(exact, yb[act[found]])
                closer = ~wrong & (m < m_near[act])
                m_near[act[closer]], x_near[act[closer]] = m[closer], xa[act[closer]]
            done = act[wrong].cpu()
            for j in done.tolist():
                i = int(img[j])
                if hits[i] == 0:
                    x_adv[i] = xa[j]
                hits[i] += 1
            act = act[~wrong]
        if near is not None:
            near.offer(ids[img], m_near, x_near)
    return hits > 0, x_adv, hits


def annealed_twin(model: nn.Module, x, y, ids, eps, **kw):
    """anneal_starts without the per-image counts: (broken bool [N] on the CPU, x_adv [N])."""
    broken, x_adv, _ = anneal_starts(model, x, y, ids, eps, **kw)
    return broken, x_adv


# ------------------------------------------------------------------ the suite's runners
def _through(t: Target, name: str, kind: str, temp: float, mode: str, leak: float = 0.0,
             losses=("ce",)) -> Outcome:
    """APGD on each untargeted loss of ``losses``, then APGD-T, differentiating the model seen
    through ``mode`` (a twin's every iterate is checked on the real model)."""
    b = t.budget
    broken, x_adv = apgd_ce_then_t(Variant(t.model, mode, kind, temp, leak), t.model if mode == "twin" else None, t,
                                   steps=b.twin_steps, restarts=b.twin_restarts, targets=b.twin_targets,
                                   restarts_t=b.twin_restarts, tag=name, losses=losses)
    info = {"surrogate": kind, "temperature": temp or None, "mode": mode}
    if leak:
        info["leak"] = leak
    if tuple(losses) != ("ce",):
        info["losses"] = list(losses) + ["dlr-t"]
    return Outcome(broken, x_adv, info)


def run_twin_clip(t: Target) -> Outcome:
    return _through(t, "twin_clip", "clip", 0.0, "twin")


def run_twin_sig_low(t: Target) -> Outcome:
    return _through(t, "twin_sig_low", "sigmoid", t.budget.twin_temp_low, "twin")


def run_twin_sig_high(t: Target) -> Outcome:
    return _through(t, "twin_sig_high", "sigmoid", t.budget.twin_temp_high, "twin")


def run_bpda_sig(t: Target) -> Outcome:
    return _through(t, "bpda_sig", "sigmoid", t.budget.twin_temp_high, "bpda")


# The non-saturating backwards: every unit passes a gradient, dead and saturated ones included.
def run_bpda_identity(t: Target) -> Outcome:
    return _through(t, "bpda_identity", "identity", 0.0, "bpda", losses=("ce", "margin"))


def run_twin_leaky_clip(t: Target) -> Outcome:
    return _through(t, "twin_leaky_clip", "leaky_clip", 0.0, "twin", leak=t.budget.twin_leak, losses=("ce", "margin"))


def run_bpda_leaky_sig(t: Target) -> Outcome:
    return _through(t, "bpda_leaky_sig", "leaky_sigmoid", t.budget.twin_temp_high, "bpda", leak=t.budget.twin_leak,
                    losses=("ce", "margin"))


def run_twin_anneal(t: Target) -> Outcome:
    b = t.budget
    broken, x_adv, hits = anneal_starts(t.model, t.x, t.y, t.ids, t.eps, steps=b.anneal_steps,
                                        restarts=b.anneal_restarts, t_start=b.anneal_t_start, t_end=b.anneal_t_end,
                                        t_start_low=b.anneal_t_start_low, seed=t.seed, tag="twin_anneal",
                                        batch_size=b.batch_size, near=t.near)
    return Outcome(broken, x_adv, {"surrogate": "sigmoid", "mode": "twin", "starts": b.anneal_restarts,
                                   "temperature": [b.anneal_t_start, b.anneal_t_start_low, b.anneal_t_end],
                                   "start_hits": [[int(t.ids[i]), int(hits[i])] for i in torch.nonzero(broken).flatten()]})


def run_twin_anneal_near(t: Target) -> Outcome:
    """The annealed twin again, each start from near the point where the attacks so far came
    closest to breaking the image (images without one are not attacked)."""
    b = t.budget
    broken, x_adv = torch.zeros(len(t.x), dtype=torch.bool), t.x.clone()
    points = [None if t.near is None else t.near.point(i) for i in t.ids.tolist()]
    have = [j for j, p in enumerate(points) if p is not None]
    pairs = []
    if have:
        j = torch.tensor(have)
        dj = j.to(t.x.device)
        origin = torch.stack([points[k] for k in have]).to(t.x.device)
        hit, xa, hits = anneal_starts(t.model, t.x[dj], t.y[dj], t.ids[j], t.eps, steps=b.near_steps,
                                      restarts=b.near_restarts, t_start=b.near_t_start, t_end=b.near_t_end,
                                      seed=t.seed, tag="twin_anneal_near", batch_size=b.batch_size, near=t.near,
                                      plan=lambda r: near_plan(r, b.near_t_start, b.near_t_end), origin=origin)
        broken[j] = hit
        x_adv[dj] = xa
        pairs = [[int(t.ids[have[k]]), int(hits[k])] for k in torch.nonzero(hit).flatten().tolist()]
    return Outcome(broken, x_adv, {"surrogate": "sigmoid", "mode": "twin", "starts": b.near_restarts,
                                   "near_misses": len(have), "temperature": [b.near_t_start, b.near_t_end],
                                   "start_hits": pairs})
