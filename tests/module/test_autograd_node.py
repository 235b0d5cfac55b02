"""The extension op's backward node (csrc/autograd/dqa_autograd.cpp) behaves as PyTorch's own
nodes do: made only when something needs a gradient, its saved tensors guarded against a second
backward and in-place changes, seen by saved-tensor hooks and checkpointing, gradients computed
only for the inputs asked for, compiled autograd supported, forward-mode AD refused in one line."""

import pytest
import torch

import dqa_ext
from dqa_ext import reference

from support.devices import needs_extension
from support.parity import bitwise_equal

pytestmark = pytest.mark.usefixtures("extension_backend")


@pytest.fixture
def extension_backend(backend):
    needs_extension("cpu")
    backend("extension")


def _inputs(step_grad=True, x_grad=True):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 4, 4, generator=g) * 2).requires_grad_(x_grad)
    step = torch.tensor([0.5, 0.25, 1.0]).requires_grad_(step_grad)
    return x, step


def _fq(x, step):
    return dqa_ext.functional.fake_quantize(x, step, 0, 3, 1, 0.5, 1e-6)


def _expected_grads(x, step, dy):
    return reference.fake_quantize_backward(dy, x.detach(), step.detach(), 0, 3, 1, 0.5, True, 1e-6)


def _close(dstep, expected):
    """dstep: the kernels' reduction order is not the reference's (float64) one."""
    torch.testing.assert_close(dstep, expected, rtol=1e-5, atol=1e-6)


def test_no_node_where_nothing_needs_a_gradient():
    x, step = _inputs()
    with_graph = _fq(x, step)
    assert with_graph.grad_fn is not None and with_graph.grad_fn.name() == "FakeQuantizeBackward"
    with torch.no_grad():
        y = _fq(x, step)
    assert y.grad_fn is None and not y.requires_grad
    bitwise_equal(y, with_graph.detach())
    with torch.inference_mode():
        assert _fq(x, step).grad_fn is None
    y = _fq(x.detach(), step.detach())
    assert y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("x_grad,step_grad", [(True, True), (True, False), (False, True)])
def test_gradients_go_to_the_inputs_that_require_them(x_grad, step_grad):
    x, step = _inputs(step_grad, x_grad)
    dy = torch.randn(x.shape)
    _fq(x, step).backward(dy)
    dx, dstep = _expected_grads(x, step, dy)
    assert (x.grad is not None) == x_grad and (step.grad is not None) == step_grad
    if x_grad:
        bitwise_equal(x.grad, dx)
    if step_grad:
        _close(step.grad, dstep)


def test_autograd_grad_computes_only_what_it_is_asked_for(monkeypatch):
    """torch.autograd.grad(inputs=[x]) (the attacks' input gradients) skips the step reduction."""
    x, step = _inputs()
    dy = torch.randn(x.shape)
    seen = []
    real = torch.ops.dqa_ext.fake_quantize_backward

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is real.default:
                seen.append(args[7])  # need_step_grad
            return func(*args, **(kwargs or {}))

    y = _fq(x, step)
    with Spy():
        (gx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        (gs,) = torch.autograd.grad(y, step, dy)
    dx, dstep = _expected_grads(x, step, dy)
    bitwise_equal(gx, dx)
    _close(gs, dstep)
    assert seen == [False, True] and x.grad is None and step.grad is None


def test_a_second_backward_and_an_input_changed_in_place_are_refused():
    x, step = _inputs()
    y = _fq(x, step)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    x2, step2 = _inputs()
    y = _fq(x2, step2)
    y.sum().backward(retain_graph=True)
    first = x2.grad.clone()
    y.sum().backward()
    bitwise_equal(x2.grad, 2 * first)
    leaf = x2.detach().clone().requires_grad_()
    base = leaf * 1.0
    y = _fq(base, step2)
    with torch.no_grad():
        base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_saved_tensor_hooks_and_checkpointing_see_the_saved_inputs():
    x, step = _inputs()
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _fq(x, step)
    assert sorted(packed) == sorted([x.shape, step.shape])
    dy = torch.randn(x.shape)
    y.backward(dy)
    dx, dstep = _expected_grads(x, step, dy)
    bitwise_equal(x.grad, dx)
    _close(step.grad, dstep)

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), dqa_ext.DQAReLU(2, num_channels=3, init_step=0.5))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    m(x).sum().backward()
    expected = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False).sum().backward()
    for a, b in zip([p.grad for p in m.parameters()] + [x.grad], expected):
        bitwise_equal(a, b)


def test_compiled_autograd_runs_the_node():
    from torch._dynamo import compiled_autograd

    x, step = _inputs()
    dy = torch.randn(x.shape)
    y = _fq(x, step)
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        y.backward(dy)
    dx, dstep = _expected_grads(x, step, dy)
    bitwise_equal(x.grad, dx)
    _close(step.grad, dstep)


def test_forward_mode_ad_is_refused_in_one_line():
    import torch.autograd.forward_ad as fwAD

    x, step = _inputs(step_grad=False, x_grad=False)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported by fake_quantize"):
            _fq(dual, step)
