"""Differentiable quantized activations; each call runs the extension's fused kernels where they
are built for the tensor's device, else the pure-PyTorch reference."""

import torch

from . import _backend, reference


def fake_quantize(x, step, qmin, qmax, channel_dim=1, grad_scale=1.0):
    """y = clamp(round_half_even(x / step), qmin, qmax) * step, differentiable in x and step.

    step: float32, one element (per-tensor) or x.shape[channel_dim] elements (per-channel).
    Backward: straight-through dx inside (qmin, qmax); LSQ's step gradient times grad_scale.
    """
    reference.check_level_types(qmin, qmax)
    if _backend.use_extension(x.device.type):
        return torch.ops.dqa_ext.fake_quantize(x, step, qmin, qmax, channel_dim, float(grad_scale))
    return reference.fake_quantize(x, step, qmin, qmax, channel_dim, grad_scale)


def check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"dqa_ext: bits must be an integer in 1..8, got {bits!r}")


def quantized_relu(x, step, bits, channel_dim=1, grad_scale=1.0):
    """The DQA activation: fake quantization onto the 2**bits levels 0, step, ..., (2**bits-1)*step."""
    check_bits(bits)
    return fake_quantize(x, step, 0, 2**bits - 1, channel_dim, grad_scale)
