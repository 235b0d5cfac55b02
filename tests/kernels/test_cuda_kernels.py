"""The CUDA kernels' own cases (they skip without a GPU): each names the kernel path it is for.
The layouts, dtypes, edge values, fuzz and accuracy tests of test_layouts.py and test_math.py run
on CUDA as well; these add what only the CUDA planner makes special: vector widths that follow
the pointers' alignment, a reduction order fixed by the shape, the channel loop over gridDim.y,
rows shorter than a vector, and 64-bit indexing in the backward."""

import pytest
import torch

from dqa_ext import reference

from support.devices import CUDA, needs_extension
from support.parity import bitwise_equal, check_parity, step_grad_tolerance

pytestmark = [pytest.mark.cuda, CUDA]
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.dqa_ext


@pytest.fixture(autouse=True)
def _cuda_kernels():
    needs_extension(DEV)


def data(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def steps(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) + 0.05).to(DEV)


def offset_view(t, offset):
    """t's values in a buffer that starts `offset` elements later than an allocation: a dense
    tensor whose pointer is aligned to the element only."""
    buf = torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


# (shape, channel_dim, memory format): the row path (NCHW; 7x7 at vector width 1 in the
# backward, tiles in the forward), the tiled path (channels_last, (N, C), rows of less than 32
# bytes: 2x2 with the separate finalize), per-tensor (passed with one step).
LAYOUTS = {
    "nchw_rows": ((4, 8, 16, 20), 1, torch.contiguous_format),
    "nchw_small_hw": ((4, 8, 7, 7), 1, torch.contiguous_format),
    "nchw_tiny_hw": ((4, 8, 2, 2), 1, torch.contiguous_format),
    "channels_last": ((4, 12, 9, 11), 1, torch.channels_last),
    "2d": ((301, 40), 1, torch.contiguous_format),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("offset", [1, 3])
def test_dstep_bitwise_equal_for_offset_view_and_clone(dtype, layout, per_channel, offset):
    """The partition of the dstep sum depends on (shape, dtype) only: a misaligned view (scalar
    loads) and its aligned clone (vector loads) give the same bits, and dx is bitwise equal."""
    shape, dim, fmt = LAYOUTS[layout]
    x = data(shape, dtype).contiguous(memory_format=fmt)
    dy = data(shape, dtype, seed=5).contiguous(memory_format=fmt)
    step = steps(shape[dim] if per_channel else 1)
    if fmt == torch.contiguous_format:
        xv, dyv = offset_view(x, offset), offset_view(dy, offset)
        assert xv.data_ptr() % 16 != 0
    else:  # keep channels_last: offset the storage of the permuted contiguous tensor
        perm = (0, 2, 3, 1)
        xv = offset_view(x.permute(perm).contiguous(), offset).permute(0, 3, 1, 2)
        dyv = offset_view(dy.permute(perm).contiguous(), offset).permute(0, 3, 1, 2)
        assert xv.is_contiguous(memory_format=torch.channels_last)
    dx_a, ds_a = ops.fake_quantize_backward(dy, x, step, 0, 3, dim, 0.5, True)
    for xx, dd in ((xv, dyv), (x, dyv), (xv, dy)):
        dx_b, ds_b = ops.fake_quantize_backward(dd, xx, step, 0, 3, dim, 0.5, True)
        bitwise_equal(dx_b, dx_a)
        bitwise_equal(ds_b, ds_a)
    check_parity(xv, step, 0, 3, dim, grad_scale=0.5, dy=dyv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dy_misaligned_x_aligned(dtype):
    """Elementwise width 1 for grad_x alone (dy sets it), scalar loads in the backward."""
    x = data((3, 16, 40), dtype)
    dy = offset_view(data((3, 16, 40), dtype, seed=2), 1)
    check_parity(x, steps(16), 0, 3, 1, dy=dy)
    check_parity(x, steps(16), 0, 3, 1, dy=dy, need_step_grad=False)
    check_parity(offset_view(x, 2), steps(16), -4, 3, 1, dy=data(x.shape, dtype, seed=3))


def test_many_channels_loop_over_grid_y():
    """C = 70000 > 65535 = max gridDim.y: the row kernel's blocks take several channels."""
    x = data((2, 70000, 64), torch.float32)
    check_parity(x, steps(70000), 0, 3, 1, grad_scale=0.25)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_n_by_100001_bfloat16(per_channel):
    """(N, C) with odd C: the tiled kernel at vector width 1; per-tensor: an odd flat tensor."""
    x = data((6, 100001), torch.bfloat16)
    check_parity(x, steps(100001 if per_channel else 1), 0, 7, 1, grad_scale=0.5)


@pytest.mark.parametrize("offset", [0, 1])
def test_float16_inner_130(offset):
    """Rows of 260 bytes: the row path at vector width 2 (130 = 2 * 65); the elementwise pass at
    width 8 crosses rows inside a vector."""
    x = offset_view(data((5, 8, 130), torch.float16), offset)
    check_parity(x, steps(8), 0, 3, 1, grad_scale=0.5)
    check_parity(x, steps(8), 0, 3, 1, need_step_grad=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 7, 4095, 4097, 2**20 + 3])
def test_partial_last_vector(dtype, numel):
    """The last vector of the flat tensor is partial (forward, grad_x, per-tensor backward)."""
    x = data((numel,), dtype)
    check_parity(x, steps(1), 0, 3, 0)
    check_parity(x, steps(1), 0, 3, 0, need_step_grad=False)


def test_empty_writes_zero_dstep():
    x = torch.empty((0, 5, 3), device=DEV)
    dx, ds = ops.fake_quantize_backward(x, x, steps(5), 0, 3, 1, 1.0, True)
    assert dx.shape == x.shape and torch.equal(ds, torch.zeros(5, device=DEV))


def test_cuda_graph_capture():
    """No host sync on the hot path: forward + backward capture into a CUDA graph and replay."""
    x, dy, step = data((8, 16, 32, 32), torch.float16), data((8, 16, 32, 32), torch.float16, 4), steps(16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy loading)
        ops.fake_quantize(x, step, 0, 3, 1)
        ops.fake_quantize_backward(dy, x, step, 0, 3, 1, 1.0, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.fake_quantize(x, step, 0, 3, 1)
        dx, ds = ops.fake_quantize_backward(dy, x, step, 0, 3, 1, 1.0, True)
    graph.replay()
    torch.cuda.synchronize()
    bitwise_equal(y, ops.fake_quantize(x, step, 0, 3, 1))
    dx2, ds2 = ops.fake_quantize_backward(dy, x, step, 0, 3, 1, 1.0, True)
    bitwise_equal(dx, dx2)
    bitwise_equal(ds, ds2)


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


# x, dy and dx of 2**31 + a few rows' elements in bfloat16: about 12.1 GiB.
BIG = {
    "tiled_n_by_c": ((2**31 // 4144 + 2, 4144), 1, True),
    "rows_per_channel": ((1025, 8, 2**18), 1, True),
    "rows_per_tensor": ((2**31 // 4144 + 2, 4144), 1, False),
}


@pytest.mark.parametrize("case", sorted(BIG))
def test_backward_over_2_31_elements(case):
    """64-bit indexing in the backward with dstep: dy is zero except in a few rows (the first,
    both sides of element 2**31, the last), so dstep is those rows' sum, checked against the
    reference on those rows; dx is checked bitwise there and zero elsewhere sampled."""
    shape, dim, per_channel = BIG[case]
    if _free_gib() < 16:
        pytest.skip("needs about 16 GiB of free GPU memory")
    x = torch.empty(shape, dtype=torch.bfloat16, device=DEV).uniform_(-1, 4)
    step = torch.linspace(0.3, 1.2, shape[dim], device=DEV) if per_channel else steps(1)
    row_elems = x[0].numel()
    rows = sorted({0, 2**31 // row_elems - 1, 2**31 // row_elems, shape[0] - 1})
    dy = torch.zeros_like(x)
    g = torch.Generator().manual_seed(3)
    for r in rows:
        dy[r] = torch.randn(x[r].shape, generator=g).to(device=DEV, dtype=dy.dtype)
    dx, ds = ops.fake_quantize_backward(dy, x, step, 0, 3, dim, 0.5, True)
    xs, dys = x[rows], dy[rows]
    dxr, dsr = reference.fake_quantize_backward(dys, xs, step, 0, 3, dim, 0.5, True)
    bitwise_equal(dx[rows], dxr)
    tol = step_grad_tolerance(dys, xs, step, 0, 3, dim, 0.5)
    assert bool(((ds.double() - dsr.double()).abs() <= tol).all()), (ds - dsr).abs().max()
    # Between the checked rows dy is zero, so dx is zero there (0 * step: no NaN steps here).
    assert not bool(dx[rows[0] + 1 : rows[1]].any())


# ---- the fused step-gradient finalize (arrival counters), the fast division, layouts ----

KEY = (32, 64, 56, 56)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "per_tensor"])
def test_key_shape_parity(dtype, layout):
    """[32, 64, 56, 56]: the rows path with one group of partials per channel (NCHW), the tiles
    with two levels of counters (channels_last), the rows with 49 groups (per-tensor)."""
    x = data(KEY, dtype)
    dy = data(KEY, dtype, seed=4)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    check_parity(x, steps(1 if layout == "per_tensor" else 64), 0, 3, 1, grad_scale=0.25, dy=dy)


def _backward(x, dy, step):
    return ops.fake_quantize_backward(dy, x, step, 0, 3, 1, 0.5, True)


def test_fused_finalize_matches_its_fallback():
    """Every capture takes a counter slot of its own; once the 64 slots are gone (fewer where
    eager streams hold some) captured launches run the separate finalize, which sums in the same
    order: every replay's dstep has the bits of the eager (fused) one."""
    cases = [
        (data((8, 16, 40, 40), torch.float32), steps(16)),              # rows, one group
        (data((1, 1, 300000), torch.float32), steps(1)),                # rows, 3 groups
        # tiles: 36 row blocks, two levels of counters
        (data((8, 64, 24, 24), torch.bfloat16).contiguous(memory_format=torch.channels_last), steps(64)),
    ]
    want = []
    for x, step in cases:
        dy = torch.randn_like(x)
        want.append((x, dy, step, *_backward(x, dy, step)))
    torch.cuda.synchronize()
    graphs = []
    for _ in range(70):  # more captures than the 64 slots
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [_backward(x, dy, step) for x, dy, step, _, _ in want]
        graphs.append((graph, outs))
    for graph, _ in graphs:
        graph.replay()
    torch.cuda.synchronize()
    for _, outs in graphs:
        for (_, _, _, dx, ds), (dx2, ds2) in zip(want, outs):
            bitwise_equal(dx2, dx)
            bitwise_equal(ds2, ds)


def test_graph_replays_leave_the_counters_at_zero():
    """A captured backward replayed with new inputs each time equals the eager one: the last
    arrival at each counter wraps it back to zero (atomicInc), so the next replay starts there."""
    x = data((1, 1, 300000), torch.float16)
    xs = data((16, 32, 24, 24), torch.float32).contiguous(memory_format=torch.channels_last)  # 36 row blocks
    dy, dys = torch.randn_like(x), torch.randn_like(xs)
    step, steps_cl = steps(1), steps(32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _backward(x, dy, step)
        _backward(xs, dys, steps_cl)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _backward(x, dy, step)
        out_cl = _backward(xs, dys, steps_cl)
    for seed in range(6):
        dy.copy_(data(dy.shape, dy.dtype, seed=10 + seed))
        dys.copy_(data(dys.shape, dys.dtype, seed=20 + seed).contiguous(memory_format=torch.channels_last))
        graph.replay()
        torch.cuda.synchronize()
        for (dx, ds), (xx, dd, st) in ((out, (x, dy, step)), (out_cl, (xs, dys, steps_cl))):
            dx2, ds2 = _backward(xx, dd, st)
            bitwise_equal(dx, dx2)
            bitwise_equal(ds, ds2)


def test_concurrent_streams_do_not_share_counters():
    """Two backwards at once on two streams (each its own slot) equal the sequential ones."""
    a, b = data((1, 1, 400000), torch.float32), data((1, 1, 400000), torch.float32, seed=3)
    da, db = torch.randn_like(a), torch.randn_like(b)
    step = steps(1)
    want_a, want_b = _backward(a, da, step), _backward(b, db, step)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (s1, s2):
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        with torch.cuda.stream(s1):
            got_a = _backward(a, da, step)
        with torch.cuda.stream(s2):
            got_b = _backward(b, db, step)
    torch.cuda.synchronize()
    bitwise_equal(got_a[1], want_a[1])
    bitwise_equal(got_b[1], want_b[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_division_special_values(dtype):
    """The fast division keeps zeros (both signs) and its guard sends infinities, NaN,
    subnormals and extreme ratios to the IEEE division: y and dx keep their bits, the sign of
    zero included."""
    tiny = torch.finfo(torch.float32).tiny
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), tiny / 4, -tiny / 8,
                            3e38, -3e38, 1e-30, 2.0**60, 2.0**-60, 2.0**61, 1.5, -2.5, 7.0])
    x = special.repeat(64).reshape(8, 8, 16).to(DEV, dtype)
    for step in ([1.0], [2.0**-41], [2.0**41], [1e-6], [tiny / 2], [3e38]):
        s = torch.tensor(step, device=DEV)
        check_parity(x, s, -4, 3, 1, grad_scale=0.5)
        check_parity(x, s, -4, 3, 1, need_step_grad=False)
    # Per channel: steps outside the fast range (2**-45, 1e20) take the IEEE division for their
    # channel; bad ones (NaN, negative) give NaN for theirs only.
    per_channel = [0.5, 1.0, 2.0**-45, float("nan"), 1e-3, -2.0, 1e20, 0.25]
    check_parity(x, torch.tensor(per_channel, device=DEV), 0, 3, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_like_zeros_keep_their_bits(dtype):
    """ReLU-like inputs (about half exact zeros, some of them -0) take the fast division: y and
    dx keep their bits, the sign of zero included, on the rows and the tiles."""
    x = data((8, 16, 24, 24), dtype)
    x = torch.where(x > 0, x, torch.zeros_like(x))
    x[..., ::5] = -0.0
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        check_parity(xx, steps(16), 0, 3, 1, grad_scale=0.5)
        check_parity(xx, steps(16), -4, 3, 1, need_step_grad=False)


def test_dy_with_other_strides_on_size_one_dims():
    """[N, C, 1, 1]: dy whose H and W strides differ from x's is used as it is (no copy), and
    the results are those of a contiguous dy."""
    x = data((16, 32, 1, 1), torch.float16)
    dy = torch.empty_strided((16, 32, 1, 1), (32, 1, 32, 32), device=DEV, dtype=torch.float16)
    dy.copy_(data((16, 32, 1, 1), torch.float16, seed=6))
    dx, ds = _backward(x, dy, steps(32))
    dx2, ds2 = _backward(x, dy.contiguous(), steps(32))
    bitwise_equal(dx, dx2)
    bitwise_equal(ds, ds2)
    check_parity(x, steps(32), 0, 3, 1, dy=dy)
