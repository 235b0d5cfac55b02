"""Quantization-aware adaptive attacks (Athalye et al. 2018; Tramer et al. 2020).

A quantizer's true derivative is zero almost everywhere, and the straight-through estimate (the
identity inside the clip range) may point the wrong way, so gradient attacks through DQAReLU can be
masked. Here each DQAReLU of a model is temporarily given another behaviour:

  twin      the forward itself is a smooth surrogate (the model becomes a differentiable twin with
            the same weights): ``clip`` = clamp(x, 0, qmax*s), or ``sigmoid`` =
            s * sum_k sigmoid((x/s - (k - 1/2)) / T), a staircase that tends to the quantizer as T -> 0;
  bpda      the exact forward, with the surrogate's derivative in the backward;
  zero      the exact forward, with the true derivative (zero): what a masking-blind evaluation sees.

Attacks on a twin are always checked on the real model (see whitebox.apgd's ``check``).
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from ..models import dqa_modules
from .common import ce_loss, dlr_loss, example_uniform, margin, project_linf
from .spec import Outcome, Target
from .whitebox import apgd_ce_then_t

SURROGATES = ("clip", "sigmoid")


def step_like(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The step the quantizer ``m`` uses (DQAReLU.effective_step), shaped to broadcast against x
    along its channel dim."""
    s = m.effective_step
    shape = [1] * x.dim()
    if s.numel() > 1:
        shape[m.channel_dim % x.dim()] = -1
    return s.reshape(shape)


def surrogate(kind: str, x: torch.Tensor, s: torch.Tensor, qmax: int, temp: float = 0.1) -> torch.Tensor:
    """A smooth stand-in for clamp(round(x / s), 0, qmax) * s."""
    if kind == "clip":
        return torch.minimum(torch.relu(x), qmax * s)
    if kind == "sigmoid":
        v = x.float() / s
        # Clamped logits: far from a threshold the derivative underflows to denormals at low T,
        # which slows x86 arithmetic a hundredfold and adds nothing (sigmoid'(30) ~ 1e-13).
        return s * sum(torch.sigmoid(((v - (k - 0.5)) / temp).clamp(-30, 30)) for k in range(1, qmax + 1))
    raise ValueError(f"unknown surrogate {kind!r}; choose from {', '.join(SURROGATES)}")


class _Zero(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), None


def _behaviour(mode: str, kind: str, temp: float):
    def forward(self, x):
        if mode == "zero":
            return _Zero.apply(x, type(self).forward(self, x).detach())
        smooth = surrogate(kind, x, step_like(self, x), self.qmax, temp).to(x.dtype)
        if mode == "twin":
            return smooth
        exact = type(self).forward(self, x).detach()
        return exact + (smooth - smooth.detach())  # bpda: the exact value, the surrogate's gradient

    return forward


@contextlib.contextmanager
def quantizers_as(model: nn.Module, mode: str, kind: str = "clip", temp: float = 0.1):
    """Within the block every DQAReLU of ``model`` behaves as ``mode`` (twin, bpda or zero)."""
    if mode not in ("twin", "bpda", "zero"):
        raise ValueError(f"mode must be twin, bpda or zero, got {mode!r}")
    mods = [m for _, m in dqa_modules(model)]
    fn = _behaviour(mode, kind, temp)
    for m in mods:
        m.forward = types.MethodType(fn, m)  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


class Variant(nn.Module):
    """``model`` seen through quantizers_as(mode, kind, temp): a callable for the attacks."""

    def __init__(self, model: nn.Module, mode: str, kind: str = "clip", temp: float = 0.1):
        super().__init__()
        self.model, self.mode, self.kind, self.temp = model, mode, kind, temp

    def forward(self, x):
        with quantizers_as(self.model, self.mode, self.kind, self.temp):
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


