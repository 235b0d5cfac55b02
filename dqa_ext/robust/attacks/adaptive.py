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
import types

import torch
from torch import nn

from ..._backend import use_extension
from ..models import dqa_modules
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
