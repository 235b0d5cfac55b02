"""The runner of the evaluation: the attacks of the catalog (attacks/catalog.py) on one model or on
every model of a run, and the measurements the checks judge (checks.py).

The adaptive cascade runs as in AutoAttack: each cascade attack only on the images that every earlier
one left robust, so its cost is the survivors' and the per-example worst case is exact; then the
straight-through and the quantization-aware attack with the highest break rate are rerun on the
survivors with fresh seeds and twice the starts (convergence), APGD-CE from the image itself at an
epsilon covering the whole pixel range must reach 0% (sanity), and the accuracy against epsilon is
swept. The prefix attacks (the paper's) each run alone on their own test-set prefix, beside the
cascade. Under torchrun every rank runs its share (attacks/shard.py).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from . import checks
from .attacks import catalog
from .attacks.adaptive import Variant, has_quantizers
from .attacks.budget import Budget
from .attacks.catalog import QUANT, STE
from .attacks.common import device_of, exact_float32, input_gradients_only, logits_of, predict
from .attacks.near import NearMisses
from .attacks.shard import Shard
from .attacks.spec import Target
from .attacks.transfer import transfer_candidates
from .attacks.whitebox import apgd
from .data import default_eps
from .errors import AttackError
from .models import learned_steps
from .progress import Progress, Silent


# ------------------------------------------------------------------ one attack
def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, budget: Budget, *,
               attack_grad: str = "bpda", x_seed: torch.Tensor | None = None, seed: int = 0,
               num_classes: int = 10, points: dict | None = None) -> dict:
    """One prefix attack alone on (x, y); returns per-example survival (``correct``) and its numbers.
    An example counts as robust only if the model is right on it both clean and under attack.
    ``points``: {image position: (attack, adversarial image)} gets the points that broke images."""
    s = catalog.spec(name)
    if s.stage != "prefix":
        raise AttackError(f"{name} is a cascade attack: it runs in evaluate(), on the survivors of the others")
    if attack_grad not in ("bpda", "zero"):
        raise AttackError(f"attack_grad must be 'bpda' or 'zero', got {attack_grad!r}")
    model.eval()
    t0 = time.time()
    x, y = x.cpu(), y.cpu()
    clean_ok = predict(model, x) == y.numpy()
    zero = attack_grad == "zero" or s.family == "true-gradient"
    out = {"attack": name, "label": s.label, "n": len(x), "eps": eps, "budget": budget.of(s.budget_keys),
           "grad": ("zero" if zero else "ste") if s.uses_gradients else "none"}
    o = s.runner(Target(model, x, y, torch.arange(len(x)), eps, budget, seed=seed, attack_grad=attack_grad,
                        x_seed=x_seed, num_classes=num_classes))
    correct = clean_ok & ~o.broken.numpy()
    if points is not None and o.x_adv is not None:
        for i in np.flatnonzero(clean_ok & o.broken.numpy()).tolist():
            points.setdefault(i, (name, o.x_adv[i].detach().float().cpu()))
    out.update(o.info)
    out.update(acc=float(correct.mean()), correct=correct.astype(int).tolist(), seconds=time.time() - t0)
    return out


def run_cascade_attack(name, model, x, y, ids, eps, b: Budget, *, seed=0, sources=None, near=None):
    """Cascade attack ``name`` on (x, y) (on the model's device). Returns (broken bool [N] on the CPU,
    x_adv [N], info). Every adversarial point is verified again here on the model itself: inside the
    epsilon ball and [0, 1], and misclassified. ``near``: the model's NearMisses (attacks/near.py)."""
    o = catalog.spec(name).runner(Target(model, x, y, ids, eps, b, seed=seed, sources=sources, near=near))
    x_adv, info = o.x_adv.to(x.device), dict(o.info)
    inside = ((x_adv - x).abs().flatten(1).amax(1) <= eps * (1 + 1e-6) + 1e-7) & (x_adv.flatten(1).amin(1) >= 0) \
        & (x_adv.flatten(1).amax(1) <= 1)
    wrong = torch.from_numpy(predict(model, x_adv, b.batch_size) != y.cpu().numpy())
    verified = o.broken & wrong & inside.cpu()
    if int((o.broken & ~verified).sum()):
        info["unverified"] = int((o.broken & ~verified).sum())  # a bug if ever non-zero: counted as robust
    return verified, x_adv, info