def annealed_twin(model: nn.Module, x, y, ids, eps, *, steps, restarts, t_start, t_end, t_start_low=None, seed=0,
                  tag="twin_anneal", batch_size=500):
    """PGD on the sigmoid-staircase twin while its temperature falls geometrically from t_start to
    t_end (a smooth model first, then ever closer to the quantizer), with the step size falling in
    thirds; restarts cycle through the CE, DLR and margin losses, and, given t_start_low, odd
    restarts start from t_start_low instead. Every iterate is checked on the real model. Returns
    (broken bool [N] on the CPU, x_adv [N]).

    Found by an independent evaluation of this project's numbers to break PGD-trained quantized
    models that fixed-temperature twins leave standing. The points it finds are rare (a few random
    starts in a hundred), and a smooth and a sharp start find different ones, hence both."""
    losses = (ce_loss, dlr_loss, lambda z, t: -margin(z, t))
    twin = Variant(model, "twin", "sigmoid", t_start)
    n = len(x)
    broken = torch.zeros(n, dtype=torch.bool)
    x_adv = x.detach().clone()
    for r in range(restarts):
        todo = torch.nonzero(~broken).flatten()
        for i in range(0, len(todo), batch_size):
            idx = todo[i:i + batch_size]
            di = idx.to(x.device)
            xb, yb = x[di], y[di]
            noise = example_uniform(ids[idx], tuple(x.shape[1:]), seed, f"{tag}/{r}").to(x.device)
            xa = (xb + eps * noise).clamp(0.0, 1.0)
            found = torch.zeros(len(idx), dtype=torch.bool, device=x.device)
            t0 = t_start_low if (t_start_low is not None and r % 2) else t_start
            for k in range(steps):
                twin.temp = t0 * (t_end / t0) ** (k / max(1, steps - 1))
                xr = xa.detach().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(losses[r % 3](twin(xr).float(), yb).sum(), xr)
                step = eps * (1 / 6 if k < steps // 3 else (1 / 15 if k < 2 * steps // 3 else 1 / 37.5))
                xa = project_linf(xa.detach() + step * g.sign(), xb, eps)
                with torch.no_grad():
                    wrong = (model(xa).argmax(1) != yb) & ~found
                x_adv[di[wrong]] = xa[wrong]
                found |= wrong
            broken[idx[found.cpu()]] = True
    return broken, x_adv


# ------------------------------------------------------------------ the suite's runners
def _through(t: Target, name: str, kind: str, temp: float, mode: str) -> Outcome:
    """APGD-CE + APGD-T differentiating the model seen through ``mode`` (a twin's every iterate is
    checked on the real model)."""
    b = t.budget
    broken, x_adv = apgd_ce_then_t(Variant(t.model, mode, kind, temp), t.model if mode == "twin" else None, t,
                                   steps=b.twin_steps, restarts=b.twin_restarts, targets=b.twin_targets,
                                   restarts_t=b.twin_restarts, tag=name)
    return Outcome(broken, x_adv, {"surrogate": kind, "temperature": temp or None, "mode": mode})


def run_twin_clip(t: Target) -> Outcome:
    return _through(t, "twin_clip", "clip", 0.0, "twin")


def run_twin_sig_low(t: Target) -> Outcome:
    return _through(t, "twin_sig_low", "sigmoid", t.budget.twin_temp_low, "twin")


def run_twin_sig_high(t: Target) -> Outcome:
    return _through(t, "twin_sig_high", "sigmoid", t.budget.twin_temp_high, "twin")


def run_bpda_sig(t: Target) -> Outcome:
    return _through(t, "bpda_sig", "sigmoid", t.budget.twin_temp_high, "bpda")


def run_twin_anneal(t: Target) -> Outcome:
    b = t.budget
    broken, x_adv = annealed_twin(t.model, t.x, t.y, t.ids, t.eps, steps=b.anneal_steps, restarts=b.anneal_restarts,
                                  t_start=b.anneal_t_start, t_end=b.anneal_t_end, t_start_low=b.anneal_t_start_low,
                                  seed=t.seed, tag="twin_anneal", batch_size=b.batch_size)
    return Outcome(broken, x_adv, {"surrogate": "sigmoid", "mode": "twin",
                                   "temperature": [b.anneal_t_start, b.anneal_t_start_low, b.anneal_t_end]})
