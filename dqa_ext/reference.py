"""dqa_ext's math in plain PyTorch: line for line with csrc/dqa_math.h and the argument checks of
csrc/dqa_args.cpp. It is the CPU fallback when the extension is not built, and the oracle of the
parity tests.

    s = step, or max(|step|, min_step) when min_step > 0 (a learned step)
    v = float32(x) / s
    y = cast(clamp(rne(v), qmin, qmax) * s)
    dx = dy if qmin < v < qmax else 0
    dstep[c] = grad_scale * sum_c float32(dy) * t(v) * d s / d step,
    t(v) = qmin if v <= qmin, qmax if v >= qmax, rne(v) - v otherwise
"""

import math
import numbers
import struct

import torch

FLT_MAX = torch.finfo(torch.float32).max
_MAX_LEVEL = 2**24
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(x, step, qmin, qmax, channel_dim, min_step=0.0):
    """The checks of dqa::check_args, with the same messages; returns channel_dim wrapped."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dqa_ext: x must be a tensor, got {type(x).__name__}")
    if not isinstance(step, torch.Tensor):
        raise TypeError(f"dqa_ext: step must be a tensor, got {type(step).__name__}")
    if x.dtype not in _X_DTYPES:
        raise RuntimeError(f"dqa_ext: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise RuntimeError("dqa_ext: x must have at least 1 dimension, got a 0-d tensor")
    if step.dtype != torch.float32:
        raise RuntimeError(f"dqa_ext: step must be float32, got {step.dtype}")
    if step.device != x.device:
        raise RuntimeError(f"dqa_ext: step must be on x's device ({x.device}), got {step.device}")
    check_level_types(qmin, qmax)
    if not qmin < qmax:
        raise RuntimeError(f"dqa_ext: qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
    if qmin < -_MAX_LEVEL or qmax > _MAX_LEVEL:
        raise RuntimeError("dqa_ext: qmin and qmax must lie in [-2**24, 2**24] (exact in float32), "
                           f"got qmin={qmin}, qmax={qmax}")
    check_min_step(min_step)
    dim = wrap_channel_dim(x, channel_dim)
    channels = x.shape[dim]
    if step.numel() not in (1, channels):
        raise RuntimeError(f"dqa_ext: step must have 1 element (per-tensor) or x.shape[channel_dim] = "
                           f"{channels} elements (per-channel), got {step.numel()} "
                           f"(shape {list(step.shape)})")
    return dim


def check_level_types(qmin, qmax):
    """qmin and qmax are integers (the op schema's `int`; numpy integers too); a float would be
    truncated."""
    for name, value in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Integral):
            raise TypeError(f"dqa_ext: {name} must be an integer, got {value!r}")


def check_min_step(min_step):
    """0, or a positive finite float32 (the kernels use it in float32)."""
    m = float(min_step)
    try:
        m32 = struct.unpack("f", struct.pack("f", m))[0]
    except OverflowError:
        m32 = math.inf
    if not (m == 0.0 or (math.isfinite(m32) and m32 > 0.0)):
        raise RuntimeError(f"dqa_ext: min_step must be 0 or a positive finite float32, got {min_step}")


def wrap_channel_dim(x, channel_dim):
    """channel_dim in [0, x.dim()), or the same error as the extension's."""
    ndim = x.dim()
    if not -ndim <= channel_dim < ndim:
        raise RuntimeError(f"dqa_ext: channel_dim must be in [{-ndim}, {ndim - 1}] for x of shape "
                           f"{list(x.shape)}, got {channel_dim}")
    return channel_dim % ndim


def check_backward_args(grad_y, x, grad_scale):
    if grad_y.shape != x.shape:
        raise RuntimeError(f"dqa_ext: grad_y must have x's shape {list(x.shape)}, got {list(grad_y.shape)}")
    if grad_y.dtype != x.dtype:
        raise RuntimeError(f"dqa_ext: grad_y must have x's dtype {x.dtype}, got {grad_y.dtype}")
    if grad_y.device != x.device:
        raise RuntimeError(f"dqa_ext: grad_y must be on x's device ({x.device}), got {grad_y.device}")
    if not math.isfinite(grad_scale):
        raise RuntimeError(f"dqa_ext: grad_scale must be finite, got {grad_scale}")


def check_step_values(step, min_step=0.0):
    """CPU only: every step in use finite and > 0 (on CUDA a check would need a host sync)."""
    s = effective_step(step, min_step)
    bad = ~(torch.isfinite(s) & (s > 0)).reshape(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        how, hint = (" (as max(|step|, min_step))", LEARNED_STEP_HINT) if min_step > 0 else ("", "")
        raise RuntimeError(f"dqa_ext: step must be finite and > 0{how}, got step[{i}] = "
                           f"{step.reshape(-1)[i].item()}{hint}")


# A learned step that is NaN or inf was written by an optimizer step (csrc/dqa_args.cpp says the same).
LEARNED_STEP_HINT = ("; a learned step becomes NaN or inf after a training step whose input, loss or gradients "
                     "had NaN or inf values (torch.autograd.detect_anomaly() finds where): reload a checkpoint "
                     "or re-initialise the steps (dqa_ext.calibrate)")


def sum_but(t, dim):
    """Sum over every dim but `dim` (torch reads an empty dim list as "all dims": avoid it)."""
    others = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=others) if others else t


def _step_view(x, step, dim):
    """step broadcast against x: one value, or one per channel along dim."""
    shape = [1] * x.dim()
    if step.numel() != 1:
        shape[dim] = -1
    return step.reshape(shape)


def _prepare(x, step, qmin, qmax, channel_dim, min_step):
    dim = check_args(x, step, qmin, qmax, channel_dim, min_step)
    # A value check is data-dependent: under torch.compile the reference gives NaN for a bad step
    # instead, as the CUDA kernels do.
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        check_step_values(step, min_step)
    return dim


def step_in_use(x, step, dim, min_step):
    """The step broadcast against x, as the kernels load it: checked_step(effective_step)."""
    return checked_step(_step_view(x, effective_step(step, min_step), dim))


# --- the per-element math (csrc/dqa_math.h) ---

def rne(v):
    return torch.round(v)  # half to even


def select(c, a, b):
    return torch.where(c, a, b)


def effective_step(s, min_step):
    if not min_step > 0:
        return s
    a = select(s < 0, -s, s)
    return select(a < min_step, min_step, a)


def effective_step_grad(s, min_step):
    if not min_step > 0:
        return torch.ones_like(s)
    return select((s >= min_step) | (s <= -min_step), select(s > 0, 1.0, -1.0), 0.0)


def checked_step(s):
    return select((s > 0) & (s <= FLT_MAX), s, math.nan)


def scaled(x, s):
    return x / s


def quantize(v, s, qmin, qmax):
    q = rne(v)
    q = select(q < qmin, qmin, q)
    q = select(q > qmax, qmax, q)
    return q * s


def grad_input(v, dy, s, qmin, qmax):
    return select((v > qmin) & (v < qmax), dy, s * 0.0)


def cast(t, dtype):
    """The float32 result in x's dtype. A no-op .to() is skipped: at the end of an
    autograd.Function's forward, torch 2.11's torch.compile gives that function zero gradients."""
    return t if t.dtype == dtype else t.to(dtype)


def grad_step_term(v, qmin, qmax):
    return select(v <= qmin, float(qmin), select(v >= qmax, float(qmax), rne(v) - v))


# --- the ops: the math without checks (also Inductor's decompositions, dqa_ext/ops.py), then
# the checked forms ---

def forward_math(x, step, qmin, qmax, dim, min_step):
    s = step_in_use(x, step, dim, min_step)
    return cast(quantize(scaled(x.float(), s), s, float(qmin), float(qmax)), x.dtype)


def backward_math(grad_y, x, step, qmin, qmax, dim, grad_scale, need_step_grad, min_step,
                  accumulate=torch.float64):
    """(dx, dstep); dstep's terms are summed in `accumulate`."""
    s = step_in_use(x, step, dim, min_step)
    v = scaled(x.float(), s)
    dy = grad_y.float()
    dx = cast(grad_input(v, dy, s, float(qmin), float(qmax)), x.dtype)
    if not need_step_grad:
        return dx, step.new_empty(0)
    terms = (dy * grad_step_term(v, qmin, qmax)).to(accumulate)
    total = terms.sum() if step.numel() == 1 else sum_but(terms, dim)
    dstep = (grad_scale * total).float().reshape(step.shape)
    return dx, (dstep * effective_step_grad(step, min_step) if min_step > 0 else dstep)


def fake_quantize_forward(x, step, qmin, qmax, channel_dim=1, grad_scale=1.0, min_step=0.0):
    dim = _prepare(x, step, qmin, qmax, channel_dim, min_step)
    return forward_math(x, step, qmin, qmax, dim, min_step)


def fake_quantize_backward(grad_y, x, step, qmin, qmax, channel_dim=1, grad_scale=1.0,
                           need_step_grad=True, min_step=0.0):
    """(dx, dstep); dstep is summed in float64 and is empty when need_step_grad is False."""
    dim = _prepare(x, step, qmin, qmax, channel_dim, min_step)
    check_backward_args(grad_y, x, grad_scale)
    return backward_math(grad_y, x, step, qmin, qmax, dim, grad_scale, need_step_grad, min_step)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(x, step, qmin, qmax, channel_dim, grad_scale, min_step):
        return fake_quantize_forward(x, step, qmin, qmax, channel_dim, grad_scale, min_step)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, step, qmin, qmax, channel_dim, grad_scale, min_step = inputs
        ctx.save_for_backward(x, step)
        ctx.args = (qmin, qmax, channel_dim, grad_scale)
        ctx.min_step = min_step

    @staticmethod
    def backward(ctx, grad_y):
        x, step = ctx.saved_tensors
        dx, dstep = fake_quantize_backward(grad_y, x, step, *ctx.args, ctx.needs_input_grad[1],
                                           ctx.min_step)
        # Under create_graph=True these plain-PyTorch formulas are differentiated again (double
        # backward of the straight-through surrogate); the extension's kernels refuse that instead.
        return dx, (dstep if ctx.needs_input_grad[1] else None), None, None, None, None, None


def fake_quantize(x, step, qmin, qmax, channel_dim=1, grad_scale=1.0, min_step=0.0):
    """Differentiable fake quantization on the reference path (explicit backward formulas)."""
    return _FakeQuantize.apply(x, step, qmin, qmax, channel_dim, grad_scale, min_step)
