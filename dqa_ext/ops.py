"""Fake (meta) and autograd registrations for the extension's ops, so that eager mode,
torch.compile and torch.library.opcheck all work. Imported once the library is loaded."""

import torch

from . import reference


@torch.library.register_fake("dqa_ext::fake_quantize")
def _fake_quantize_fake(x, step, qmin, qmax, channel_dim, grad_scale=1.0):
    reference.check_args(x, step, qmin, qmax, channel_dim)
    return torch.empty_like(x)  # keeps x's memory format, as the kernels do


@torch.library.register_fake("dqa_ext::fake_quantize_backward")
def _fake_quantize_backward_fake(grad_y, x, step, qmin, qmax, channel_dim, grad_scale,
                                 need_step_grad):
    reference.check_args(x, step, qmin, qmax, channel_dim)
    reference.check_backward_args(grad_y, x, grad_scale)
    dstep = step.new_empty(step.shape) if need_step_grad else step.new_empty(0)
    return torch.empty_like(x), dstep


def _setup_context(ctx, inputs, output):
    x, step, qmin, qmax, channel_dim, grad_scale = inputs
    ctx.save_for_backward(x, step)
    ctx.args = (qmin, qmax, channel_dim, grad_scale)


def _backward(ctx, grad_y):
    x, step = ctx.saved_tensors
    qmin, qmax, channel_dim, grad_scale = ctx.args
    need_step_grad = ctx.needs_input_grad[1]
    dx, dstep = torch.ops.dqa_ext.fake_quantize_backward(
        grad_y, x, step, qmin, qmax, channel_dim, grad_scale, need_step_grad)
    dx, dstep = _no_second_derivative(dx, dstep if need_step_grad else None)
    return dx, dstep, None, None, None, None


_NO_DOUBLE_BACKWARD = (b"dqa_ext: the extension's fake_quantize backward is not differentiable, so double "
                       b"backward (create_graph=True, gradient penalties, hessians) is not supported on it; "
                       b"DQA_EXT_BACKEND=reference (dqa_ext.set_backend('reference')) computes it in plain PyTorch")


def _no_second_derivative(*grads):
    """The backward's results, raising a clear error if differentiated again (under create_graph=True)
    instead of silently dropping the second-order terms, as torch's once_differentiable does."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    keep = [g for g in grads if g is not None]
    err = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, len(keep))
    raised = iter(err(*[g.detach().requires_grad_() for g in keep]))
    return tuple(None if g is None else next(raised) for g in grads)


torch.library.register_autograd("dqa_ext::fake_quantize", _backward, setup_context=_setup_context)
