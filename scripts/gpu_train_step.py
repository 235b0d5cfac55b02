"""One ResNet-20 training step (CIFAR-10 shapes, batch 256; forward, loss, backward, SGD step) with
nn.ReLU, DQAReLU with a fixed step and with a learned one, eager, CUDA-graphed and
torch.compile'd, in paired rounds (scripts/gpu_verify.sh runs it on a lent GPU).

    python scripts/gpu_train_step.py [--out DIR] [--modes eager,graphed,compiled] [--dry-run]

In each round every variant runs the same number of steps, in an order that rotates from round to
round, and its time per step (CUDA events around the steps: the GPU's timeline, host gaps
included) is compared with nn.ReLU's of the same round; the table gives the median of those
ratios and their range. TF32 is off for convolutions and matmuls. Eager mode also reports, from
torch.profiler, the kernel launches and the GPU kernel time per step. Graphed: the whole step
(forward, backward, optimizer) captured once and replayed, as PyTorch's whole-network capture.
Writes DIR/train_step.json as it goes and DIR/train_step.md at the end.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _training import VARIANTS, train_step  # noqa: E402  (the model and step the benchmarks time)
from _training import build as build_net  # noqa: E402

NET, BATCH = "resnet20", 256


def build(variant, device):
    return build_net(NET, variant, device, BATCH)


def eager_step(model, opt, x, y):
    return train_step(model, opt, x, y)


def compiled_step(model, opt, x, y):
    return eager_step(torch.compile(model), opt, x, y)


def graphed_step(model, opt, x, y):
    """The whole step in one CUDA graph (warm-up on a side stream first, grads kept allocated)."""
    step = eager_step(model, opt, x, y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return graph.replay


MODES = {"eager": eager_step, "graphed": graphed_step, "compiled": compiled_step}


def time_steps(step, n):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def profile_eager(step, n=3):
    """(kernel launches, GPU kernel ms) per step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cuLaunchKernelEx"))
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_us = sum(getattr(e, attr) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return launches / n, gpu_us / 1e3 / n


def measure(mode, rounds, steps_per_round, log):
    steps = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        steps[variant] = MODES[mode](*build(variant, "cuda"))
        for _ in range(5):  # compiles, autotunes, warms the allocator
            steps[variant]()
        torch.cuda.synchronize()
        log(f"{mode} {variant}: ready in {time.perf_counter() - t0:.1f} s")
    names = list(VARIANTS)
    per_round = {v: [] for v in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            per_round[v].append(time_steps(steps[v], steps_per_round))
    out = {}
    for v in names:
        ratios = [t / b for t, b in zip(per_round[v], per_round["relu"])]
        out[v] = {"ms_per_step": statistics.median(per_round[v]), "rounds_ms": per_round[v],
                  "vs_relu": statistics.median(ratios), "vs_relu_min": min(ratios), "vs_relu_max": max(ratios)}
        if mode == "eager":
            out[v]["launches_per_step"], out[v]["gpu_kernel_ms_per_step"] = profile_eager(steps[v])
    return out


def render(results, device):
    lines = [f"## ResNet-20 training step, batch {BATCH} ({device}; TF32 off; paired rounds)", "",
             "| mode | variant | ms/step (median) | vs nn.ReLU (median of rounds) | range | launches/step | GPU kernel ms/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, res in results.items():
        for v, r in res.items():
            extra = (f"{r['launches_per_step']:.0f} | {r['gpu_kernel_ms_per_step']:.3f}"
                     if "launches_per_step" in r else "- | -")
            lines.append(f"| {mode} | {v} | {r['ms_per_step']:.3f} | {r['vs_relu'] - 1:+.1%} | "
                         f"{r['vs_relu_min'] - 1:+.1%} .. {r['vs_relu_max'] - 1:+.1%} | {extra} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--modes", default="eager,graphed,compiled")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: one eager CPU step of each variant")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        sys.exit(f"gpu_train_step: modes are {', '.join(MODES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.dry_run:
        global BATCH
        BATCH = 4
        for variant in VARIANTS:
            eager_step(*build(variant, "cpu"))()
        print(render({"eager": {v: {"ms_per_step": 1.0, "vs_relu": 1.0, "vs_relu_min": 1.0, "vs_relu_max": 1.0}
                                for v in VARIANTS}}, "dry run: one CPU step of each variant, batch 4"))
        print(f"gpu_train_step: dry run: {', '.join(VARIANTS)} built and stepped on the CPU; modes {', '.join(modes)}")
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_train_step: torch sees no CUDA device")
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    results = {}
    for mode in modes:
        results[mode] = measure(mode, args.rounds, args.steps, lambda m: print(m, flush=True))
        (out / "train_step.json").write_text(json.dumps({"device": device, "batch": BATCH, "results": results},
                                                        indent=1))
        print(render({mode: results[mode]}, device), flush=True)
    (out / "train_step.md").write_text(render(results, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
