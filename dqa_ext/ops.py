"""Python registrations for the extension's ops (the schemas, kernels and autograd are C++):
fake (meta) kernels for torch.compile, torch.export and torch.library.opcheck, and Inductor
decompositions, so that a compiled model's quantizer fuses with its neighbours (BatchNorm's
epilogue, a residual add) as nn.ReLU does, instead of being an opaque extern call. Eager calls
keep the fused kernels. Imported once the library is loaded."""

import importlib.abc
import importlib.machinery
import sys

import torch

from . import reference


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


_INDUCTOR_DECOMPOSITIONS = "torch._inductor.decomposition"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a function on a module right after its first import. Importing Inductor costs more
    than a second, so dqa_ext registers its decompositions when torch.compile imports it."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, fn = spec.loader, self.fn

        def exec_module(module):
            type(loader).exec_module(loader, module)
            fn(module)

        loader.exec_module = exec_module  # this spec's loader object only
        return spec


def _when_imported(name, fn):
    if name in sys.modules:
        fn(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, fn))


_when_imported(_INDUCTOR_DECOMPOSITIONS, _register_inductor_decompositions)
