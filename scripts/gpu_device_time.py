"""Device time and host time of dqa_ext's CUDA ops against their floors, measured so that the
kernels are measured, not the dispatch (scripts/gpu_verify.sh runs it on a lent GPU).

    python scripts/gpu_device_time.py [--out DIR] [--shapes key,4x] [--rounds 5] [--dry-run]

Device time: each op (forward, backward with and without the step gradient) and its floors
(torch.relu, aten.threshold_backward, a copy of the same bytes) is captured K times into one CUDA
graph, each call on its own input set (sets rotated so that together they span 4x the L2 cache:
no call reads what the previous left in L2), and the graph is replayed between CUDA events; a
call's time is the replay's over K, the median over rounds, with the spread of the rounds. Every
dtype (f32, f16, bf16), granularity (per-channel, per-tensor) and layout (NCHW, channels_last) of
[32, 64, 56, 56] and 4x its channels. `% copy` is the copy's time for the same bytes over the op's.

Host time: eager calls timed on the host while a sleeping kernel keeps the GPU busy, so that no
call waits for the GPU (no back-pressure) and the GPU's speed does not enter: the ops, the
DQAReLU module, and forward+backward through autograd, against torch.relu and nn.ReLU.

Writes DIR/device_time.md (the tables) and DIR/device_time.json (every figure, the device, the
versions). --dry-run checks the cases, the byte counts and the tables without a GPU.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DQA_EXT_BACKEND", "extension")

import torch  # noqa: E402

QMIN, QMAX = 0, 3
SHAPES = {"key": (32, 64, 56, 56), "4x": (32, 256, 56, 56)}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "cl")
GRANS = ("pc", "pt")
# Tensors moved per call, each of numel elements: read x, write y; read dy and x, write dx.
TENSORS = {"fwd": 2, "bwd_step": 3, "bwd_nostep": 3, "relu": 2, "threshold_backward": 3}
OPS = ("fwd", "bwd_step", "bwd_nostep")
FLOOR_OF = {"fwd": "relu", "bwd_step": "threshold_backward", "bwd_nostep": "threshold_backward"}
L2_SPAN = 4  # the input sets together span this many times the L2 cache
MAX_SETS = 8


def cases(shapes):
    """(shape name, dtype name, layout, granularity or None, op) in measuring order; the floors
    (granularity None) once per shape, dtype and layout."""
    out = []
    for shape in shapes:
        for dt in DTYPES:
            for layout in LAYOUTS:
                out += [(shape, dt, layout, None, op) for op in ("copy_fwd", "relu", "copy_bwd", "threshold_backward")]
                out += [(shape, dt, layout, gran, op) for gran in GRANS for op in OPS]
    return out


def bytes_moved(shape, dt, op):
    numel = math.prod(SHAPES[shape])
    size = torch.empty(0, dtype=DTYPES[dt]).element_size()
    tensors = {"copy_fwd": 2, "copy_bwd": 3}.get(op, TENSORS.get(op))
    return tensors * numel * size


def _make(shape, dt, layout, seed, device):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(SHAPES[shape], generator=g) * 1.5).to(device, DTYPES[dt])
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t


def _call(op, x, dy, step, flat):
    """One call of op; flat is a 1-D buffer of 1.5 * numel elements for the backward's copy."""
    ops = torch.ops.dqa_ext
    if op == "fwd":
        return ops.fake_quantize(x, step, QMIN, QMAX, 1)
    if op in ("bwd_step", "bwd_nostep"):
        return ops.fake_quantize_backward(dy, x, step, QMIN, QMAX, 1, 0.5, op == "bwd_step")
    if op == "relu":
        return torch.relu(x)
    if op == "threshold_backward":
        return torch.ops.aten.threshold_backward(dy, x, 0.0)
    if op == "copy_fwd":
        return x.clone()
    if op == "copy_bwd":
        return flat.clone()
    raise ValueError(op)


