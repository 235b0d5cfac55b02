"""How often one restart of the annealed twin breaks one image, per temperature schedule.

Rare adversarial points of a quantized model are found by few random starts; comparing schedules on
the suite's union over 30 restarts says little, so this runs R restarts of the suite's own
``annealed_twin`` (its first restart: the cross-entropy loss) on R copies of one image, each copy
with its own start, and prints how many broke. Used to choose the default schedule (docs/robust.md):

    python scripts/anneal_rates.py --models dqa-report/models --model fixed3-pgd --images 6,91,110,133 \
        --schedules 150:0.3:0.03,200:1.0:0.03
"""
from __future__ import annotations

import argparse
import time

import torch

from dqa_ext.robust.attacks.anneal import annealed_twin
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.checkpoint import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="a report's models/ folder (dqa reproduce --out DIR)")
    p.add_argument("--model", required=True, help="checkpoint name, e.g. fixed3-pgd")
    p.add_argument("--images", required=True, help="test-set indices, comma-separated")
    p.add_argument("--schedules", default="150:0.3:0.03,200:1.0:0.03", help="STEPS:T_START:T_END,...")
    p.add_argument("--copies", type=int, default=200, help="restarts (random starts) per image and schedule")
    p.add_argument("--eps", type=float, default=0.3)
    a = p.parse_args()
    model = load_model(f"{a.models}/{a.model}.pt").eval()
    for q in model.parameters():
        q.requires_grad_(False)
    ds = load_mnist5k()
    for img in (int(i) for i in a.images.split(",")):
        x = ds.x_test[img:img + 1].float().repeat(a.copies, 1, 1, 1)
        y = ds.y_test[img:img + 1].long().repeat(a.copies)
        ids = torch.arange(a.copies)  # distinct ids: each copy draws its own start
        for k, sched in enumerate(a.schedules.split(",")):
            steps, t_start, t_end = sched.split(":")
            t0 = time.time()
            broken, _ = annealed_twin(model, x, y, ids, a.eps, steps=int(steps), restarts=1, t_start=float(t_start),
                                      t_end=float(t_end), seed=k, tag="rates", batch_size=a.copies)
            print(f"{a.model} image {img} {steps} steps T {t_start}->{t_end}: {int(broken.sum())}/{a.copies} restarts "
                  f"broke it ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
