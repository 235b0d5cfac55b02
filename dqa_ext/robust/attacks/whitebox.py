"""White-box gradient attacks written for this project: APGD (untargeted CE / DLR and targeted DLR,
after fra31/auto-attack's autopgd_base.py) and Carlini & Wagner's L2 attack, both batched PyTorch.

APGD takes two models: ``loss_model`` gives the logits that are differentiated (the real model,
whose quantizers back-propagate straight-through; or a smooth twin of it, see adaptive.py) and
``check`` gives the logits that decide success (the real model). Every iterate is checked, and an
example leaves the batch as soon as the real model misclassifies it, so an attack costs what its
survivors cost. Examples are independent (eval mode), so this pruning changes no trajectory.
"""
from __future__ import annotations

import numpy as np
import torch

from .common import ce_loss, device_of, dlr_loss, dlr_targeted_loss, example_uniform, margin, project_linf
from .spec import Outcome, Target


def _loss(name, logits, y, target):
    if name == "ce":
        return ce_loss(logits, y)
    if name == "dlr":
        return dlr_loss(logits, y)
    if name == "margin":  # the largest other logit over the true one: unbounded, unlike CE's saturation
        return -margin(logits, y)
    return dlr_targeted_loss(logits, y, target)


def apgd_run(loss_model, x, y, eps, steps, loss, noise, *, check=None, target=None):
    """One APGD run (L-inf) from the start x + eps * noise / max|noise|.

    Returns (found, x_found, m_near, x_near): which examples the check model misclassified at some
    iterate, and that iterate; per example the smallest margin on the check model among the iterates
    that did not break it, and that iterate (near.py). Step-size schedule, momentum 0.75 and
    restarts-from-best as in Croce & Hein 2020."""
    n = len(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    n2, n_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    scale = noise.flatten(1).abs().amax(1).clamp_min(1e-12).view(view)
    x_adv = (x + eps * noise / scale).clamp(0.0, 1.0)
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    x_found = x.clone()
    m_near, x_near = torch.full((n,), float("inf"), device=x.device), x.clone()

    def evaluate(idx, xa):
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = loss_model(xa)
            li = _loss(loss, logits.float(), y[idx], None if target is None else target[idx])
            (g,) = torch.autograd.grad(li.sum(), xa)
        with torch.no_grad():
            real = logits if check is None else check(xa.detach())
            wrong = real.argmax(1) != y[idx]
            m = margin(real.float(), y[idx])
            closer = ~wrong & (m < m_near[idx])
            m_near[idx[closer]], x_near[idx[closer]] = m[closer], xa.detach()[closer]
        found[idx[wrong]] = True
        x_found[idx[wrong]] = xa.detach()[wrong]
        return li.detach(), g.detach(), wrong

    act = torch.arange(n, device=x.device)
    loss_best, grad, wrong = evaluate(act, x_adv)
    x_best, grad_best = x_adv.clone(), grad.clone()
    step = torch.full((n,), 2.0 * eps, device=x.device)
    x_old = x_adv.clone()
    loss_steps = torch.zeros(steps + 1, n, device=x.device)
    loss_steps[0] = loss_best
    loss_best_last, reduced_last = loss_best.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
    k, since_check = n2, 0
    act = act[~wrong]
    for i in range(steps):
        if len(act) == 0:
            break
        with torch.no_grad():
            xa, xo = x_adv[act], x_old[act]
            a = 0.75 if i > 0 else 1.0
            x1 = project_linf(xa + step[act].view(view) * grad[act].sign(), x[act], eps)
            x1 = project_linf(xa + (x1 - xa) * a + (xa - xo) * (1 - a), x[act], eps)
            x_old[act] = xa
            x_adv[act] = x1
        li, g, wrong = evaluate(act, x1)
        with torch.no_grad():
            grad[act] = g
            loss_steps[i + 1, act] = li
            better = li > loss_best[act]
            b = act[better]
            x_best[b], grad_best[b], loss_best[b] = x1[better], g[better], li[better]
            since_check += 1
            if since_check == k:
                # Halve the step where the loss oscillated (rose in at most 75% of the last k steps)
                # or where it neither improved nor was halved at the last checkpoint; restart there
                # from the best point.
                rises = (loss_steps[i + 2 - k:i + 2] > loss_steps[i + 1 - k:i + 1]).sum(0)
                osc = rises <= k * 0.75
                stale = ~reduced_last & (loss_best_last >= loss_best)
                flag = osc | stale
                reduced_last, loss_best_last = flag, loss_best.clone()
                step[flag] /= 2.0
                x_adv[flag], grad[flag] = x_best[flag], grad_best[flag]
                k, since_check = max(k - size_decr, n_min), 0
        act = act[~wrong]
    return found, x_found, m_near, x_near


def apgd(loss_model, x, y, ids, eps, *, steps, restarts=1, loss="ce", targets=0, seed=0, tag="apgd",
         check=None, batch_size=500, from_image=False, near=None):
    """APGD over restarts (untargeted) or over the top-``targets`` other classes (targeted DLR, one
    run per target and restart), each run only on the examples not yet broken. ``from_image``: every
    run starts at x itself, not at a random point of the ball (at a large epsilon a random point is
    a random image, which is misclassified whatever the gradients do). ``near``: a NearMisses that
    gets each run's closest point on the real model.

    x, y on the model's device; ids: each example's index in the test set (keys its random start).
    Returns (broken bool [N] on the CPU, x_adv [N] with the adversarial iterate where broken)."""
    n = len(x)
    broken = torch.zeros(n, dtype=torch.bool)
    x_adv = x.detach().clone()
    runs = [(r, None) for r in range(restarts)] if loss != "dlr-t" else \
        [(r, t) for t in range(2, targets + 2) for r in range(restarts)]
    for r, t in runs:
        todo = torch.nonzero(~broken).flatten()
        for i in range(0, len(todo), batch_size):
            idx = todo[i:i + batch_size]
            dev_idx = idx.to(x.device)
            xb, yb = x[dev_idx], y[dev_idx]
            target = None
            if t is not None:
                with torch.no_grad():
                    target = loss_model(xb).float().argsort(1)[:, -t]
            noise = (torch.zeros_like(xb) if from_image else
                     example_uniform(ids[idx], tuple(x.shape[1:]), seed, f"{tag}/{t}/{r}").to(x.device))
            found, xf, m_near, x_near = apgd_run(loss_model, xb, yb, eps, steps, loss, noise, check=check,
                                                 target=target)
            if near is not None:
                near.offer(ids[idx], m_near, x_near)
            found = found.cpu()
            broken[idx[found]] = True
            x_adv[dev_idx[found.to(x.device)]] = xf[found.to(x.device)]
    return broken, x_adv


def apgd_best_loss(loss_model, x, y, ids, eps, *, steps, seed=0, tag="transfer", batch_size=500):
    """Highest-cross-entropy points of a sign-gradient run (decaying step) on every example, with no
    early exit: for transfer, a confident adversarial of one model beats the first one found."""
    out = []
    view = (-1,) + (1,) * (x.dim() - 1)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        noise = example_uniform(ids[i:i + batch_size], tuple(x.shape[1:]), seed, tag).to(x.device)
        xa = (xb + eps * noise / noise.flatten(1).abs().amax(1).clamp_min(1e-12).view(view)).clamp(0, 1)
        best, best_loss = xa.clone(), torch.full((len(xb),), -float("inf"), device=x.device)
        step = 2.0 * eps / 4  # plain sign PGD with a decaying step: robust and cheap
        for s in range(steps + 1):
            xa = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                li = ce_loss(loss_model(xa).float(), yb)
                (g,) = torch.autograd.grad(li.sum(), xa)
            with torch.no_grad():
                better = li > best_loss
                best[better], best_loss[better] = xa.detach()[better], li.detach()[better]
                if s == steps:
                    break
                frac = 1.0 - s / steps
                xa = project_linf(xa.detach() + max(frac, 0.1) * step * g.sign(), xb, eps)
        out.append(best)
    return torch.cat(out) if out else x.clone()


def cw_l2(model, x: torch.Tensor, y: torch.Tensor, *, steps: int, search: int, lr: float,
          const: float, confidence: float = 0.0, batch_size: int = 128) -> np.ndarray:
    """Carlini & Wagner's L2 attack (2017): Adam in tanh space on ||d||^2 + c * max(z_y - max z_j, -k),
    binary search over c; returns the smallest successful adversarial per image (x where none).

    Batched PyTorch rather than ART's CarliniL2Method, whose per-iteration line search took ~25 s per
    MNIST image at 30 iterations on a 2-core CPU and so could not run at a useful budget here."""
    dev = device_of(model)
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        n = len(xb)
        lo, hi = torch.zeros(n, device=dev), torch.full((n,), 1e10, device=dev)
        c = torch.full((n,), float(const), device=dev)
        best_l2 = torch.full((n,), float("inf"), device=dev)
        best = xb.clone()
        w0 = torch.atanh((2 * xb - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        onehot = torch.nn.functional.one_hot(yb, model(xb[:1]).shape[1]).bool()
        for _ in range(max(1, search)):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            for _ in range(steps):
                adv = (torch.tanh(w) + 1) / 2
                logits = model(adv)
                real = logits[onehot]
                other = logits.masked_fill(onehot, float("-inf")).amax(1)
                l2 = (adv - xb).flatten(1).pow(2).sum(1)
                loss = (l2 + c * (real - other + confidence).clamp_min(0)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ok = logits.argmax(1) != yb
                    better = ok & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best[better] = adv[better].detach()
                    found |= ok
            # Binary search: shrink c where the attack succeeded, grow it (x10 until bracketed) elsewhere.
            hi = torch.where(found, torch.minimum(hi, c), hi)
            lo = torch.where(found, lo, torch.maximum(lo, c))
            c = torch.where(hi < 1e9, (lo + hi) / 2, c * 10)
        out.append(best.cpu())
    return torch.cat(out).numpy()


def apgd_ce_then_t(loss_model, check, t: Target, *, steps, restarts, targets, restarts_t, tag, losses=("ce",)):
    """APGD on each untargeted loss of ``losses`` in turn (``restarts`` runs each, on what the earlier
    ones left), then APGD-T on what survived (``targets`` classes, ``restarts_t`` runs each); returns
    (broken bool [N] on the CPU, x_adv [N])."""
    x, y, ids, b = t.x, t.y, t.ids, t.budget
    broken, x_adv = torch.zeros(len(x), dtype=torch.bool), x.clone()
    runs = [(loss, restarts, 0) for loss in losses] if restarts else []
    runs += [("dlr-t", restarts_t, targets)] if targets else []
    for loss, n_restarts, n_targets in runs:
        rest = torch.nonzero(~broken).flatten()
        dev_rest = rest.to(x.device)
        # The CE run keeps its historical tag, so the seeds of the suite's older attacks are unchanged.
        name = {"ce": "ce", "dlr-t": "t"}.get(loss, loss)
        b2, xa2 = apgd(loss_model, x[dev_rest], y[dev_rest], ids[rest], t.eps, steps=steps, restarts=n_restarts,
                       loss=loss, targets=n_targets, seed=t.seed, tag=f"{tag}/{name}", check=check,
                       batch_size=b.batch_size, near=t.near)
        broken[rest[b2]] = True
        x_adv[dev_rest[b2.to(x.device)]] = xa2[b2.to(x.device)]
    return broken, x_adv


def run_apgd_ce(t: Target) -> Outcome:
    b = t.budget
    return Outcome(*apgd_ce_then_t(t.model, None, t, steps=b.apgd_steps, restarts=b.apgd_restarts, targets=0,
                                   restarts_t=0, tag="apgd_ce"))


def run_apgd_t(t: Target) -> Outcome:
    b = t.budget
    return Outcome(*apgd_ce_then_t(t.model, None, t, steps=b.apgd_steps, restarts=0, targets=b.apgd_t_targets,
                                   restarts_t=b.apgd_t_restarts, tag="apgd_t"))
