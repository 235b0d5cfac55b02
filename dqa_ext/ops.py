"""Python registrations for the extension's ops (the schemas, kernels and autograd are C++):
fake (meta) kernels for torch.compile, torch.export and torch.library.opcheck, and Inductor
decompositions, so that a compiled model's quantizer fuses with its neighbours (BatchNorm's
epilogue, a residual add) as nn.ReLU does, instead of being an opaque extern call. Eager calls
keep the fused kernels. Imported once the library is loaded."""

import torch

from . import reference
from ._after_import import after_import


@torch.library.register_fake("dqa_ext::fake_quantize")
def _fake_quantize_fake(x, step, qmin, qmax, channel_dim, grad_scale=1.0, min_step=0.0):
    reference.check_args(x, step, qmin, qmax, channel_dim, min_step)
    return torch.empty_like(x)  # keeps x's memory format, as the kernels do


@torch.library.register_fake("dqa_ext::fake_quantize_backward")
def _fake_quantize_backward_fake(grad_y, x, step, qmin, qmax, channel_dim, grad_scale,
                                 need_step_grad, min_step=0.0):
    reference.check_args(x, step, qmin, qmax, channel_dim, min_step)
    reference.check_backward_args(grad_y, x, grad_scale)
    dstep = step.new_empty(step.shape) if need_step_grad else step.new_empty(0)
    return torch.empty_like(x), dstep


# --- Inductor: the ops as pointwise code and one per-channel reduction ---
# The same math as the kernels (reference.forward_math/backward_math): IEEE division and round
# half to even, so the compiled y and dx are bitwise the eager ones; dstep is summed in float64
# in Inductor's order. torch.export and the ONNX exporter do not use Inductor's table: their
# graphs keep the op (dqa_ext/export.py translates it).

def _forward_decomposition(x, step, qmin, qmax, channel_dim, grad_scale=1.0, min_step=0.0):
    return reference.forward_math(x, step, qmin, qmax, channel_dim % x.dim(), min_step)


def _backward_decomposition(grad_y, x, step, qmin, qmax, channel_dim, grad_scale, need_step_grad,
                            min_step=0.0):
    return reference.backward_math(grad_y, x, step, qmin, qmax, channel_dim % x.dim(), grad_scale,
                                   need_step_grad, min_step)


def _register_inductor_decompositions(module):
    ops = torch.ops.dqa_ext
    table = module.decompositions
    for op, fn in ((ops.fake_quantize.default, _forward_decomposition),
                   (ops.fake_quantize_backward.default, _backward_decomposition)):
        if op not in table:
            module.register_decomposition([op])(fn)


# Importing Inductor costs more than a second: register when torch.compile imports it.
after_import("torch._inductor.decomposition", _register_inductor_decompositions)