def input_sets(shape, dt, layout, l2_bytes):
    """(x, dy, flat) input sets on the GPU, as many as span L2_SPAN times the L2 cache with x and
    dy (2 to MAX_SETS); flat holds 1.5 * numel elements, the backward's bytes for the copy."""
    numel = math.prod(SHAPES[shape])
    per_set = 2 * numel * torch.empty(0, dtype=DTYPES[dt]).element_size()
    nsets = max(2, min(MAX_SETS, math.ceil(L2_SPAN * l2_bytes / per_set)))
    g = torch.Generator(device="cuda").manual_seed(0)
    sets = []
    for _ in range(nsets):
        x, dy = (torch.randn(SHAPES[shape], generator=g, device="cuda") * 1.5).to(DTYPES[dt]), None
        dy = torch.randn(SHAPES[shape], generator=g, device="cuda").to(DTYPES[dt])
        if layout == "cl":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        flat = torch.empty(numel + numel // 2, device="cuda", dtype=DTYPES[dt]).uniform_()
        sets.append((x, dy, flat))
    return sets


def device_time(sets, shape, gran, op, rounds):
    """Median and spread (max/min - 1) of one call's device time in microseconds, the calls
    rotating over the input sets."""
    nsets = len(sets)
    channels = SHAPES[shape][1]
    step = (torch.rand(channels if gran == "pc" else 1, generator=torch.Generator().manual_seed(9)) + 0.5).cuda()
    calls = 2 * nsets
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy loading)
        for x, dy, flat in sets[:2]:
            _call(op, x, dy, step, flat)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [_call(op, *sets[k % nsets][:2], step, sets[k % nsets][2]) for k in range(calls)]
    del outs
    graph.replay()
    torch.cuda.synchronize()
    # Replays per round: about 20 ms of work, at least 3.
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    graph.replay()
    t1.record()
    t1.synchronize()
    replays = max(3, int(20.0 / max(t0.elapsed_time(t1), 1e-3)))
    times = []
    for _ in range(rounds):
        t0.record()
        for _ in range(replays):
            graph.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3 / (replays * calls))
    del graph
    torch.cuda.empty_cache()
    return statistics.median(times), max(times) / min(times) - 1


def host_time(n_calls=200, repeats=5):
    """Host microseconds per call with the GPU kept busy by a sleeping kernel."""
    import dqa_ext
    from torch import nn

    shape = SHAPES["key"]
    x = torch.randn(shape, device="cuda")
    dy = torch.randn(shape, device="cuda")
    step = torch.rand(shape[1], device="cuda") + 0.5
    ops = torch.ops.dqa_ext
    dqa = dqa_ext.DQAReLU(bits=2, mode="dynamic").cuda()
    dqa(x)  # lazy initialisation
    relu = nn.ReLU()
    xg = x.clone().requires_grad_(True)

    def fwdbwd(m):
        def run():
            m(xg).backward(dy)
        return run

    calls = {
        "ext fwd (op)": lambda: ops.fake_quantize(x, step, QMIN, QMAX, 1),
        "ext bwd with dstep (op)": lambda: ops.fake_quantize_backward(dy, x, step, QMIN, QMAX, 1, 0.5, True),
        "DQAReLU forward": lambda: dqa(x),
        "DQAReLU fwd+bwd (autograd)": fwdbwd(dqa),
        "torch.relu": lambda: torch.relu(x),
        "aten.threshold_backward": lambda: torch.ops.aten.threshold_backward(dy, x, 0.0),
        "nn.ReLU fwd+bwd (autograd)": fwdbwd(relu),
    }
    # Cycles of the sleep: far longer than the calls take to issue (kept well under the queue).
    sleep_cycles = int(2e9 * 0.2)
    out = {}
    for name, fn in calls.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        per_call = []
        for _ in range(repeats):
            torch.cuda._sleep(sleep_cycles)
            t0 = time.perf_counter()
            for _ in range(n_calls):
                fn()
            per_call.append((time.perf_counter() - t0) * 1e6 / n_calls)
            torch.cuda.synchronize()
        out[name] = {"median_us": statistics.median(per_call), "spread": max(per_call) / min(per_call) - 1}
    return out


