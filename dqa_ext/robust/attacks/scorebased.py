"""Score-based (gradient-free) attacks: Square (Andriushchenko et al. 2020), L-inf, written for this
project after fra31/auto-attack's square.py so that it runs only on the survivors, batched, with a
random stream per example (ART's SquareAttack is cross-checked against it in the tests). Gradient
masking cannot hide a model from it: it only queries the logits."""
from __future__ import annotations

import math

import numpy as np
import torch

from .adaptive import _twin_layout
from .common import example_generators, margin, project_linf
from .near import SEARCH
from .spec import Outcome, Target


def _p_selection(p_init: float, it: int, n_queries: int) -> float:
    """AutoAttack's schedule of the square's area fraction, rescaled to n_queries."""
    it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


@torch.no_grad()
def square_linf(model, x, y, ids, eps, *, queries, p_init=0.8, seed=0, tag="square", batch_size=500, start=None,
                near=None):
    """Returns (broken bool [N] on the CPU, x_adv [N]). model: logits of the real model. ``start``:
    the points to search from (inside the ball; default: Square's vertical stripes of +-eps).
    ``near``: a NearMisses that gets each survivor's final point (the smallest margin Square found)."""
    n = len(x)
    broken = torch.zeros(n, dtype=torch.bool)
    x_adv = x.clone()
    # The queries go to a channels_last copy on a CPU (a third faster); what each search ends at is
    # judged on the model itself.
    query = _twin_layout(model)
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        b, xa, m = _square_batch(model, query, x[sl], y[sl], ids[sl], eps, queries, p_init, seed, tag,
                                 None if start is None else start[sl])
        broken[sl], x_adv[sl] = b.cpu(), xa
        if near is not None:
            near.offer(ids[sl], m, xa, source=SEARCH)
    return broken, x_adv


def _square_batch(model, query, x, y, ids, eps, queries, p_init, seed, tag, start=None):
    n, c, h, w = x.shape
    dev = x.device
    # Each example's whole random stream, drawn up front from its own generator: the start's
    # stripe signs, then per query a window position (two uniforms) and c signs.
    gens = example_generators(ids, seed, tag)
    sign = lambda u: torch.where(u < 0.5, -1.0, 1.0)  # noqa: E731
    init = torch.from_numpy(np.stack([g.random(c * w) for g in gens]).astype(np.float32))
    draws = torch.from_numpy(np.stack([g.random((queries, 2 + c)) for g in gens]).astype(np.float32)).to(dev)
    init = sign(init.to(dev)).view(n, c, 1, w)  # vertical stripes of +-eps, as in the paper
    x_best = (x + eps * init).clamp(0.0, 1.0) if start is None else project_linf(start.to(dev), x, eps)
    m_best = margin(query(x_best).float(), y)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    for it in range(queries):
        act = torch.nonzero(m_best > 0).flatten()
        if len(act) == 0:
            break
        p = _p_selection(p_init, it, queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w))
        u = draws[act, it]
        vh = (u[:, 0] * (h - s + 1)).long().clamp_(max=h - s)[:, None]
        vw = (u[:, 1] * (w - s + 1)).long().clamp_(max=w - s)[:, None]
        window = (((rows >= vh) & (rows < vh + s))[:, :, None] & ((cols >= vw) & (cols < vw + s))[:, None, :])
        delta = 2.0 * eps * sign(u[:, 2:2 + c]).view(-1, c, 1, 1) * window[:, None].float()
        xa, xc = x_best[act], x[act]
        x_new = project_linf(xa + delta, xc, eps)
        m_new = margin(query(x_new).float(), y[act])
        better = m_new <= m_best[act]  # ties too: on a piecewise-constant model progress crosses plateaus
        x_best[act[better]], m_best[act[better]] = x_new[better], m_new[better]
    logits = model(x_best).float()
    return (logits.argmax(1) != y).cpu(), x_best.cpu(), margin(logits, y).cpu()


def run_square(t: Target) -> Outcome:
    b = t.budget
    return Outcome(*square_linf(t.model, t.x, t.y, t.ids, t.eps, queries=b.square_queries, p_init=b.square_p_init,
                                seed=t.seed, tag="square", batch_size=b.batch_size, near=t.near))
