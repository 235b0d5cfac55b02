"""Differentiable quantized activations; each call runs the extension's fused kernels where they
are built for the tensor's device, else the pure-PyTorch reference."""

import torch

from . import _backend, reference


def fake_quantize(x, step, qmin, qmax, channel_dim=1, grad_scale=1.0, min_step=0.0):
    """y = clamp(round_half_even(x / s), qmin, qmax) * s, differentiable in x and step.

    step: float32, one element (per-tensor: channel_dim is then ignored) or x.shape[channel_dim]
    elements (per-channel). s is step itself, or max(|step|, min_step) when min_step > 0 (a
    learned step, kept positive under any optimizer). qmin, qmax: integers (Python or numpy).
    Backward: straight-through dx inside (qmin, qmax); LSQ's step gradient times grad_scale.
    """
    reference.check_level_types(qmin, qmax)
    qmin, qmax = int(qmin), int(qmax)  # numpy integers as Python ints, as the op schema takes
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and not -x.dim() <= channel_dim < x.dim() \
            and isinstance(step, torch.Tensor) and step.numel() == 1:
        channel_dim = 0  # a per-tensor step has no channel axis: any channel_dim will do
    return _call(x, step, qmin, qmax, channel_dim, float(grad_scale), float(min_step))


# Module-level names for what every call checks: each attribute chain costs tens of nanoseconds in
# a per-call budget of microseconds.
_is_compiling = torch.compiler.is_compiling
_functorch_stack = torch._C._functorch.peek_interpreter_stack
_torch_function_mode = torch._C._is_torch_function_mode_enabled


def _call(x, step, qmin, qmax, channel_dim, grad_scale, min_step):
    """The op on checked Python arguments: the kernels, or the reference."""
    if not _backend.use_extension(_device_type(x)):
        return reference.fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step)
    if _is_compiling():
        return torch.ops.dqa_ext.fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step)
    if _functorch_stack() is not None:
        # torch.func (grad, vmap, jacrev...) runs the reference: the same math, as an
        # autograd.Function with setup_context, which functorch supports (the op's C++ autograd
        # it does not).
        return reference.fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step)
    if type(x) is torch.Tensor and not _torch_function_mode():
        # The same op through the extension's own binding: a few microseconds less per call.
        return _backend.C.fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step)
    return torch.ops.dqa_ext.fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale, min_step)


def _device_type(x):
    # x.device builds a torch.device object on every call: measurable in a per-call budget of
    # microseconds.
    return "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type


def check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"dqa_ext: bits must be an integer in 1..8, got {bits!r}")


def quantized_relu(x, step, bits, channel_dim=1, grad_scale=1.0, min_step=0.0):
    """The DQA activation: fake quantization onto the 2**bits levels 0, s, ..., (2**bits-1)*s."""
    check_bits(bits)
    return fake_quantize(x, step, 0, 2**bits - 1, channel_dim, grad_scale, min_step)
