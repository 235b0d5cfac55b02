"""torch.library.opcheck on both ops, and torch.compile(fullgraph=True) of a small CNN."""

import pytest
import torch
from torch import nn

import dqa_ext

from support.devices import DEVICES, needs_extension
from support.fresh import run_fresh
from support.parity import bitwise_equal, step_grad_tolerance


def opcheck_inputs(device):
    g = torch.Generator().manual_seed(0)
    x4 = torch.randn(2, 3, 5, 5, generator=g).to(device)
    out = []
    for x, dim in [(x4, 1), (x4.to(memory_format=torch.channels_last), 1), (torch.randn(4, 6, generator=g).to(device), -1)]:
        for per_channel in (True, False):
            step = (torch.rand(x.shape[dim] if per_channel else 1, generator=g) + 0.1).to(device)
            out.append((x, step, dim))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device):
    needs_extension(device)
    for x, step, dim in opcheck_inputs(device):
        for dtype in (torch.float32, torch.bfloat16):
            xx = x.to(dtype).detach().requires_grad_()
            torch.library.opcheck(torch.ops.dqa_ext.fake_quantize.default,
                                  (xx, step.detach().requires_grad_(), 0, 3, dim, 0.5))
            torch.library.opcheck(torch.ops.dqa_ext.fake_quantize.default, (xx, step, 0, 3, dim))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    needs_extension(device)
    for x, step, dim in opcheck_inputs(device):
        for need in (True, False):
            torch.library.opcheck(torch.ops.dqa_ext.fake_quantize_backward.default,
                                  (torch.randn_like(x), x, step, 0, 3, dim, 0.25, need))


class SmallCNN(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), dqa_ext.DQAReLU(2, mode, num_channels=8),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), dqa_ext.DQAReLU(3, mode, num_channels=8),
            nn.Flatten(), nn.Linear(8 * 7 * 7, 16), dqa_ext.DQAReLU(2, mode, num_channels=16, channel_dim=-1),
            nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def grads(model, x, y):
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    named = {n.removeprefix("_orig_mod."): p for n, p in model.named_parameters()}
    return out.detach(), {n: p.grad.clone() for n, p in named.items()}, x.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
@pytest.mark.parametrize("backend_name", ["extension", "reference"])
def test_compile_fullgraph_matches_eager(device, mode, backend_name, backend):
    if backend_name == "extension":
        needs_extension(device)
    backend(backend_name)
    torch.manual_seed(0)
    model = SmallCNN(mode).to(device)
    x = torch.rand(6, 1, 14, 14, device=device)
    y = torch.randint(0, 10, (6,), device=device)
    model(x)  # data-driven step initialisation happens eagerly, once
    compiled = torch.compile(model, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, g_e, dx_e = grads(model, xe, y)
    out_c, g_c, dx_c = grads(compiled, xc, y)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_c, dx_e, rtol=1e-4, atol=1e-6)
    assert g_c.keys() == g_e.keys()
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-6, msg=name)
    if mode == "dynamic":
        assert any(g_e[n].abs().sum() > 0 for n in g_e if n.endswith("step"))


# --- under torch.compile the ops decompose into code Inductor fuses (dqa_ext/ops.py) ---

def no_inductor_cache():
    """Inductor's on-disk caches key a graph by its ops, not by the decompositions registered for
    them: a test of today's decompositions must not read code compiled with other ones."""
    import torch._inductor.config

    return torch._inductor.config.patch(force_disable_caches=True)


def _op(x, step, min_step):
    return torch.ops.dqa_ext.fake_quantize(x, step, 0, 3, 1, 0.7, min_step)


def _dy_like(x):
    return torch.cos(torch.arange(x.numel(), device=x.device, dtype=torch.float32)).reshape(x.shape).to(x.dtype)


def _with_grads(fn, x, step, min_step):
    y = fn(x, step, min_step)
    return (y, *torch.autograd.grad(y, (x, step), _dy_like(y)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,min_step", [(torch.float32, 0.05)] + [
    pytest.param(d, m, marks=pytest.mark.slow)  # a compile each: the rest of the grid is slow
    for d in (torch.float32, torch.bfloat16, torch.float16) for m in (0.0, 0.05) if (d, m) != (torch.float32, 0.05)])
def test_compiled_op_is_bitwise_the_eager_op(device, dtype, min_step):
    """Inductor's code for the decomposed op: y and dx bitwise equal to the eager kernels (IEEE
    division, round half to even, the same clamp), NCHW and channels_last; dstep within float32
    summation error."""
    needs_extension(device)
    g = torch.Generator().manual_seed(5)
    step = (torch.rand(6, generator=g) + 0.05).to(device)
    if min_step:
        step = step * torch.tensor([1, -1, 1, -1, 1, 1.0], device=device)
        step[4] = 0.01  # under min_step
    step.requires_grad_()
    x = (torch.randn(3, 6, 5, 7, generator=g) * 3).to(device=device, dtype=dtype)
    for x in (x.clone(), x.to(memory_format=torch.channels_last)):
        x.requires_grad_()
        torch._dynamo.reset()
        eager = _with_grads(_op, x, step, min_step)
        with no_inductor_cache():
            compiled = _with_grads(torch.compile(_op, fullgraph=True), x, step, min_step)
        bitwise_equal(compiled[0], eager[0])
        bitwise_equal(compiled[1], eager[1])
        tol = step_grad_tolerance(_dy_like(x), x.detach(), step.detach(), 0, 3, 1, 0.7, min_step)
        assert bool(((compiled[2] - eager[2]).abs() <= tol + 1e-6 * eager[2].abs()).all()), (compiled[2], eager[2])


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_compiled_conv_bn_block_fuses_the_quantizer(mode):
    """No extern call for the quantizer in Inductor's code, forward or backward: it fuses into
    BatchNorm's kernels as nn.ReLU does."""
    needs_extension("cpu")
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          dqa_ext.DQAReLU(2, mode, num_channels=8, init_step=0.4))
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(block)

    def step():
        out = compiled(x)
        out.sum().backward()
        return out

    with no_inductor_cache():
        out, code = run_and_get_code(step)
    code = "\n".join(code)
    assert "fake_quantize" in code  # the kernel names say what they fused
    assert "ops.dqa_ext" not in code and "extern_kernels.dqa" not in code, "the quantizer is an extern call"
    bitwise_equal(out, block(x))


def test_import_leaves_inductor_unloaded_and_registers_when_it_loads():
    """Importing Inductor costs more than a second: dqa_ext registers its decompositions when
    torch.compile imports it, not at `import dqa_ext`."""
    code = ("import sys, torch, dqa_ext\n"
            "assert 'torch._inductor.decomposition' not in sys.modules, 'dqa_ext imported Inductor'\n"
            "import torch._inductor.decomposition as d\n"
            "ops = torch.ops.dqa_ext\n"
            "assert ops.fake_quantize.default in d.decompositions\n"
            "assert ops.fake_quantize_backward.default in d.decompositions\n")
    run_fresh(code)
