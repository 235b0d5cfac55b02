"""The math itself: the reference against an independent scalar reading of the spec, and the
extension against the reference on the edge values (0, k*s, ties, qmax*s, -s/2, one ulp either
side, NaN, +-inf, huge)."""

import math

import numpy as np
import pytest
import torch

from dqa_ext import reference

from support.devices import DEVICES, needs_extension
from support.parity import bitwise_equal, check_parity


def spec_scalar(x, s, qmin, qmax, dy):
    """The formulas of the README on one float32 value, with numpy scalars: (y, dx, t)."""
    x, s, dy = np.float32(x), np.float32(s), np.float32(dy)
    with np.errstate(all="ignore"):
        v = np.float32(x / s)
        q = np.rint(v)  # half to even
        if not np.isnan(q):
            q = min(max(q, np.float32(qmin)), np.float32(qmax))
        y = np.float32(q * s)
        dx = dy if (qmin < v < qmax) else np.float32(0)
        if np.isnan(v):
            t = np.float32("nan")
        elif v <= qmin:
            t = np.float32(qmin)
        elif v >= qmax:
            t = np.float32(qmax)
        else:
            t = np.float32(np.rint(v) - v)
    return y, dx, t


def edge_values(s, qmin, qmax):
    """Edges in units of s, with their float32 neighbours, plus the non-finite and huge ones."""
    s = torch.tensor(s, dtype=torch.float32)
    units = [0.0, -0.5, qmin - 0.5, qmax + 0.5, qmax, qmax + 3]
    units += [k for k in range(qmin - 1, qmax + 2)] + [k + 0.5 for k in range(qmin - 1, qmax + 1)]
    base = torch.tensor(units, dtype=torch.float32) * s
    up = torch.nextafter(base, torch.tensor(math.inf))
    down = torch.nextafter(base, torch.tensor(-math.inf))
    special = torch.tensor([math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-40, -1e-40, -0.0])
    return torch.cat([base, up, down, special])


QRANGES = [(0, 1), (0, 3), (0, 255), (-4, 3)]
STEPS = [1.0, 0.25, 0.1, 3.7, 1e-3]


@pytest.mark.parametrize("qmin,qmax", QRANGES)
@pytest.mark.parametrize("s", STEPS)
def test_reference_matches_scalar_spec(s, qmin, qmax):
    x = edge_values(s, qmin, qmax)
    dy = torch.linspace(-2, 2, x.numel())
    step = torch.tensor([s])
    y = reference.fake_quantize_forward(x, step, qmin, qmax, 0)
    dx, _ = reference.fake_quantize_backward(dy, x, step, qmin, qmax, 0, 1.0, False)
    sv = reference.checked_step(step)
    t = reference.grad_step_term(reference.scaled(x, sv), qmin, qmax)
    for i in range(x.numel()):
        ey, edx, et = spec_scalar(x[i].item(), s, qmin, qmax, dy[i].item())
        got = (y[i].item(), dx[i].item(), t[i].item())
        for name, a, b in zip(("y", "dx", "t"), got, (ey, edx, et)):
            assert (math.isnan(a) and math.isnan(b)) or a == b, f"{name}(x={x[i].item()!r}): {a} != {b}"


def test_spec_examples():
    """A few values worked by hand: ties go to even, NaN stays, infinities clamp."""
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, math.nan, math.inf, -math.inf, 7.0, 0.3])
    y = reference.fake_quantize_forward(x, torch.tensor([1.0]), 0, 3, 0)
    # rne(-0.5) is -0.0, which the clamp keeps (-0.0 < 0 is false): the output is -0.0.
    expected = torch.tensor([0.0, 2.0, 2.0, -0.0, math.nan, 3.0, 0.0, 3.0, 0.0])
    bitwise_equal(y, expected)
    dy = torch.ones_like(x)
    dx, ds = reference.fake_quantize_backward(dy[:4], x[:4], torch.tensor([1.0]), 0, 3, 0, 1.0, True)
    bitwise_equal(dx, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # t: 0.5 -> rne(0.5)-0.5 = -0.5; 1.5 -> 0.5; 2.5 -> -0.5; -0.5 (<= qmin) -> 0
    assert ds.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qmin,qmax", QRANGES)
@pytest.mark.parametrize("s", STEPS)
def test_extension_edges_bitwise(device, dtype, s, qmin, qmax):
    needs_extension(device)
    x = edge_values(s, qmin, qmax).to(dtype).to(device)
    # Long enough for the vector loops and their scalar tails, in several layouts of channels.
    x = x.repeat(3)[: 3 * x.numel() - 5]
    step = torch.tensor([s], device=device)
    dy = torch.linspace(-3, 3, x.numel(), device=device).to(dtype)
    check_parity(x, step, qmin, qmax, 0, grad_scale=0.5, dy=dy)
    check_parity(x, step, qmin, qmax, 0, dy=dy, need_step_grad=False)
    # The same values spread over channels with different steps, both channel layouts.
    n = x.numel() // 6 * 6
    steps = torch.tensor([s, 2 * s, s / 3], device=device)
    check_parity(x[:n].reshape(-1, 3), steps, qmin, qmax, 1, dy=dy[:n].reshape(-1, 3))
    check_parity(x[:n].reshape(3, -1), steps, qmin, qmax, 0, dy=dy[:n].reshape(3, -1))


@pytest.mark.parametrize("device", DEVICES)
def test_random_values_many_steps(device):
    needs_extension(device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 37, 29, generator=g) * 4).to(device)
    step = (torch.rand(37, generator=g) * 2 + 0.01).to(device)
    for qmin, qmax in QRANGES:
        check_parity(x, step, qmin, qmax, 1, grad_scale=0.1)