def check_calls():
    """Every op of the table once on small CPU tensors, when dqa_ext's kernels load here: the
    calls' arguments are right before a GPU minute is spent."""
    try:
        import dqa_ext  # noqa: F401

        torch.ops.dqa_ext.fake_quantize  # noqa: B018
    except Exception as e:  # noqa: BLE001 (no kernels here: say so, the rest still checks)
        print(f"gpu_device_time: dry run: op calls not checked ({type(e).__name__}: {e})")
        return
    for layout in LAYOUTS:
        x = _make("key", "f32", layout, 0, "cpu")[:2, :8, :5, :6]
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        flat = torch.cat([x.reshape(-1), x.reshape(-1)[: x.numel() // 2]])
        for gran in GRANS:
            step = torch.rand(8 if gran == "pc" else 1) + 0.5
            for op in OPS + ("relu", "threshold_backward", "copy_fwd", "copy_bwd"):
                _call(op, x, dy, step, flat)
    print("gpu_device_time: dry run: every op called once on the CPU")


def render(records, host, device):
    lines = [f"## Device time per call ({device}; CUDA graph replay, inputs rotated over 4x L2)", "",
             "| shape | dtype | layout | gran | op | us (median) | spread | GB/s | % copy | vs floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    index = {(r["shape"], r["dtype"], r["layout"], r["gran"], r["op"]): r for r in records}
    for r in records:
        if r["gran"] is None:
            continue
        copy = index.get((r["shape"], r["dtype"], r["layout"], None, "copy_fwd" if r["op"] == "fwd" else "copy_bwd"))
        floor = index.get((r["shape"], r["dtype"], r["layout"], None, FLOOR_OF[r["op"]]))
        pct = f"{100 * copy['us'] / r['us']:.0f}%" if copy and r.get("us") else "-"
        vs = f"{r['us'] / floor['us']:.2f}x" if floor and r.get("us") else "-"
        us = f"{r['us']:.2f}" if r.get("us") else "-"
        gbs = f"{r['bytes'] / r['us'] / 1e3:.0f}" if r.get("us") else "-"
        spread = f"{100 * r['spread']:.1f}%" if r.get("spread") is not None else "-"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['gran']} | {r['op']} | {us} | {spread} | "
                     f"{gbs} | {pct} | {vs} |")
    lines += ["", "Floors and copies (same bytes as the forward: copy_fwd; as the backward: copy_bwd):", "",
              "| shape | dtype | layout | op | us (median) | spread | GB/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r["gran"] is None and r.get("us"):
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['op']} | {r['us']:.2f} | "
                         f"{100 * r['spread']:.1f}% | {r['bytes'] / r['us'] / 1e3:.0f} |")
    if host:
        lines += ["", "## Host time per call (GPU kept busy: no back-pressure)", "",
                  "| call | us (median) | spread | vs its floor |", "| --- | --- | --- | --- |"]
        floors = {"ext fwd (op)": "torch.relu", "ext bwd with dstep (op)": "aten.threshold_backward",
                  "DQAReLU forward": "torch.relu", "DQAReLU fwd+bwd (autograd)": "nn.ReLU fwd+bwd (autograd)"}
        for name, h in host.items():
            f = floors.get(name)
            vs = f"{h['median_us'] / host[f]['median_us']:.2f}x" if f in host else "-"
            lines.append(f"| {name} | {h['median_us']:.1f} | {100 * h['spread']:.1f}% | {vs} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for device_time.md and device_time.json")
    ap.add_argument("--shapes", default="key,4x", help="comma-separated: key, 4x")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-host", action="store_true", help="skip the host-time table")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: check cases, bytes and tables")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"gpu_device_time: unknown shapes {unknown}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = cases(shapes)
    records = [{"shape": s, "dtype": d, "layout": l, "gran": g, "op": op, "bytes": bytes_moved(s, d, op)}
               for s, d, l, g, op in todo]
    meta = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if args.dry_run:
        check_calls()
        for r in records:  # plausible figures, to render the tables
            r.update(us=r["bytes"] / 3e6, spread=0.0)
        text = render(records, {}, "dry run: no GPU, figures invented from 3 TB/s")
        print(text)
        print(f"gpu_device_time: dry run: {len(records)} cases over {', '.join(shapes)}")
        (out / "device_time.json").write_text(json.dumps({"dry_run": True, **meta, "records": records}, indent=1))
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_device_time: torch sees no CUDA device")
    import dqa_ext  # noqa: F401  (loads the ops)
    from dqa_ext import _backend

    if not _backend.BUILT_FOR.get("cuda"):
        sys.exit("gpu_device_time: dqa_ext was built without its CUDA kernels")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    meta.update(device=props.name, sms=props.multi_processor_count, l2_bytes=l2)
    result = {**meta, "records": records, "host": {}}
    sets, key = None, None
    for i, r in enumerate(records):
        if key != (r["shape"], r["dtype"], r["layout"]):
            sets = None
            torch.cuda.empty_cache()
            key = (r["shape"], r["dtype"], r["layout"])
            sets = input_sets(*key, l2)
        r["us"], r["spread"] = device_time(sets, r["shape"], r["gran"], r["op"], args.rounds)
        r["sets"] = len(sets)
        print(f"[{i + 1}/{len(records)}] {r['shape']} {r['dtype']} {r['layout']} {r['gran'] or '-'} {r['op']}: "
              f"{r['us']:.2f} us ({100 * r['spread']:.1f}%), {r['bytes'] / r['us'] / 1e3:.0f} GB/s", flush=True)
        (out / "device_time.json").write_text(json.dumps(result, indent=1))  # as it goes
    if not args.no_host:
        result["host"] = host_time()
    (out / "device_time.json").write_text(json.dumps(result, indent=1))
    text = render(records, result["host"], f"{props.name}, torch {torch.__version__}")
    (out / "device_time.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
