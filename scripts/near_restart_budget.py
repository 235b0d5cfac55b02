"""How the near-miss restarts' budget buys breaks: runs the default cascade on one model of a
`dqa reproduce` report up to the near-miss repair (default budget, seed 0), then the near-miss
restarts alone on its survivors with each given number of starts and steps, and prints what each
broke (image: starts that broke it) and its time. The figures behind `near_steps` in docs/results.md.

Usage: python scripts/near_restart_budget.py REPORT MODEL [STARTSxSTEPS@SEED ...]
e.g.   python scripts/near_restart_budget.py dqa-report dqa2-pgd 16x100@0 64x100@1 16x400@4 8x800@2
"""
import sys
import time

import torch

from dqa_ext.robust.attacks import catalog
from dqa_ext.robust.attacks.adaptive import has_quantizers
from dqa_ext.robust.attacks.anneal import anneal_starts, near_plan
from dqa_ext.robust.attacks.budget import Budget
from dqa_ext.robust.attacks.common import input_gradients_only
from dqa_ext.robust.attacks.near import NearMisses, near_points
from dqa_ext.robust.checkpoint import load_model
from dqa_ext.robust.data import load_mnist5k
from dqa_ext.robust.evaluate import _cascade_order, run_cascade_attack



def main(report, name, *variants):
    torch.set_num_threads(2)
    d = load_mnist5k()
    x, y, ids = d.x_test[:200].float(), d.y_test[:200].long(), torch.arange(200)
    model = load_model(f"{report}/models/{name}.pt").eval()
    b, near, quantized = Budget(n=200), NearMisses(), has_quantizers(model)
    order = _cascade_order(catalog.default_attacks(), quantized)
    before = order[:order.index("repair") + 1]  # the default cascade up to the repair, in its order
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    with input_gradients_only(model):
        for a in before:
            todo = torch.nonzero(robust).flatten()
            broken, _, _ = run_cascade_attack(a, model, x[todo], y[todo], ids[todo], 0.3, b, near=near)
            robust[todo[broken]] = False
        todo = torch.nonzero(robust).flatten()
        j, best = near_points(near, ids[todo], "cpu")
        _, gradient = near_points(near, ids[todo], "cpu", gradient=True)
        sel = todo[j]
        print(f"{name}: {len(todo)} images left before the near-miss restarts, {len(sel)} with a near miss")
        for v in variants:
            shape, _, seed = v.partition("@")
            starts, steps = map(int, shape.split("x"))
            t = time.time()
            hit, _, hits = anneal_starts(model, x[sel], y[sel], ids[sel], 0.3, steps=steps, restarts=starts,
                                         t_start=b.near_t_start, t_end=b.near_t_end, seed=int(seed or 0),
                                         tag="near_budget", plan=lambda r: near_plan(r, b.near_t_start, b.near_t_end),
                                         origin=(best, gradient), through="twin" if quantized else "model")
            found = {int(sel[k]): int(hits[k]) for k in torch.nonzero(hit).flatten()}
            print(f"  {starts} starts x {steps} steps, seed {seed or 0}: broke {len(found)} {found} "
                  f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
