"""Where a training step's time goes, nn.ReLU against DQAReLU: torch.profiler's ops by self time.

    python benchmarks/_profile.py resnet20 --threads 1 --variant dqa_dynamic

The numbers behind the "why" of a missed training-overhead target in results/*.notes.md.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DQA_EXT_BACKEND", "extension")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from _training import NETS, VARIANTS, build, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("net", choices=sorted(NETS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variant", default="dqa_dynamic", choices=[v for v in VARIANTS if v != "relu"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for variant in ("relu", args.variant):
        step = train_step(*build(args.net, variant, "cpu"))
        for _ in range(3):
            step()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(f"\n{args.net} {variant}: median step {sorted(times)[2] * 1e3:.1f} ms "
              f"(torch threads {torch.get_num_threads()})")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(f"per {args.steps} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
