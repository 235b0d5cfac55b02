"""torch.library.opcheck on both ops, and torch.compile(fullgraph=True) of a small CNN."""

import pytest
import torch
from torch import nn

import dqa_ext

from conftest import DEVICES, needs_extension


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
