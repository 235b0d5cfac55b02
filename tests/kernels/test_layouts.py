"""Every layout by one mechanism: NCHW, channels_last, 2-D, 3-D with channel_dim=-1, slices,
per-tensor, empty tensors, and a hypothesis fuzz of shapes, strides, channel_dim and values."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.devices import DEVICES, needs_extension
from support.parity import bitwise_equal, check_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def is_dense(t):
    return torch._prims_common.is_non_overlapping_and_dense_or_false(t)


def data(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)


def steps(n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) + 0.05).to(device)


CASES = {
    "nchw": lambda d, t: (data((4, 6, 9, 11), d, t), 1),
    "channels_last": lambda d, t: (data((4, 6, 9, 11), d, t).to(memory_format=torch.channels_last), 1),
    "2d": lambda d, t: (data((37, 40), d, t), 1),
    "3d_last": lambda d, t: (data((5, 7, 19), d, t), -1),
    "3d_mid": lambda d, t: (data((5, 19, 7), d, t), 1),
    "1d": lambda d, t: (data((101,), d, t), 0),
    "dim0": lambda d, t: (data((6, 5, 33), d, t), 0),
    "sliced": lambda d, t: (data((4, 12, 9, 22), d, t)[:, ::2, :, 3:17], 1),
    "transposed": lambda d, t: (data((9, 6, 13), d, t).transpose(0, 2), 1),
    "channels_last_3d": lambda d, t: (data((2, 6, 3, 5, 7), d, t).to(memory_format=torch.channels_last_3d), 1),
    # Rows shorter than a vector, several to a tile (lcm(C, 2W) elements).
    "channels_last_c12": lambda d, t: (data((3, 12, 9, 11), d, t).to(memory_format=torch.channels_last), 1),
    "2d_c8": lambda d, t: (data((301, 8), d, t), 1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_layout_parity(device, dtype, case, per_channel):
    needs_extension(device)
    x, dim = CASES[case](device, dtype)
    step = steps(x.shape[dim] if per_channel else 1, device)
    y, dx, _ = check_parity(x, step, 0, 3, dim, grad_scale=0.7)
    check_parity(x, step, 0, 3, dim, need_step_grad=False)
    if is_dense(x):  # the output keeps the input's memory format
        assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_grad_layout_differs_from_x(device):
    """dy in another memory format than x is read correctly."""
    needs_extension(device)
    x = data((3, 5, 7, 9), device, torch.float32).to(memory_format=torch.channels_last)
    dy = data((3, 5, 7, 9), device, torch.float32, seed=4)  # contiguous
    check_parity(x, steps(5, device), 0, 7, 1, dy=dy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((0, 4, 3, 3), 1), ((2, 4, 0), 1), ((0,), 0), ((3, 0), 0)])
def test_empty(device, shape, dim):
    needs_extension(device)
    x = torch.empty(shape, device=device)
    step = steps(x.shape[dim], device) if x.shape[dim] else torch.ones(1, device=device)
    y = torch.ops.dqa_ext.fake_quantize(x, step, 0, 3, dim)
    assert y.shape == x.shape
    dx, ds = torch.ops.dqa_ext.fake_quantize_backward(x, x, step, 0, 3, dim, 1.0, True)
    assert dx.shape == x.shape and torch.equal(ds, torch.zeros_like(step))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d", "per_tensor"])
def test_step_grad_deterministic(device, layout):
    """dstep is bitwise identical from run to run (fixed-order reduction, no float atomics)."""
    needs_extension(device)
    x = data((16, 32, 24, 24) if layout != "2d" else (4096, 96), device, torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    step = steps(1 if layout == "per_tensor" else x.shape[1], device)
    dy = data(x.shape, device, torch.float32, seed=9)
    runs = [torch.ops.dqa_ext.fake_quantize_backward(dy, x, step, 0, 3, 1, 1.0, True)[1] for _ in range(3)]
    for r in runs[1:]:
        bitwise_equal(r, runs[0])


def test_step_grad_independent_of_threads():
    needs_extension("cpu")
    x = data((8, 16, 40, 40), "cpu", torch.float32)
    step, dy = steps(16, "cpu"), data(x.shape, "cpu", torch.float32, seed=3)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, max(2, before)):
            torch.set_num_threads(n)
            out.append(torch.ops.dqa_ext.fake_quantize_backward(dy, x, step, 0, 3, 1, 1.0, True)[1])
    finally:
        torch.set_num_threads(before)
    bitwise_equal(out[0], out[1])


@st.composite
def fuzz_case(draw):
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))
    dim = draw(st.integers(-ndim, ndim - 1))
    per_channel = draw(st.booleans())
    perm = draw(st.permutations(range(ndim)))
    step_every = draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim))
    dtype = draw(st.sampled_from(DTYPES))
    qmin = draw(st.integers(-8, 4))
    qmax = draw(st.integers(qmin + 1, qmin + 255))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    return shape, dim, per_channel, perm, step_every, dtype, qmin, qmax, scale, seed


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_case())
def test_fuzz_shapes_strides_values(device, case):
    needs_extension(device)
    shape, dim, per_channel, perm, step_every, dtype, qmin, qmax, scale, seed = case
    # A permuted, strided view of a larger tensor: covers dense-but-permuted and non-dense x.
    big = [s * e for s, e in zip(shape, step_every)]
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn([big[p] for p in perm], generator=g) * scale).to(device=device, dtype=dtype)
    inverse = [perm.index(i) for i in range(len(perm))]
    x = base.permute(inverse)[tuple(slice(None, None, e) for e in step_every)]
    step = (torch.rand(x.shape[dim] if per_channel else 1, generator=g) * scale + 1e-3).to(device)
    # Sprinkle non-finite values and an exact tie into the view (written through to base).
    for value in (float("nan"), float("inf"), -float("inf"), 0.5 * step[0].item()):
        where = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in x.shape)
        x[where] = value
    check_parity(x, step, qmin, qmax, dim, grad_scale=0.3)


def _available_memory_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_over_2_31_elements(device):
    """64-bit indexing: a tensor of 2**31 + 2*ncols elements, checked where 32-bit offsets wrap."""
    needs_extension(device)
    if device == "cpu" and _available_memory_gib() < 14:
        pytest.skip("needs about 9 GiB of free memory")
    cols = 4096 + 48
    rows = 2**31 // cols + 2
    x = torch.empty((rows, cols), dtype=torch.bfloat16, device=device)
    x.uniform_(-1, 4)
    step = torch.linspace(0.3, 1.2, cols, device=device)
    y = torch.ops.dqa_ext.fake_quantize(x, step, 0, 3, 1)
    from dqa_ext import reference

    for r in (0, 2**31 // cols - 1, 2**31 // cols, rows - 1):
        bitwise_equal(y[r], reference.fake_quantize_forward(x[r], step, 0, 3, 0))
    del y
    y = torch.ops.dqa_ext.fake_quantize(x, step[:1], 0, 3, 1)  # per-tensor: one [1, 1, numel] block
    bitwise_equal(y[-1], reference.fake_quantize_forward(x[-1], step[:1], 0, 3, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last", [((2**16, 2), False), ((2**24,), False), ((8, 4, 64, 64), True),
                                                 ((2**20, 16), False), ((4, 2, 2**20), False)])
def test_step_grad_accuracy_constant_terms(device, shape, channels_last):
    """Equal terms are the worst case for a float32 running sum: the kernel's float accumulators
    must be flushed into wider sums often enough to stay within the stated bound (on CUDA:
    long per-thread sums on the tiled (N, C) and the row paths, and per-tensor)."""
    needs_extension(device)
    x = torch.full(shape, 10.0, device=device)  # v >= qmax: t = qmax for every element
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dim = 1 if len(shape) > 1 else 0
    step = torch.ones(x.shape[dim] if len(shape) > 1 else 1, device=device)
    check_parity(x, step, 0, 3, dim, dy=torch.full_like(x, 0.1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_bits_do_not_depend_on_position(dtype):
    """Vector bodies and run tails convert alike: every NaN output has the same bits."""
    needs_extension("cpu")
    x = torch.full((4, 3, 17), float("nan"), dtype=dtype)
    y = torch.ops.dqa_ext.fake_quantize(x, torch.ones(3), 0, 3, 1)
    bits = y.view(torch.int16).unique()
    assert bits.numel() == 1, bits
