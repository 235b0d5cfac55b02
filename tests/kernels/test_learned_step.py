"""A learned step inside the op: with min_step > 0 the kernels use max(|step|, min_step) per
channel and return the gradient with respect to the raw step (times sign(step) where
|step| >= min_step, else 0), as `step.abs().clamp_min(min_step)` followed by the op would."""

import pytest
import torch

import dqa_ext
from dqa_ext import reference

from support.devices import DEVICES, needs_extension
from support.parity import bitwise_equal, check_parity

MIN_STEP = 0.05
# Raw steps on every branch: positive, negative, inside (-min_step, min_step), zero, exactly
# +-min_step (in float32), large.
RAW = [0.5, -0.7, 0.01, -0.02, 0.0, MIN_STEP, -MIN_STEP, 3.0]


def raw_steps(device):
    return torch.tensor(RAW, dtype=torch.float32, device=device)


def inputs(device, dtype, layout, n=len(RAW)):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, n, 5, 7, generator=g) * 2).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_parity_with_min_step(device, dtype, layout):
    needs_extension(device)
    x = inputs(device, dtype, layout)
    check_parity(x, raw_steps(device), 0, 3, 1, grad_scale=0.3, min_step=MIN_STEP)
    check_parity(x, raw_steps(device), 0, 3, 1, need_step_grad=False, min_step=MIN_STEP)
    check_parity(x, torch.tensor([-0.3], device=device), -2, 5, 1, min_step=MIN_STEP)  # per-tensor


@pytest.mark.parametrize("device", DEVICES)
def test_same_as_abs_clamp_min_outside_the_op(device):
    """Forward and dx bitwise, dstep exactly, against autograd through abs and clamp_min."""
    needs_extension(device)
    x = inputs(device, torch.float32, "nchw").requires_grad_()
    raw = raw_steps(device).requires_grad_()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(device)
    y = torch.ops.dqa_ext.fake_quantize(x, raw, 0, 3, 1, 0.3, MIN_STEP)
    dx, dstep = torch.autograd.grad(y, (x, raw), dy)
    x2, raw2 = x.detach().requires_grad_(), raw.detach().requires_grad_()
    y2 = torch.ops.dqa_ext.fake_quantize(x2, raw2.abs().clamp_min(MIN_STEP), 0, 3, 1, 0.3, 0.0)
    dx2, dstep2 = torch.autograd.grad(y2, (x2, raw2), dy)
    bitwise_equal(y, y2)
    bitwise_equal(dx, dx2)
    # The sign factor is exact (-1, 0 or 1); where it is 0 the op may give -0.0 (0 * a negative
    # sum) where clamp_min's gradient is +0.0: equal as numbers.
    assert torch.equal(dstep, dstep2)
    assert dstep[4] == 0 and dstep[2] == 0 and dstep[3] == 0  # |step| < min_step: no gradient
    assert (dstep[1] * dstep2[1]) >= 0


def test_effective_step_reference():
    s = raw_steps("cpu")
    torch.testing.assert_close(reference.effective_step(s, MIN_STEP), s.abs().clamp_min(MIN_STEP), rtol=0, atol=0)
    grad = reference.effective_step_grad(s, MIN_STEP)
    assert grad.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 1.0, -1.0, 1.0]
    assert torch.isnan(reference.effective_step(torch.tensor([float("nan")]), MIN_STEP)).all()
    assert torch.equal(reference.effective_step(s, 0.0), s)  # a given step is used as it is


def test_bad_min_step_is_refused_by_both():
    needs_extension("cpu")
    x, s = torch.randn(2, 3), torch.rand(3) + 0.1
    for bad in (-1.0, float("nan"), float("inf"), 1e-60, 1e39):
        for call in (torch.ops.dqa_ext.fake_quantize, reference.fake_quantize_forward):
            with pytest.raises(RuntimeError, match="min_step must be 0 or a positive finite float32"):
                call(x, s, 0, 3, 1, 1.0, bad)


def test_negative_raw_step_is_an_error_only_without_min_step():
    needs_extension("cpu")
    x = torch.randn(2, 3)
    s = torch.tensor([0.5, -0.5, 0.2])
    torch.ops.dqa_ext.fake_quantize(x, s, 0, 3, 1, 1.0, MIN_STEP)
    with pytest.raises(RuntimeError, match=r"step must be finite and > 0, got step\[1\] = -0.5"):
        torch.ops.dqa_ext.fake_quantize(x, s, 0, 3, 1, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"as max\(\|step\|, min_step\)\), got step\[0\] = nan"):
        torch.ops.dqa_ext.fake_quantize(x, torch.tensor([float("nan"), 1.0, 1.0]), 0, 3, 1, 1.0, MIN_STEP)


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_module_passes_the_raw_step_to_the_op(device):
    """DQAReLU(mode='dynamic') runs one op with the raw step: no abs/clamp_min kernels around it."""
    needs_extension(device)
    m = dqa_ext.DQAReLU(2, num_channels=len(RAW), init_step=1.0, min_step=MIN_STEP).to(device)
    with torch.no_grad():
        m.step.copy_(raw_steps(device))
    x = inputs(device, torch.float32, "nchw").requires_grad_()
    with torch.profiler.profile() as prof:
        y = m(x)
        y.sum().backward()
    names = [e.name for e in prof.events()]
    assert "dqa_ext::fake_quantize" in names
    assert not any(n in names for n in ("aten::abs", "aten::clamp_min")), sorted(set(names))
    xd = x.detach()
    bitwise_equal(y, reference.fake_quantize_forward(xd, m.effective_step, 0, 3, 1))
    dx, dstep = reference.fake_quantize_backward(torch.ones_like(xd), xd, m.step.detach(), 0, 3, 1,
                                                 m._grad_scale(xd, 1), True, MIN_STEP)
    bitwise_equal(x.grad, dx)
    torch.testing.assert_close(m.step.grad, dstep, rtol=1e-5, atol=1e-6)