def _on_survivors(name, model, xd, yd, ids, robust, eps, b, seed, sources, progress, planned, *, label=None,
                  show=True, points=None, near=None):
    """One cascade attack on the images still robust (``robust``, updated). ``status`` per image:
    1 survived, 0 broken, None not attacked; ``robust_after`` is over these images. ``planned``: the
    units the progress counted on for it; ``show``: print its line (one process: at once);
    ``points``: {test-set index: (attack, adversarial image)} gets the verified points."""
    t = time.time()
    label = label or name
    todo = torch.nonzero(robust).flatten()
    s = catalog.spec(name)
    progress.replan(s.units(b) * len(todo) - planned)
    progress.doing(f"{catalog.label(label)} on {len(todo)} images")
    status, broke, info = [None] * len(robust), 0, {}
    if len(todo):
        dt = todo.to(xd.device)
        broken, x_found, info = run_cascade_attack(name, model, xd[dt], yd[dt], ids[todo], eps, b, seed=seed,
                                                   sources=sources, near=near)
        if points is not None:
            for j in torch.nonzero(broken).flatten().tolist():
                points.setdefault(int(ids[todo[j]]), (label, x_found[j].detach().float().cpu()))
        hit = todo[broken]
        robust[hit] = False
        broke = len(hit)
        for i, bk in zip(todo.tolist(), broken.tolist()):
            status[i] = 0 if bk else 1
    r = {"attack": label, "label": catalog.label(label), "attacked": len(todo), "broke": broke,
         "budget": b.of(s.budget_keys), "status": status,
         "robust_after": float(robust.float().mean()) if len(robust) else 0.0, "seconds": time.time() - t, **info}
    if name == "transfer":
        r.setdefault("sources", list(sources or {}))  # also when no image was left to try them on
    progress.advance(s.units(b) * len(todo), _cascade_line(r) if show else None)
    return r


def most_effective(ran: list[str], broke: dict, attacked: dict) -> str:
    """The attack of ``ran`` with the highest break rate; ties go to the later one (it ran on the
    harder images), so with no break at all the family's last attack is rerun."""
    rate = {a: broke[a] / attacked[a] if attacked[a] else 0.0 for a in ran}
    return max(reversed(ran), key=lambda a: (rate[a], broke[a]))


def merge_shards(parts, clean) -> dict:
    """The ranks' cascades as one: ``parts`` = [(image indices, {label: result on them})]. Statuses
    go back to their images, counts add up, robust_after is recomputed over all n images."""
    n = len(clean)
    robust = np.asarray(clean, bool).copy()
    merged = {}
    for label in parts[0][1]:
        rs = [(idx, c[label]) for idx, c in parts]
        status = [None] * n
        for idx, r in rs:
            for i, st in zip(idx, r["status"]):
                status[i] = st
        # The details of the attack (surrogate, temperature, sources) from a rank that ran it: a rank
        # whose images were all broken earlier has none.
        r = dict(next((q for _, q in rs if q["attacked"]), rs[0][1]))
        r.update(attacked=sum(q["attacked"] for _, q in rs), broke=sum(q["broke"] for _, q in rs), status=status,
                 seconds=max(q["seconds"] for _, q in rs))  # wall time: the slowest rank
        by = [q["broken_by"] for _, q in rs if "broken_by" in q]
        if by:
            r["broken_by"] = {k: sum(b.get(k, 0) for b in by) for k in dict.fromkeys(k for b in by for k in b)}
        hits = [pair for _, q in rs for pair in q.get("start_hits", [])]  # each rank counted its own images
        if any("near_misses" in q for _, q in rs):  # so did the near-miss attacks
            r["near_misses"] = sum(q.get("near_misses", 0) for _, q in rs)
        if hits:
            r["start_hits"] = sorted(hits)
        unverified = sum(q.get("unverified", 0) for _, q in rs)
        if unverified:
            r["unverified"] = unverified
        robust &= np.array([st != 0 for st in status])
        r["robust_after"] = float(robust.mean()) if n else 0.0
        merged[label] = r
    return merged


