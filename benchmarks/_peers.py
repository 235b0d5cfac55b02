"""The implementations a benchmark times, each with its parity check against dqa_ext.reference.

build(spec, inputs) returns (fn, check): fn() runs the timed pass once and returns its outputs;
check(out) asserts that those outputs agree with the reference (within the implementation's own
convention) and returns notes on where conventions differ: a list of (topic, detail), or None.
"""

import torch

from _cases import QMAX, QMIN, TENSORS_MOVED

# Each case compiles a few graphs of the same function (per shape, layout, requires_grad); the
# default limit of 8 would silently fall back to eager after the eighth.
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
    torch._dynamo.config.fail_on_recompile_limit_hit = True


# --- the reference as a user writes it by hand (eager autograd through PyTorch ops) ---

class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times g backward: LSQ's step-gradient scale. (lsq-net's detach
    trick (s - s*g).detach() + s*g changes s by an ulp, which would break bitwise parity.)"""

    @staticmethod
    def forward(s, g):
        return s.view_as(s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.g = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def lsq_by_hand(x, step, shape, qmin, qmax, g):
    """zhutmost/lsq-net's LsqQuan.forward: clamp(x / s), round with a straight-through estimator,
    times s. Half inputs are divided in float32 (type promotion with the float32 step)."""
    s = _GradScale.apply(step, g).view(shape)
    v = torch.clamp(x / s, qmin, qmax)
    v = (v.round() - v).detach() + v  # round_pass: forward rne(v), backward identity
    return (v * s).to(x.dtype)


_compiled = None


def compiled_lsq():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(lsq_by_hand, dynamic=False)
    return _compiled


# --- assertions ---

def assert_equal(got, want, what):
    if torch.equal(got, want):
        return
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    bad = (got != want) & ~(got.isnan() & want.isnan())
    n = int(bad.sum())
    i = int(bad.reshape(-1).nonzero()[0]) if n else 0
    raise AssertionError(f"{what}: {n} of {got.numel()} elements differ; first at flat index {i}: "
                         f"{got.reshape(-1)[i].item()} != {want.reshape(-1)[i].item()}")


def assert_close(got, want, tol, what):
    err = (got.float() - want.float()).abs()
    bad = ~(err <= tol)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} beyond tolerance; first at "
                             f"{i}: {got.reshape(-1)[i].item()} vs {want.reshape(-1)[i].item()} "
                             f"(tol {torch.as_tensor(tol).expand_as(err).reshape(-1)[i].item():.3g})")


def _rtol(dtype):
    """A few ulps: (dy*s)/s is not bitwise dy, and a half dx is rounded from a float32 one."""
    return {torch.float32: 4e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]


def _step_grad_checker(inp, what):
    _, _, ref_ds, tol = inp.reference()

    def check(ds):
        assert_close(ds.reshape(ref_ds.shape), ref_ds, tol, f"{what} dstep")
    return check


# --- dqa_ext ---

def _ext(spec, inp):
    import dqa_ext
    from dqa_ext import _backend

    if not _backend.BUILT_FOR.get(inp.case.device, False):
        raise RuntimeError(f"dqa_ext has no {inp.case.device} kernels in this build: {dqa_ext.backend_info()}")
    ops = torch.ops.dqa_ext
    x, s, dy, g = inp.x, inp.step, inp.dy, inp.grad_scale
    qmin, qmax, cd = inp.args()
    ref_y, ref_dx, _, _ = inp.reference()
    check_ds = _step_grad_checker(inp, "ext")
    p = spec.pass_
    if p == "fwd":
        return (lambda: ops.fake_quantize(x, s, qmin, qmax, cd)), (lambda y: assert_equal(y, ref_y, "ext y"))
    if p in ("bwd_step", "bwd_nostep"):
        need = p == "bwd_step"

        def check(out):
            dx, ds = out
            assert_equal(dx, ref_dx, "ext dx")
            if need:
                check_ds(ds)
            else:
                assert ds.numel() == 0, "ext: need_step_grad=False must skip the step gradient"
        return (lambda: ops.fake_quantize_backward(dy, x, s, qmin, qmax, cd, g, need)), check
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()

    def fwdbwd():  # the public differentiable API, as a training step calls it
        y = dqa_ext.functional.fake_quantize(xr, sr, qmin, qmax, cd, g)
        return (y, *torch.autograd.grad(y, (xr, sr), dy))

    def check(out):
        y, dx, ds = out
        assert_equal(y, ref_y, "ext y")
        assert_equal(dx, ref_dx, "ext dx")
        check_ds(ds)
    return fwdbwd, check


# --- the reference written by hand, eager or compiled ---

def _by_hand(spec, inp, fn, name):
    x, s, dy, g = inp.x, inp.step, inp.dy, inp.grad_scale
    qmin, qmax, _ = inp.args()
    shape = tuple(inp.step_view().shape)
    ref_y, ref_dx, _, _ = inp.reference()
    check_ds = _step_grad_checker(inp, name)
    # lsq-net's clamp passes the gradient at v == qmin and v == qmax exactly (ours does not):
    # compare dx elsewhere.
    off_edge = inp.memo("off_edge", lambda: _off_edge(x.float() / inp.step_view(), qmin, qmax))
    rtol = _rtol(x.dtype)

    def check_dx(dx):
        tol = ref_dx.float().abs() * rtol
        assert_close(torch.where(off_edge, dx, 0), torch.where(off_edge, ref_dx, 0), tol, f"{name} dx")
        n = int((~off_edge).sum())
        return [("dx at v exactly qmin or qmax: its clamp passes dy (not compared)",
                 f"{n} of {x.numel()} elements")] if n else None

    p = spec.pass_
    if p == "fwd":
        return (lambda: fn(x, s, shape, qmin, qmax, g)), (lambda y: assert_equal(y, ref_y, f"{name} y"))
    xr = x.clone().requires_grad_()
    sr = s.clone().requires_grad_(p != "bwd_nostep")
    if p in ("bwd_step", "bwd_nostep"):
        y = fn(xr, sr, shape, qmin, qmax, g)  # the graph, kept for every timed backward
        wrt = (xr, sr) if p == "bwd_step" else (xr,)

        def check(out):
            assert_equal(y, ref_y, f"{name} y")
            if p == "bwd_step":
                check_ds(out[1])
            return check_dx(out[0])
        return (lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)), check

    def fwdbwd():
        y = fn(xr, sr, shape, qmin, qmax, g)
        return (y, *torch.autograd.grad(y, (xr, sr), dy))

    def check(out):
        y, dx, ds = out
        assert_equal(y, ref_y, f"{name} y")
        check_ds(ds)
        return check_dx(dx)
    return fwdbwd, check


def _off_edge(v, qmin, qmax):
    return (v != qmin) & (v != qmax)


def _eager(spec, inp):
    return _by_hand(spec, inp, lsq_by_hand, "eager")


def _compile(spec, inp):
    return _by_hand(spec, inp, compiled_lsq(), "compile")


# --- PyTorch's learnable fake quantization (quant_min=0, zero point 0) ---

def _torch_fq(spec, inp):
    x, s, dy, g = inp.x, inp.step, inp.dy, inp.grad_scale
    qmin, qmax, cd = inp.args()
    per_channel = s.numel() != 1
    z = torch.zeros_like(s)
    if per_channel:
        def fq(xx, ss):
            return torch._fake_quantize_learnable_per_channel_affine(xx, ss, z, cd, qmin, qmax, g)

        def fq_bwd():
            return torch.ops.aten._fake_quantize_learnable_per_channel_affine_backward(
                dy, x, s, z, cd, qmin, qmax, g)
    else:
        def fq(xx, ss):
            return torch._fake_quantize_learnable_per_tensor_affine(xx, ss, z, qmin, qmax, g)

        def fq_bwd():
            return torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
                dy, x, s, z, qmin, qmax, g)

    own = inp.memo("torch_fq", lambda: _torch_fq_convention(inp))
    ref_y, ref_dx, ref_ds, _ = inp.reference()

    def check_y(y):
        assert_equal(y, own["y"], "torch_fq y (its own convention, x * (1/s))")
        # Ours divides, theirs multiplies by 1/s: v can round differently at a half-integer.
        differ = y != ref_y
        n = int(differ.sum())
        assert n <= max(8, x.numel() // 10_000), f"torch_fq y differs from ours in {n} elements"
        if n:
            step_of = inp.step_view().expand_as(x).float()
            gap = (y.float() - ref_y.float()).abs()[differ] / step_of[differ]
            assert bool(((gap - 1).abs() < 1e-2).all()), "torch_fq y: differences other than one step"
        return [("y one step from ours where x*(1/s) and x/s round differently",
                 f"{n} of {x.numel()} elements")] if n else None

    def check_grads(dx, ds):
        assert_equal(dx, own["dx"], "torch_fq dx (its own convention: mask on round(v))")
        assert_equal(torch.where(own["agree"], dx, 0), torch.where(own["agree"], ref_dx, 0),
                     "torch_fq dx vs ours away from (-s/2, 0] and [qmax*s, (qmax+1/2)*s)")
        assert_close(ds.reshape(s.shape), own["ds"], own["ds_tol"], "torch_fq dscale (its own convention)")
        n = int((~own["agree"]).sum())
        rel = float((ds.reshape(s.shape) - ref_ds).abs().max() / ref_ds.abs().max().clamp_min(1e-30))
        return [("dx differs from ours in its bands v in [-1/2, 0] and [qmax, qmax+1/2)",
                 f"{n} of {x.numel()} elements ({n / x.numel():.1%})"),
                ("dscale differs from ours (t(v) in those bands)",
                 f"max |difference| {rel:.1%} of max |dstep|")]

    p = spec.pass_
    if p == "fwd":
        return (lambda: fq(x, s)), check_y
    if p in ("bwd_step", "bwd_nostep"):
        # It has one backward, which always computes dscale (and dzero_point).
        return fq_bwd, (lambda out: check_grads(out[0], out[1]))
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()

    def fwdbwd():
        y = fq(xr, sr)
        return (y, *torch.autograd.grad(y, (xr, sr), dy))

    def check(out):
        return (check_y(out[0]) or []) + check_grads(out[1], out[2])
    return fwdbwd, check


def _torch_fq_convention(inp):
    """PyTorch's learnable fake quantization written out (FakeQuantPerChannelAffine.cpp and its CPU
    kernels, zero point 0): v' = x * (1/s); xq = rne(v'); dx = dy if qmin <= xq <= qmax;
    per-element dscale = g*dy*(qmin if xq < qmin, qmax if xq > qmax, (clamp(xq)*s - x)/s otherwise)."""
    x, dy, g = inp.x.float(), inp.dy.float(), inp.grad_scale
    s = inp.step_view()
    vp = x * (1.0 / s)
    xq = torch.round(vp)
    y = (xq.clamp(QMIN, QMAX) * s).to(inp.x.dtype)
    inside = (xq >= QMIN) & (xq <= QMAX)
    dx = torch.where(inside, dy, 0.0).to(inp.x.dtype)
    term = torch.where(xq < QMIN, float(QMIN), torch.where(xq > QMAX, float(QMAX),
                                                           (xq.clamp(QMIN, QMAX) * s - x) * (1.0 / s)))
    elem = (dy * term * g).double()
    dims = [d for d in range(x.dim()) if d != 1]
    per = (lambda t: t.sum()) if inp.step.numel() == 1 else (lambda t: t.sum(dim=dims))
    ds = per(elem).float().reshape(inp.step.shape)
    ds_tol = per(elem.abs()).float().reshape(inp.step.shape) * 1e-4 + 1e-6
    v = x / s
    band = ((v > -0.5 - 1e-3) & (v <= 1e-3)) | ((v >= QMAX - 1e-3) & (v < QMAX + 0.5 + 1e-3))
    return {"y": y, "dx": dx, "ds": ds, "ds_tol": ds_tol, "agree": ~band}


# --- the floor and the ceiling ---

def _relu(spec, inp):
    x, dy = inp.x, inp.dy
    want_y, want_dx = inp.memo("relu", lambda: (torch.where(x > 0, x, 0), torch.where(x > 0, dy, 0)))
    p = spec.pass_
    if p == "fwd":
        return (lambda: torch.relu(x)), (lambda y: assert_equal(y, want_y, "relu y"))
    if p == "bwd":
        y = torch.relu(x)
        return (lambda: torch.ops.aten.threshold_backward(dy, y, 0)), (lambda dx: assert_equal(dx, want_dx, "relu dx"))
    xr = x.clone().requires_grad_()

    def fwdbwd():
        y = torch.relu(xr)
        return y, torch.autograd.grad(y, xr, dy)[0]

    def check(out):
        assert_equal(out[0], want_y, "relu y")
        assert_equal(out[1], want_dx, "relu dx")
    return fwdbwd, check


def _copy(spec, case):
    """dst.copy_(src), moving the bytes of the pass: 2 tensors -> numel elements copied, etc."""
    n = TENSORS_MOVED[spec.pass_] * case.numel // 2
    src = torch.randn(n, device=case.device).to(case.dtype)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), (lambda out: assert_equal(out, src, "copy"))


BUILDERS = {"ext": _ext, "eager": _eager, "compile": _compile, "torch_fq": _torch_fq, "relu": _relu}


def build(spec, inputs):
    if spec.impl == "copy":
        return _copy(spec, spec.case)
    return BUILDERS[spec.impl](spec, inputs)
