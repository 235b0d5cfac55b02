"""Transfer attacks: adversarial examples crafted on the other models of a run (the ReLU ones too)
and tried on this one. A model whose gradients are masked is often broken by the gradients of an
unmasked model trained on the same data. (The label-only substitute attack of Papernot et al. is
the paper's transfer attack: substitute.py, run from paper.py.)"""
from __future__ import annotations

import torch

from .common import input_gradients_only, logits_of
from .spec import Outcome, Target
from .whitebox import apgd_best_loss


def transfer_candidates(model, x, y, ids, eps, *, steps, seed=0, batch_size=500) -> torch.Tensor:
    """High-loss L-inf points of ``model`` for every image (CPU tensor), to be tried on the others."""
    with input_gradients_only(model):
        dev = next(iter(model.parameters())).device
        return apgd_best_loss(model, x.to(dev), y.to(dev), ids, eps, steps=steps, seed=seed,
                              batch_size=batch_size).cpu()


@torch.no_grad()
def transfer(model, sources: dict, x, y, todo, eps, batch_size=500):
    """Tries every source's candidates on the images ``todo`` (indices); returns (broken bool [N],
    x_adv [N], the source that broke each broken image or None)."""
    n = len(x)
    broken = torch.zeros(n, dtype=torch.bool)
    x_adv = x.clone()
    by = [None] * n
    for name, cand in sources.items():
        idx = todo[~broken[todo]]
        if len(idx) == 0:
            break
        c = cand[idx]
        if (c - x[idx]).abs().max() > eps + 1e-6:
            raise ValueError(f"transfer candidates of {name} leave the eps ball")
        wrong = logits_of(model, c, batch_size).argmax(1) != y[idx]
        hit = idx[wrong]
        broken[hit] = True
        x_adv[hit] = c[wrong]
        for i in hit.tolist():
            by[i] = name
    return broken, x_adv, by


def run_transfer(t: Target) -> Outcome:
    """The candidates of every other model of the run (``t.sources``) on these images."""
    if not t.sources:
        return Outcome(torch.zeros(len(t.x), dtype=torch.bool), t.x.clone(), {"sources": []})
    cands = {k: v[t.ids] for k, v in t.sources.items()}
    broken, x_adv, by = transfer(t.model, cands, t.x.cpu(), t.y.cpu(), torch.arange(len(t.x)), t.eps,
                                 t.budget.batch_size)
    return Outcome(broken, x_adv, {"sources": list(t.sources),
                                   "broken_by": {k: sum(1 for s in by if s == k) for k in t.sources}})