def _sanity_counts(model, xd, yd, ids, clean, b, seed) -> tuple[int, int]:
    """APGD-CE at a large epsilon (1.0 = the whole pixel range) from each image itself, on the
    clean-correct images: (images it left robust, clean-correct images). It must leave none, and it
    can fail: at x the gradients alone must lead it away (a random start would be a random image)."""
    idx = torch.from_numpy(np.flatnonzero(clean))
    if not len(idx):
        return 0, 0
    di = idx.to(xd.device)
    broken, _ = apgd(model, xd[di], yd[di], ids[idx], b.sanity_eps, steps=b.apgd_steps, restarts=1, loss="ce",
                     seed=seed, tag="sanity", batch_size=b.batch_size, from_image=True)
    return int((~broken).sum()), len(idx)


def default_sweep(eps: float) -> list[float]:
    """Epsilons for the accuracy curves: fractions of the nominal one, up to 4/3 of it."""
    return [round(eps * f, 6) for f in (0.0, 1 / 3, 2 / 3, 1.0, 4 / 3)]


def _sweep_counts(model, xd, yd, ids, eps_list, b: Budget, *, seed=0, quantized=False) -> list[int]:
    """Per epsilon, the images of (xd, yd) that survive APGD-CE (straight-through) and, for quantized
    models, APGD-CE on the clipped twin: the accuracy-against-epsilon curve, which must fall as
    epsilon grows."""
    clean = predict(model, xd, b.batch_size) == yd.cpu().numpy() if len(xd) else np.zeros(0, bool)
    counts = []
    for e in eps_list:
        robust = torch.from_numpy(clean.copy())
        if e > 0:
            for loss_model, check in [(model, None)] + ([(Variant(model, "twin", "clip"), model)] if quantized else []):
                todo = torch.nonzero(robust).flatten()
                if not len(todo):
                    break
                dt = todo.to(xd.device)
                broken, _ = apgd(loss_model, xd[dt], yd[dt], ids[todo], float(e), steps=b.sweep_steps, loss="ce",
                                 seed=seed, tag=f"sweep/{e}", check=check, batch_size=b.batch_size)
                robust[todo[broken]] = False
        counts.append(int(robust.sum()))
    return counts


# ------------------------------------------------------------------ the plan (progress)
def _cascade_order(attacks, quantized: bool) -> list[str]:
    return [s.name for s in catalog.specs()
            if s.stage == "cascade" and s.name in attacks and (quantized or not s.needs_quantizers)]


def _rerun_units(order, b: Budget) -> dict:
    """Per rerun family, the planned units per image (the costliest attack it may rerun)."""
    return {f: max(catalog.spec(a).units(b.scaled(2)) for a in order if catalog.spec(a).family == f)
            for f in (STE, QUANT) if any(catalog.spec(a).family == f for a in order)}


def planned_units(attacks, b: Budget, n: int, quantized: bool, *, sweep: bool, n_sweep_eps: int) -> float:
    """The work one model's evaluation is planned at (``n`` images of this rank), in cost units."""
    order = _cascade_order(attacks, quantized)
    units = sum(catalog.spec(a).units(b) * n for a in order) + sum(_rerun_units(order, b).values()) * n
    units += sum(catalog.spec(a).units(b) * min(n, getattr(b, catalog.spec(a).prefix or "n"))
                 for a in attacks if catalog.spec(a).stage == "prefix")
    units += b.apgd_steps * n if "apgd_ce" in attacks else 0
    units += b.sweep_steps * n_sweep_eps * min(b.sweep_n, n) * (2 if quantized else 1) if sweep else 0
    return units


