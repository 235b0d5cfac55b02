"""The profiles behind a missed GPU target (scripts/gpu_verify.sh runs both on a lent GPU).

    python scripts/gpu_profile.py kernels    # every dqa_ext kernel of the key case once, for ncu
    python scripts/gpu_profile.py training   # ResNet-20 (batch 256) step: where the time goes

`kernels` launches the forward and the backward (with dstep) of [32,64,56,56] in every dtype,
layout and granularity once, and nothing else on the GPU between them, so that
`ncu -k regex:dqa_cuda --kernel-name-base demangled ...` reads each kernel's DRAM throughput,
duration and occupancy. `training` times one SGD step of ResNet-20 with nn.ReLU and with DQAReLU
(dynamic, fixed) by CUDA events, then splits it with torch.profiler into GPU kernel time (what the
GPU does) and host time (what launches it): an overhead in the first is the kernels' cost, in the
second Python and dispatch.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("DQA_EXT_BACKEND", "extension")
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402


def kernels():
    import dqa_ext  # noqa: F401  (loads the ops)
    from _cases import DTYPE_NAMES, KEY_SHAPE, Case, Inputs

    ops = torch.ops.dqa_ext
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout in ("nchw", "cl"):
            for gran in ("pc", "pt"):
                inp = Inputs(Case("cuda", dtype, KEY_SHAPE, gran, layout))
                torch.cuda.synchronize()
                ops.fake_quantize(inp.x, inp.step, *inp.args())
                ops.fake_quantize_backward(inp.dy, inp.x, inp.step, *inp.args(), inp.grad_scale, True)
                torch.cuda.synchronize()
                print(f"launched {DTYPE_NAMES[dtype]} {layout} {gran}: forward, then backward with dstep")


def _device_time_us(evt):
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return getattr(evt, name)
    return 0.0


def training(steps: int, warmup: int, prof_steps: int):
    from torch.profiler import ProfilerActivity, profile
    from test_bench_training import NETS, VARIANTS, _build, _train_step

    net = "resnet20"
    print(f"{net}, batch {NETS[net][1]['cuda']}, {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = []
    for variant in VARIANTS:
        step = _train_step(*_build(net, variant, "cuda"))
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(prof_steps):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_ms = sum(_device_time_us(e) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        gpu_ms = gpu_ms / 1e3 / prof_steps
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                            "cudaLaunchKernelExC", "cuLaunchKernelEx"))
        rows.append((variant, statistics.median(times), gpu_ms, launches / prof_steps))
        print(f"\n== {variant}: median step {statistics.median(times):.3f} ms over {steps} "
              f"(min {min(times):.3f}), GPU kernel time {gpu_ms:.3f} ms/step, "
              f"{launches / prof_steps:.0f} kernel launches/step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))
        sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        print(events.table(sort_by=sort, row_limit=12))
    relu = rows[0]
    print("\n| variant | step ms (median) | vs nn.ReLU | GPU kernel ms/step | vs nn.ReLU | launches/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, step_ms, gpu_ms, launches in rows:
        print(f"| {variant} | {step_ms:.3f} | {step_ms / relu[1] - 1:+.1%} | {gpu_ms:.3f} | "
              f"{gpu_ms / relu[2] - 1:+.1%} | {launches:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("kernels", "training"))
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--profile-steps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_profile: torch sees no CUDA device")
    if args.what == "kernels":
        kernels()
    else:
        training(args.steps, args.warmup, args.profile_steps)


if __name__ == "__main__":
    main()
