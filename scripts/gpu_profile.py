"""Nsight Compute profile of dqa_ext's kernels on the key case [32, 64, 56, 56] (scripts/gpu_verify.sh
runs both steps on a lent GPU):

    ncu --profile-from-start off --csv --page raw --log-file ncu.csv [METRICS] \\
        python scripts/gpu_profile.py kernels --labels labels.json
    python scripts/gpu_profile.py summary ncu.csv --labels labels.json [--out table.md]

`kernels` creates every input first, then, between cudaProfilerStart and cudaProfilerStop (so
that ncu profiles nothing else), launches each op once per dtype, layout and granularity
(forward, backward with and without dstep) and its floors (torch.relu, threshold_backward, a
copy), one kernel each, and writes their labels in launch order. `summary` reads ncu's raw CSV
(one row per kernel) and prints per kernel: time, DRAM throughput, issue-slot use, occupancy,
registers, thread instructions per element (smsp__thread_inst_executed / numel) and the three
largest stall reasons (cycles per issued instruction, from the WarpStateStats section).
`--dry-run` (kernels) lists the launches without a GPU; `summary` runs anywhere.
"""

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DQA_EXT_BACKEND", "extension")

KEY = (32, 64, 56, 56)
METRICS = ("gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,"
           "dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,"
           "smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,"
           "launch__registers_per_thread,launch__grid_size,launch__block_size,"
           "smsp__inst_executed.sum,smsp__thread_inst_executed.sum")


def labels():
    out = []
    for dt in ("f32", "f16", "bf16"):
        for layout in ("nchw", "cl"):
            out += [f"{dt}/{layout}/-/{op}" for op in ("relu", "threshold_backward", "copy")]
            out += [f"{dt}/{layout}/{gran}/{op}" for gran in ("pc", "pt") for op in ("fwd", "bwd_step", "bwd_nostep")]
    return out


def kernels(labels_path, dry_run):
    todo = labels()
    if labels_path:
        Path(labels_path).write_text(json.dumps({"shape": KEY, "labels": todo}, indent=1))
    if dry_run:
        print("\n".join(todo))
        print(f"gpu_profile: dry run: {len(todo)} launches of the key case {KEY}")
        return 0
    import torch

    import dqa_ext  # noqa: F401  (loads the ops)

    if not torch.cuda.is_available():
        sys.exit("gpu_profile: torch sees no CUDA device")
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    ops = torch.ops.dqa_ext
    inputs = {}
    g = torch.Generator().manual_seed(0)
    for dt, dtype in dtypes.items():
        for layout in ("nchw", "cl"):
            x = (torch.randn(KEY, generator=g) * 1.5).to("cuda", dtype)
            dy = torch.randn(KEY, generator=g).to("cuda", dtype)
            if layout == "cl":
                x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
            inputs[dt, layout] = (x, dy)
    steps = {"pc": torch.rand(KEY[1], generator=g).cuda() + 0.5, "pt": torch.rand(1, generator=g).cuda() + 0.5}
    # Warm-up of every call outside the profiled range (lazy loading, allocator, counter slot).
    calls = []
    for label in todo:
        dt, layout, gran, op = label.split("/")
        x, dy = inputs[dt, layout]
        if op == "relu":
            fn = lambda x=x: torch.relu(x)  # noqa: E731
        elif op == "threshold_backward":
            fn = lambda x=x, dy=dy: torch.ops.aten.threshold_backward(dy, x, 0.0)  # noqa: E731
        elif op == "copy":
            fn = lambda x=x: x.clone()  # noqa: E731
        elif op == "fwd":
            fn = lambda x=x, s=steps[gran]: ops.fake_quantize(x, s, 0, 3, 1)  # noqa: E731
        else:
            fn = lambda x=x, dy=dy, s=steps[gran], ds=op == "bwd_step": ops.fake_quantize_backward(  # noqa: E731
                dy, x, s, 0, 3, 1, 0.5, ds)
        fn()
        calls.append((label, fn))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, fn in calls:
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"gpu_profile: {len(calls)} launches profiled")
    return 0


def _num(v):
    try:
        return float(v.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summary(csv_path, labels_path, out_path):
    text = Path(csv_path).read_text()
    # ncu's log: CSV lines start with a quote; the rest are its own messages.
    rows = list(csv.reader([line for line in text.splitlines() if line.startswith('"')]))
    if len(rows) < 2:
        sys.exit(f"gpu_profile: no CSV rows in {csv_path}")
    header = rows[0]
    data = [r for r in rows[1:] if r and r[0].isdigit()]  # the second row holds the units
    names = json.loads(Path(labels_path).read_text())["labels"] if labels_path else []
    numel = math.prod(KEY)
    col = {h: i for i, h in enumerate(header)}

    def get(r, name):
        return _num(r[col[name]]) if name in col else None

    stall_cols = [h for h in header if "issue_stalled" in h and h.endswith("per_issue_active.ratio")]
    lines = ["| kernel (dtype/layout/gran/op) | us | DRAM GB/s | DRAM % peak | issue slots % | warps active % "
             "| regs | thread instr./element | top stalls (cycles per issued instruction) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(data):
        label = names[i] if len(names) == len(data) else r[col.get("Kernel Name", 4)][:40]
        us = (get(r, "gpu__time_duration.sum") or 0) / 1e3
        moved = (get(r, "dram__bytes_read.sum") or 0) + (get(r, "dram__bytes_write.sum") or 0)
        inst = get(r, "smsp__thread_inst_executed.sum")
        stalls = sorted(((get(r, h) or 0, h.split("issue_stalled_")[1].split("_per_issue")[0]) for h in stall_cols),
                        reverse=True)[:3]
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(f"| {label} | {us:.2f} | {moved / us / 1e3 if us else 0:.0f} | "
                     f"{fmt(get(r, 'dram__throughput.avg.pct_of_peak_sustained_elapsed'), '{:.0f}')} | "
                     f"{fmt(get(r, 'smsp__issue_active.avg.pct_of_peak_sustained_active'), '{:.0f}')} | "
                     f"{fmt(get(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'), '{:.0f}')} | "
                     f"{fmt(get(r, 'launch__registers_per_thread'), '{:.0f}')} | "
                     f"{fmt(inst / numel if inst else None, '{:.1f}')} | "
                     + ", ".join(f"{n} {v:.2f}" for v, n in stalls if v) + " |")
    table = "\n".join(lines) + "\n"
    if len(names) != len(data):
        table += f"\n({len(data)} kernels profiled, {len(names)} labels: named by kernel instead)\n"
    if out_path:
        Path(out_path).write_text(table)
    print(table)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels", help="launch every key-case op once, for ncu")
    k.add_argument("--labels", help="write the launches' labels here (JSON)")
    k.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("summary", help="ncu's raw CSV to a table")
    s.add_argument("csv")
    s.add_argument("--labels")
    s.add_argument("--out")
    sub.add_parser("metrics", help="print the metrics ncu should collect")
    args = ap.parse_args()
    if args.what == "kernels":
        return kernels(args.labels, args.dry_run)
    if args.what == "summary":
        return summary(args.csv, args.labels, args.out)
    print(METRICS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