# ------------------------------------------------------------------ the evaluation of one model
@exact_float32()
def evaluate_model(model: nn.Module, x, y, *, ids=None, eps: float, budget: Budget, attacks=None, seed: int = 0,
                   sources=None, x_seed=None, num_classes: int = 10, attack_grad: str = "bpda", sweep: bool = True,
                   sweep_eps=None, log=print, shard: Shard | None = None, progress: Progress | None = None,
                   points: dict | None = None) -> dict:
    """Attack one classifier (logits out, pixels in [0, 1]) on (x, y); returns a JSON-ready result.

    ids: each image's index in the test set (keys the random streams; default 0..n-1). sources:
    {name: transfer candidates indexed by test-set index} from the other models of the run.
    shard: under torchrun, this rank's part (attacks/shard.py); every rank calls this and gets the
    whole result, per example the same as one process's. progress: where the work is reported (by
    default a line per attack through ``log``). points: a dict that gets, per test-set index of an
    image the worst case counts as broken, (attack, the adversarial image that broke it), for
    adversarial.save (every rank calls it with one or none). TF32 is off throughout."""
    b = budget.validate()
    attacks = catalog.check_attacks(attacks)
    shard = shard or Shard()
    x, y = x.detach().float().cpu(), y.long().cpu()  # moved to the model's device batch by batch
    n = len(x)
    ids = torch.arange(n) if ids is None else torch.as_tensor(ids)
    dev = device_of(model)
    model.eval()
    t0 = time.time()
    quantized = has_quantizers(model)
    eps_list = sweep_eps or default_sweep(eps)
    part = shard.images(n)
    alone = shard.world == 1
    own = progress is None
    if own:
        progress = Progress(planned_units(attacks, b, len(part), quantized, sweep=sweep, n_sweep_eps=len(eps_list)),
                            log=log, bar=False) if shard.main else Silent()
    logits = logits_of(model, x, b.batch_size)
    clean = logits.argmax(1).numpy() == y.numpy()
    out = {"eps": eps, "n": n, "seed": seed, "attack_grad": attack_grad, "quantized": quantized,
           "clean": {"acc": float(clean.mean()), "n": n, "correct": clean.astype(int).tolist()},
           "budget": b.as_dict(), "paper": {}, "cascade": {}}
    shape = checks.predictions(logits.argmax(1).numpy(), bool(torch.isfinite(logits).all()), num_classes)

    # The prefix attacks, each on its own prefix (sharded: each whole attack on one rank).
    prefix = [a for a in attacks if catalog.spec(a).stage == "prefix"]
    mine, my_points = {}, ({} if points is not None else None)
    for name in shard.tasks(prefix):
        s = catalog.spec(name)
        k = min(getattr(b, s.prefix) if s.prefix else n, n)
        progress.doing(f"{s.label} on {k} images")
        found_at = {} if points is not None and s.in_worst_case else None
        mine[name] = run_attack(name, model, x[:k], y[:k], eps, b, attack_grad=attack_grad, x_seed=x_seed,
                                seed=seed, num_classes=num_classes, points=found_at)
        for i, found_point in (found_at or {}).items():
            my_points.setdefault(int(ids[i]), found_point)
        progress.advance(s.units(b) * k, _prefix_line(mine[name]) if alone else None)
    found = {k: v for part_ in shard.gather(mine) for k, v in part_.items()}
    out["paper"] = {name: found[name] for name in prefix}
    if not alone:  # every rank's attacks, once gathered
        for name in prefix:
            progress.say(_prefix_line(out["paper"][name]))

    # The adaptive cascade on this rank's images (all of them in one process).
    robust = torch.from_numpy(clean[part.numpy()].copy())
    xd, yd, pids = x[part].to(dev), y[part].to(dev), ids[part]
    order = _cascade_order(attacks, quantized)
    casc, found_checks = {}, {}
    near = NearMisses()  # the attacks' closest points, for the repair and the near-miss restarts
    with input_gradients_only(model):
        for name in order:
            casc[name] = _on_survivors(name, model, xd, yd, pids, robust, eps, b, seed, sources, progress,
                                       catalog.spec(name).units(b) * len(part), show=alone, points=my_points,
                                       near=near)
        # Convergence: the attack of each rerun family with the highest break rate (broken / attacked
        # over all ranks: the one still finding points), again on the survivors with fresh seeds and
        # twice the starts (and steps, where they scale); every image it breaks is one the run missed.
        counts = shard.gather({a: (casc[a]["broke"], casc[a]["attacked"]) for a in order})
        broke = {a: sum(c[a][0] for c in counts) for a in order}
        attacked = {a: sum(c[a][1] for c in counts) for a in order}
        planned = _rerun_units(order, b)
        for family, (rerun, _, _) in catalog.RERUNS.items():
            ran = [a for a in order if catalog.spec(a).family == family]
            if not ran:
                continue
            strongest = most_effective(ran, broke, attacked)
            r = _on_survivors(strongest, model, xd, yd, pids, robust, eps, b.scaled(2), seed + 1, sources,
                              progress, planned[family] * len(part), label=rerun, show=alone, points=my_points,
                              near=near)
            r.update(rerun_of=strongest)
            casc[rerun] = r
        if "apgd_ce" in attacks:
            progress.doing("the large-epsilon sanity check")
            found_checks["sanity"] = _sanity_counts(model, xd, yd, pids, clean[part.numpy()], b, seed)
            progress.advance(b.apgd_steps * len(part))
        m = min(b.sweep_n, n)  # the sweep's first images
        if sweep:
            progress.doing("the accuracy-against-epsilon sweep")
            first = part < m
            found_checks["sweep"] = _sweep_counts(model, xd[first.to(dev)], yd[first.to(dev)], pids[first], eps_list,
                                                  b, seed=seed, quantized=quantized)
            progress.advance(b.sweep_steps * len(eps_list) * int(first.sum()) * (2 if quantized else 1))
    gathered = shard.gather((part.tolist(), casc, found_checks))
    out["cascade"] = merge_shards([(idx, c) for idx, c, _ in gathered], clean)
    if not alone:
        for r in out["cascade"].values():
            progress.say(_cascade_line(r))
    out["checks"] = {"predictions": shape}
    parts = [c for _, _, c in gathered]
    if "apgd_ce" in attacks:
        kept, total = (sum(p["sanity"][i] for p in parts) for i in (0, 1))
        out["checks"]["sanity"] = ({"eps": b.sanity_eps, "acc": kept / n, "n": n, "steps": b.apgd_steps} if total
                                   else {"eps": b.sanity_eps, "acc": 0.0, "n": 0})
    if sweep:
        counts = [sum(p["sweep"][j] for p in parts) for j in range(len(eps_list))]
        out["checks"]["sweep"] = {"eps": [float(e) for e in eps_list], "n": m, "acc": [c / m for c in counts],
                                  "attack": "APGD-CE" + (" + twin (clip) APGD-CE" if quantized else ""),
                                  "steps": b.sweep_steps}
    out["worst_case"] = checks.worst_case(out)
    if points is not None:
        for found_points in shard.gather(my_points):
            for i, found_point in found_points.items():
                points.setdefault(i, found_point)
    out["checks"].update(checks.gap_checks(out))
    out["steps"] = learned_steps(model)
    out["seconds"] = time.time() - t0
    progress.say(f"  adaptive worst case {out['worst_case']['acc']:.3f} on {n} images ({out['seconds']:.0f}s)")
    if checks.degenerate(out):
        progress.say(f"  warning: {checks.degenerate(out)}")
    if own:
        progress.close()
    return out


