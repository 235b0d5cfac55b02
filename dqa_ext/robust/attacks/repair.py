"""Repair of near misses: a score-based search on the real model from the point where the gradient
attacks came closest to breaking each surviving image (near.py).

The twins and surrogate backwards lead towards the real model's decision boundary but can stop just
short of it, on a plateau of the piecewise-constant network where no gradient helps. From there,
Square's random search with small windows, accepting moves that leave the margin unchanged, walks
across plateaus on the real model itself."""
from __future__ import annotations

import torch

from .near import near_points
from .scorebased import square_linf
from .spec import Outcome, Target


def run_repair(t: Target) -> Outcome:
    b = t.budget
    broken, x_adv = torch.zeros(len(t.x), dtype=torch.bool), t.x.clone()
    j, start = near_points(t.near, t.ids, t.x.device)
    if len(j):
        dj = j.to(t.x.device)
        hit, xa = square_linf(t.model, t.x[dj], t.y[dj], t.ids[j], t.eps, queries=b.repair_queries,
                              p_init=b.repair_p_init, seed=t.seed, tag="repair", batch_size=b.batch_size, start=start)
        broken[j] = hit
        x_adv[dj] = xa.to(t.x.device)
    return Outcome(broken, x_adv, {"near_misses": len(j)})
