"""Extension-vs-reference comparisons shared by the tests."""

import torch

from dqa_ext import reference

U = 2.0**-24  # float32 unit roundoff


def bitwise_equal(a, b):
    """Same dtype, shape and bits (NaN payloads aside: NaN matches NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a, b = a.float(), b.float()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    # +0 and -0 compare equal; check signs too so the bits match.
    same &= (torch.signbit(a) == torch.signbit(b)) | torch.isnan(a)
    bad = (~same).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} elements differ, first at {bad[0].tolist()}: {a[tuple(bad[0])]} vs {b[tuple(bad[0])]}"


def step_grad_tolerance(dy, x, step, qmin, qmax, dim, grad_scale, min_step=0.0):
    """Float32 summation error bound of dstep against the float64 reference sum: float32 partial
    sums of at most 1024 terms per lane plus a 16-lane reduction (the CPU kernel flushes its
    accumulators into double that often; a CUDA thread flushes its float32 sum into double every
    1024 terms and the rest of the reduction is in double), then one rounding of the result."""
    s = reference.step_in_use(x, step, dim % x.dim(), min_step)
    v = reference.scaled(x.float(), s)
    terms = (dy.float() * reference.grad_step_term(v, qmin, qmax)).double().abs()
    if step.numel() == 1:
        mass, count = terms.sum().reshape(1), x.numel()
    else:
        mass, count = reference.sum_but(terms, dim % x.dim()), x.numel() // max(1, step.numel())
    return (abs(grad_scale) * min(count, 1100) * U * mass + 1e-30).reshape(step.shape)


def check_parity(x, step, qmin, qmax, dim, grad_scale=1.0, dy=None, need_step_grad=True, min_step=0.0):
    """Forward and dx bitwise equal to the reference; dstep within summation error."""
    ops = torch.ops.dqa_ext
    y = ops.fake_quantize(x, step, qmin, qmax, dim, grad_scale, min_step)
    bitwise_equal(y, reference.fake_quantize_forward(x, step, qmin, qmax, dim, grad_scale, min_step))
    if dy is None:
        dy = torch.randn(x.shape, dtype=torch.float32, device=x.device).to(x.dtype)
    dx, ds = ops.fake_quantize_backward(dy, x, step, qmin, qmax, dim, grad_scale, need_step_grad, min_step)
    dxr, dsr = reference.fake_quantize_backward(dy, x, step, qmin, qmax, dim, grad_scale, need_step_grad,
                                                min_step)
    bitwise_equal(dx, dxr)
    if not need_step_grad:
        assert ds.numel() == 0
        return y, dx, ds
    assert ds.shape == step.shape and ds.dtype == torch.float32
    tol = step_grad_tolerance(dy, x, step, qmin, qmax, dim, grad_scale, min_step)
    finite = torch.isfinite(dsr)
    assert torch.equal(torch.isnan(ds), torch.isnan(dsr))
    err = (ds.double() - dsr.double()).abs()
    assert bool((err[finite] <= tol[finite]).all()), f"dstep error {err.max()} > tolerance {tol.min()}"
    return y, dx, ds