def _prefix_line(r):
    return f"  {r['label']:<24} acc {r['acc']:.3f} on {r['n']} images ({r['seconds']:.1f}s)"


def _cascade_line(r):
    return (f"  {r['label']:<24} broke {r['broke']:>4} of {r['attacked']:>4} survivors -> {r['robust_after']:.3f} "
            f"({r['seconds']:.1f}s)")


# ------------------------------------------------------------------ the API
def attack_prefix(dataset, budget: Budget, attacks):
    """(x, y, x_seed, num_classes): the first budget.n test images, and the substitute's seed images
    from the end of the test set, disjoint from them."""
    if isinstance(dataset, tuple):
        x_all, y_all = (torch.as_tensor(t) for t in dataset)
        num_classes = max(10, int(y_all.max()) + 1)
    else:
        x_all, y_all, num_classes = dataset.x_test, dataset.y_test, dataset.num_classes
    x_all, y_all = x_all.float().cpu(), y_all.long().cpu()
    if x_all.min() < 0 or x_all.max() > 1:
        raise AttackError("inputs must be pixels in [0, 1] (normalise inside the model)")
    n_seed = budget.sub_seeds if "substitute" in attacks else 0
    n_avail = len(x_all) - n_seed
    if n_avail < 1:
        raise AttackError(f"the test set ({len(x_all)} images) is smaller than the substitute's seed set")
    n = min(budget.n, n_avail)
    x_seed = x_all[len(x_all) - n_seed:] if n_seed else None
    return x_all[:n], y_all[:n], x_seed, num_classes


