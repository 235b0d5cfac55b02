"""The annealed twin (attacks.adaptive has the twins): PGD on the sigmoid-staircase twin while its
temperature falls towards the quantizer, many starts per image run side by side as copies of it,
and the same machinery restarted from each image's near miss (near.py), through the twin or with
the model's own gradients. Every iterate is checked on the real model; each image's count of
breaking starts is recorded (a convergence measurement: rare points)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .adaptive import Variant, _twin_layout
from .common import ce_loss, dlr_loss, example_uniform, margin, project_linf
from .near import near_points
from .spec import Outcome, Target


# The first starts are the suite's historical restarts (their random streams and schedules unchanged),
# so a larger budget only adds to what they find: uniform starts cycling the CE, DLR and margin
# losses and alternating a smooth and a sharp temperature. Starts beyond them (the convergence
# rerun's second half, or a larger anneal_restarts) vary everything else too.
CLASSIC_STARTS = 40


def start_plan(r: int, t_start: float, t_start_low: float | None) -> dict:
    """What start ``r`` of the annealed twin does: its loss (0 CE, 1 DLR, 2 margin, 3 the margin
    towards one likely wrong class), starting temperature, start point (uniform in the ball, the
    image itself, a vertex of the ball), step-size factor and target class (its rank by the clean
    logits: 2 is the likeliest wrong class). Steps fall in thirds, without momentum."""
    t0 = t_start_low if (t_start_low is not None and r % 2) else t_start
    if r < CLASSIC_STARTS:
        return {"loss": r % 3, "t0": t0, "start": "uniform", "step": 1.0, "target_rank": 2}
    block = (r - CLASSIC_STARTS) // 8  # eight starts pair the four losses with the two temperatures
    return {"loss": (r // 2) % 4, "t0": t0, "start": ("uniform", "image", "vertex")[block % 3],
            "step": (1.0, 1.5, 0.67)[(block // 3) % 3], "target_rank": 2 + block % 3}


def near_plan(r: int, t_start: float, t_end: float) -> dict:
    """Start ``r`` from a near miss: a point within eps/6 of where the attacks came closest to
    breaking the image, already on the staircase's sharp end (t_start, then alternately a third of
    it, down to t_end), small cosine-decaying steps with momentum, the four losses in turn and the
    targets cycling over the three likeliest wrong classes. Four starts at a time (every loss and
    both temperatures) alternate between two origins: the closest point of all the attacks so far
    (Square's search included) and the gradient attacks' own closest point. A local search of the
    real model's neighbourhood where the gradients of a smoother twin stopped helping."""
    return {"loss": (2, 0, 1, 3)[r % 4], "t0": t_start if r % 2 == 0 else max(t_end, t_start / 3), "t_end": t_end,
            "start": "near", "origin": (r // 4) % 2, "step": 1.0, "schedule": "cosine", "momentum": 0.75,
            "target_rank": 2 + (r // 4) % 3}


# Step sizes as fractions of eps: falling in thirds (the classic starts), or a cosine from the first
# to the second (near starts).
THIRDS = (1 / 6, 1 / 15, 1 / 37.5)
COSINE = (1 / 8, 1 / 100)


def _anneal_loss(logits, y, kind, target):
    """Per copy, the loss its start uses (kind: 0 CE, 1 DLR, 2 margin, 3 targeted margin)."""
    z = logits.float()
    z_t = z.gather(1, target[:, None]).squeeze(1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    losses = torch.stack([ce_loss(z, y), dlr_loss(z, y), -margin(z, y), z_t - z_y])
    return losses.gather(0, kind[None]).squeeze(0)


def _per_copy(values, x, like=None):
    t = torch.tensor(values, device=x.device, dtype=torch.float32)
    return t if like is None else t.view((-1,) + (1,) * (like.dim() - 1))


def anneal_starts(model: nn.Module, x, y, ids, eps, *, steps, restarts, t_start, t_end, t_start_low=None, seed=0,
                  tag="twin_anneal", batch_size=500, near=None, plan=None, origin=None, through="twin"):
    """PGD on the sigmoid-staircase twin while its temperature falls geometrically from each start's
    t0 to t_end (a smooth model first, then ever closer to the quantizer). Each image gets
    ``restarts`` starts (``plan(r)``, default start_plan), run as copies side by side in batches of
    ``batch_size``, each copy with its own temperature schedule, loss, start point, step sizes and
    momentum; every iterate is checked on the real model, and a copy stops when it breaks its image.

    Returns (broken bool [N] on the CPU, x_adv [N], hits int [N]): hits counts, per image, the starts
    that broke it, out of ``restarts``: a convergence measurement (an image that falls to 1 start of
    40 says others may fall to start 41). ``near``: a NearMisses that gets each copy's closest point
    on the real model; ``origin``: two sets of [N] points, which "near" starts start around (the
    plan's "origin" picks one). ``through="model"``:
    the model's own gradients instead of the twin's (straight-through ones for quantizers; the
    temperatures then do nothing). Found by an independent
    evaluation of this project's numbers to break PGD-trained quantized models that
    fixed-temperature twins leave standing."""
    n = len(x)
    plan = plan or (lambda r: start_plan(r, t_start, t_start_low))
    hits = torch.zeros(n, dtype=torch.long)
    x_adv = x.detach().clone()
    twin = Variant(model, "twin", "sigmoid", t_start) if through == "twin" else None
    # Each iterate is checked on a channels_last copy of the model (40% faster on a CPU than the
    # model's own layout), and what it finds broken on the model itself: the copy's last bits may
    # differ, and only the model decides.
    checker = _twin_layout(model)
    grad_model = twin if twin is not None else checker
    copies = [(i, r) for r in range(restarts) for i in range(n)]  # start by start: every image early
    # Copies per batch: on a CPU a few hundred keep the activations in cache (160 ran faster than
    # 500 on 2 cores, by up to a quarter); a GPU wants them all.
    batch_size = batch_size if x.is_cuda else min(batch_size, 160)
    with torch.no_grad():
        ranked = torch.cat([model(x[i:i + batch_size]).float().argsort(1, descending=True)
                            for i in range(0, n, batch_size)]) if n else torch.zeros(0, 10, dtype=torch.long)
    for c in range(0, len(copies), batch_size):
        chunk = copies[c:c + batch_size]
        img = torch.tensor([i for i, _ in chunk])
        plans = [plan(r) for _, r in chunk]
        di = img.to(x.device)
        xb, yb = x[di], y[di]
        noise = torch.empty_like(xb)
        for r in sorted({r for _, r in chunk}):  # each start's own random stream per image
            at = torch.tensor([k for k, (_, rr) in enumerate(chunk) if rr == r], device=x.device)
            noise[at] = example_uniform(ids[img[at.cpu()]], tuple(x.shape[1:]), seed, f"{tag}/{r}").to(x.device)
        centre = xb.clone()
        for k, p in enumerate(plans):
            if p["start"] == "image":
                noise[k] = 0
            elif p["start"] == "vertex":
                noise[k] = noise[k].sign()
            elif p["start"] == "near":
                centre[k], noise[k] = origin[p["origin"]][int(img[k])].to(x.device), noise[k] / 6
        kind = torch.tensor([p["loss"] for p in plans], device=x.device)
        target = ranked[img, torch.tensor([p["target_rank"] for p in plans]) - 1].to(x.device)
        t0 = _per_copy([p["t0"] for p in plans], x)
        t1 = _per_copy([p.get("t_end", t_end) for p in plans], x)
        factor = _per_copy([p["step"] for p in plans], x, like=x)
        cosine = torch.tensor([p.get("schedule") == "cosine" for p in plans], device=x.device)
        mu = _per_copy([p.get("momentum", 0.0) for p in plans], x, like=x)
        xa = project_linf(centre + eps * noise, xb, eps)
        g_m = torch.zeros_like(xa)
        act = torch.arange(len(chunk), device=x.device)  # copies that have not broken their image yet
        m_near, x_near = torch.full((len(chunk),), float("inf"), device=x.device), xb.clone()
        for k in range(steps):
            if not len(act):
                break
            frac = k / max(1, steps - 1)
            if twin is not None:
                twin.temp = t0[act] * (t1[act] / t0[act]) ** frac
            xr = xa[act].detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(_anneal_loss(grad_model(xr), yb[act], kind[act], target[act]).sum(), xr)
            thirds = THIRDS[0] if k < steps // 3 else (THIRDS[1] if k < 2 * steps // 3 else THIRDS[2])
            cos = COSINE[1] + 0.5 * (COSINE[0] - COSINE[1]) * (1 + math.cos(math.pi * k / steps))
            step = torch.where(cosine[act], eps * cos, eps * thirds).view((-1,) + (1,) * (x.dim() - 1))
            with torch.no_grad():
                # sign(g) without momentum; with it, the sign of the running sum of gradients each
                # scaled by its mean magnitude
                g = g / (g.abs().flatten(1).mean(1).view((-1,) + (1,) * (x.dim() - 1)) + 1e-20)
                g_m[act] = mu[act] * g_m[act] + g
                xa[act] = project_linf(xr.detach() + step * factor[act] * g_m[act].sign(), xb[act], eps)
                real = checker(xa[act]).float()
                wrong = real.argmax(1) != yb[act]
                m = margin(real, yb[act])
                found = torch.nonzero(wrong).flatten()
                if len(found) and checker is not model:
                    exact = model(xa[act[found]]).float()
                    wrong[found] = exact.argmax(1) != yb[act[found]]
                    m[found] = margin(exact, yb[act[found]])
                closer = ~wrong & (m < m_near[act])
                m_near[act[closer]], x_near[act[closer]] = m[closer], xa[act[closer]]
            done = act[wrong].cpu()
            for j in done.tolist():
                i = int(img[j])
                if hits[i] == 0:
                    x_adv[i] = xa[j]
                hits[i] += 1
            act = act[~wrong]
        if near is not None:
            near.offer(ids[img], m_near, x_near)
    return hits > 0, x_adv, hits


def annealed_twin(model: nn.Module, x, y, ids, eps, **kw):
    """anneal_starts without the per-image counts: (broken bool [N] on the CPU, x_adv [N])."""
    broken, x_adv, _ = anneal_starts(model, x, y, ids, eps, **kw)
    return broken, x_adv


def run_twin_anneal(t: Target) -> Outcome:
    b = t.budget
    broken, x_adv, hits = anneal_starts(t.model, t.x, t.y, t.ids, t.eps, steps=b.anneal_steps,
                                        restarts=b.anneal_restarts, t_start=b.anneal_t_start, t_end=b.anneal_t_end,
                                        t_start_low=b.anneal_t_start_low, seed=t.seed, tag="twin_anneal",
                                        batch_size=b.batch_size, near=t.near)
    return Outcome(broken, x_adv, {"surrogate": "sigmoid", "mode": "twin", "starts": b.anneal_restarts,
                                   "temperature": [b.anneal_t_start, b.anneal_t_start_low, b.anneal_t_end],
                                   "start_hits": [[int(t.ids[i]), int(hits[i])] for i in torch.nonzero(broken).flatten()]})


def run_twin_anneal_near(t: Target) -> Outcome:
    """The annealed twin again, each start from near the point where the attacks so far came
    closest to breaking the image (images without one are not attacked)."""
    return _from_near_misses(t, "twin_anneal_near", "twin")


def run_pgd_near(t: Target) -> Outcome:
    """The same starts from near misses with the model's own gradients (a ReLU model's true ones, a
    quantized model's straight-through ones): sharp local searches that fresh random restarts miss."""
    return _from_near_misses(t, "pgd_near", "model")


def _from_near_misses(t: Target, tag: str, through: str) -> Outcome:
    b = t.budget
    broken, x_adv = torch.zeros(len(t.x), dtype=torch.bool), t.x.clone()
    j, origin = near_points(t.near, t.ids, t.x.device)
    _, gradient_origin = near_points(t.near, t.ids, t.x.device, gradient=True)
    pairs = []
    if len(j):
        dj = j.to(t.x.device)
        steps = b.near_steps if through == "twin" else b.near_pgd_steps
        hit, xa, hits = anneal_starts(t.model, t.x[dj], t.y[dj], t.ids[j], t.eps, steps=steps,
                                      restarts=b.near_restarts, t_start=b.near_t_start, t_end=b.near_t_end,
                                      seed=t.seed, tag=tag, batch_size=b.batch_size, near=t.near,
                                      plan=lambda r: near_plan(r, b.near_t_start, b.near_t_end),
                                      origin=(origin, gradient_origin), through=through)
        broken[j] = hit
        x_adv[dj] = xa
        pairs = [[int(t.ids[j[k]]), int(hits[k])] for k in torch.nonzero(hit).flatten().tolist()]
    info = {"surrogate": "sigmoid", "mode": "twin", "temperature": [b.near_t_start, b.near_t_end]} \
        if through == "twin" else {"gradients": "the model's own (straight-through through quantizers)"}
    return Outcome(broken, x_adv, {**info, "starts": b.near_restarts, "near_misses": len(j), "start_hits": pairs})
