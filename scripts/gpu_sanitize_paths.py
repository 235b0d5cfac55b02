"""Every CUDA kernel path of dqa_ext once, on small tensors, for compute-sanitizer
(scripts/gpu_verify.sh runs it under memcheck, racecheck, initcheck and synccheck).

Paths: the forward (and grad_x alone) on rows and tiles at every vector width (aligned and
misaligned pointers, a partial last vector, odd rows); the row backward (NCHW long rows,
per-tensor, C == 1) packed and scalar; the tiled backward (channels_last, (N, C), small H*W, odd C
at width 1) packed and scalar; the step-gradient finalize fused by arrival counters (one level,
two levels of counters on rows and tiles, dstep written by the only block) and the separate one
(tiles with inner > 1, and captures beyond the counter slots where graphs can be captured); the
division's special values; empty tensors; NaN / negative steps. `--big` adds C = 70000 (the
channel loop over gridDim.y): slow under racecheck, so memcheck only.
Exit status 1 when a result differs from the reference (so a sanitizer run also checks values)."""

import argparse
import sys

import torch

import dqa_ext  # noqa: F401  (loads the ops)
from dqa_ext import reference

ops = torch.ops.dqa_ext
DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
failures = []


def steps(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g) * 0.4 + 0.05).to(DEV)


def data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(DEV, dtype)


def offset(t, k):
    """t's values at a pointer k elements past an allocation's start (misaligned for k odd)."""
    buf = torch.empty(k + t.numel(), dtype=t.dtype, device=DEV)
    v = buf[k:].view(t.shape)
    v.copy_(t)
    return v


def same(a, b):
    a, b = a.float(), b.float()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def case(name, x, step, dim, qmin=0, qmax=3, dy=None):
    dy = torch.randn_like(x) if dy is None else dy
    y = ops.fake_quantize(x, step, qmin, qmax, dim)
    gx, gs = ops.fake_quantize_backward(dy, x, step, qmin, qmax, dim, 0.5, True)
    gx2, gs2 = ops.fake_quantize_backward(dy, x, step, qmin, qmax, dim, 0.5, False)
    torch.cuda.synchronize()
    yr = reference.fake_quantize_forward(x, step, qmin, qmax, dim)
    gxr, gsr = reference.fake_quantize_backward(dy, x, step, qmin, qmax, dim, 0.5, True)
    ok = same(y, yr) and same(gx, gxr) and same(gx2, gxr) and gs2.numel() == 0
    ok = ok and torch.equal(gs.isnan(), gsr.isnan())
    fin = gsr.isfinite()
    ok = ok and bool(torch.allclose(gs[fin].double(), gsr[fin].double(), rtol=1e-3, atol=1e-3))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {tuple(x.shape)} {x.dtype}", flush=True)
    if not ok:
        failures.append(name)


def separate_finalize_after_the_slots():
    """Each capture takes a counter slot; captured launches beyond the 64 slots (fewer where eager
    streams hold some) run the separate finalize: the last of 70 captures, replayed, against the
    reference."""
    x = data((1, 1, 300000), torch.float32)
    dy, step = torch.randn_like(x), steps(1)
    ops.fake_quantize_backward(dy, x, step, 0, 3, 0, 0.5, True)  # warm-up outside the captures
    torch.cuda.synchronize()
    graphs = []
    try:
        for _ in range(70):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = ops.fake_quantize_backward(dy, x, step, 0, 3, 0, 0.5, True)
            graphs.append((graph, out))
    except RuntimeError as e:  # no capture without the caching allocator (memcheck's setting)
        print(f"skip separate finalize after the slots: no graph capture here ({str(e).splitlines()[0]})")
        return
    graph, (gx, gs) = graphs[-1]
    graph.replay()
    torch.cuda.synchronize()
    gxr, gsr = reference.fake_quantize_backward(dy, x, step, 0, 3, 0, 0.5, True)
    ok = same(gx, gxr) and bool(torch.allclose(gs.double(), gsr.double(), rtol=1e-3, atol=1e-3))
    print(f"{'ok  ' if ok else 'FAIL'} separate finalize (counter slots taken): {tuple(x.shape)}", flush=True)
    if not ok:
        failures.append("separate finalize")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="add C = 70000 (memcheck only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_sanitize_paths: no CUDA device")
        return 2
    for dt in DTYPES:
        x = data((2, 16, 16, 16), dt)
        case(f"rows nchw {dt}", x, steps(16), 1)
        case(f"rows nchw misaligned x {dt}", offset(x, 1), steps(16), 1)
        case(f"rows nchw x at 2 elements (elementwise width 2) {dt}", offset(x, 2), steps(16), 1)
        case(f"rows nchw misaligned dy {dt}", x, steps(16), 1, dy=offset(data(x.shape, dt, 5), 3))
        case(f"rows per-tensor, partial last vector {dt}", data((3, 5, 7, 11), dt), steps(1), 1, -4, 3)
        case(f"rows per-tensor misaligned {dt}", offset(data((3, 5, 7, 11), dt), 1), steps(1), 1)
        case(f"rows C == 1 {dt}", data((3, 1, 300), dt), steps(1), 1)
        case(f"rows fp16-style inner 130 {dt}", data((3, 4, 130), dt), steps(4), 1)
        case(f"rows at width 1, tiled forward: nchw 7x7 {dt}", data((2, 8, 7, 7), dt), steps(8), 1)
        case(f"tiles nchw 2x2, separate finalize {dt}", data((40, 8, 2, 2), dt), steps(8), 1)
        case(f"tiles nchw 2x2 misaligned {dt}", offset(data((40, 8, 2, 2), dt), 1), steps(8), 1)
        case(f"tiles channels_last {dt}", x.contiguous(memory_format=torch.channels_last), steps(16), 1)
        case(f"tiles (N, C) {dt}", data((33, 24), dt), steps(24), 1)
        case(f"tiles (N, odd C) width 1 {dt}", data((5, 1001), dt), steps(1001), 1)
        case(f"tiles many rows {dt}", data((3000, 8), dt), steps(8), 1)
        e = torch.empty((0, 4, 3), device=DEV, dtype=dt)
        ops.fake_quantize(e, steps(4), 0, 3, 1)
        _, gs = ops.fake_quantize_backward(e, e, steps(4), 0, 3, 1, 1.0, True)
        if not torch.equal(gs, torch.zeros(4, device=DEV)):
            failures.append(f"empty {dt}")
    bad = steps(8)
    bad[3] = float("nan")
    bad[5] = -1.0
    case("non-finite / negative steps", data((2, 8, 9, 9), torch.float32), bad, 1)
    # The fused finalize's levels: 3 groups of row blocks per tensor, 2 of tiles.
    case("fused, rows, two levels of counters", data((1, 1, 300000), torch.float32), steps(1), 0)
    case("fused, tiles, two levels of counters",
         data((8, 64, 24, 24), torch.bfloat16).contiguous(memory_format=torch.channels_last), steps(64), 1)
    case("one block per channel: dstep written directly", data((2, 3000, 64), torch.float16), steps(3000), 1)
    separate_finalize_after_the_slots()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38, 2.0**61])
    case("division special values", special.repeat(32).reshape(4, 8, 8).to(DEV), steps(8), 1)
    if args.big:
        case("C = 70000 inner 64 (channel loop over gridDim.y)", data((1, 70000, 64), torch.float32),
             steps(70000), 1)
    torch.cuda.synchronize()
    print(f"gpu_sanitize_paths: {len(failures)} failed" + (f": {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