def evaluate(model: nn.Module, dataset, attacks=None, *, eps: float | None = None, budget: Budget | None = None,
             attack_grad: str = "bpda", sweep: bool = True, sweep_eps=None, seed: int = 0, sources=None,
             log=print) -> dict:
    """Attack one classifier (logits out, pixels in [0, 1]) and return a JSON-ready result.

    ``dataset`` is a ``data.Dataset`` or an ``(x_test, y_test)`` pair; the first ``budget.n`` test
    images are attacked. ``attacks``: catalog names (default: the default suite). ``eps`` defaults to
    0.3 for 1-channel inputs and 8/255 else."""
    budget = (budget or Budget()).validate()
    attacks = catalog.check_attacks(attacks)
    x, y, x_seed, num_classes = attack_prefix(dataset, budget, attacks)
    eps = eps if eps is not None else default_eps(tuple(x.shape[1:]))
    return evaluate_model(model, x, y, eps=eps, budget=budget, attacks=attacks, seed=seed, sources=sources,
                          x_seed=x_seed, num_classes=num_classes, attack_grad=attack_grad, sweep=sweep,
                          sweep_eps=sweep_eps, log=log)


def evaluate_models(models: dict, dataset, attacks=None, *, eps: float | None = None, budget: Budget | None = None,
                    seed: int = 0, sweep: bool = True, sweep_eps=None, attack_grad: str = "bpda", log=print,
                    on_result=None, cached=None, shard: Shard | None = None, progress_bar: bool | None = None,
                    on_points=None) -> dict:
    """Evaluate several models of one run, each also under transfer from all the others.

    ``on_result(name, result)`` is called as each model finishes (reproduce saves it there), after
    ``on_points(name, points)`` with its adversarial points (see evaluate_model) where given;
    ``cached`` holds results of a resumed run: those models only serve as transfer sources.
    ``shard``: under torchrun, this rank's part (every rank calls this; only rank 0 logs and
    should write), see attacks/shard.py. ``progress_bar``: a bar with the time left (default: when
    stderr is a terminal), else a line per attack with the share done and the time left."""
    budget = (budget or Budget()).validate()
    attacks = catalog.check_attacks(attacks)
    shard = shard or Shard()
    x, y, x_seed, num_classes = attack_prefix(dataset, budget, attacks)
    eps = eps if eps is not None else default_eps(tuple(x.shape[1:]))
    eps_list = sweep_eps or default_sweep(eps)
    part = shard.images(len(x))  # a rank's cascade only ever tries its own images' candidates
    todo = {k: m for k, m in models.items() if not (cached and k in cached)}
    transfer = "transfer" in attacks and len(models) > 1
    units = sum(planned_units(attacks, budget, len(part), has_quantizers(m), sweep=sweep, n_sweep_eps=len(eps_list))
                for m in todo.values())
    units += budget.transfer_steps * len(part) * len(models) if transfer else 0
    progress = Progress(units, log=log, bar=progress_bar) if shard.main else Silent()
    try:
        cands = {}
        if transfer:
            for name, m in models.items():
                t = time.time()
                progress.doing(f"transfer candidates from {name}")
                cands[name] = x.clone()
                cands[name][part] = transfer_candidates(m, x[part], y[part], part, eps, steps=budget.transfer_steps,
                                                        seed=seed, batch_size=budget.batch_size)
                progress.advance(budget.transfer_steps * len(part),
                                 f"-- transfer candidates from {name} ({time.time() - t:.1f}s)")
        results = {}
        for name, m in models.items():
            if name not in todo:
                results[name] = cached[name]
            else:
                progress.say(f"-- attacking {name}")
                points = {} if on_points is not None else None
                results[name] = evaluate_model(m, x, y, eps=eps, budget=budget, attacks=attacks, seed=seed,
                                               sources={k: v for k, v in cands.items() if k != name}, x_seed=x_seed,
                                               num_classes=num_classes, attack_grad=attack_grad, sweep=sweep,
                                               sweep_eps=sweep_eps, shard=shard, progress=progress, points=points)
                if on_points is not None:
                    on_points(name, points)
            if on_result is not None:
                on_result(name, results[name])
    finally:
        progress.close()
    return results
