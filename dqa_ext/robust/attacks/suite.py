"""The evaluation: the adaptive suite, the paper's attacks, the per-example worst case and the
checks that say how far to trust it.

The adaptive suite is a cascade, as in AutoAttack: each attack runs only on the images that every
earlier one left robust, so the cost stays low and the per-example worst case is exact:

  apgd_ce        APGD, cross-entropy, restarts              white-box, straight-through gradients
  apgd_t         APGD-T: targeted DLR on the top-9 classes  white-box, straight-through gradients
  twin_clip      APGD-CE + APGD-T on the clipped-identity twin, every iterate checked on the model
  twin_sig_low   the same on the sigmoid-staircase twin, low temperature (close to the quantizer)
  twin_sig_high  the same, high temperature (smoother)
  bpda_sig       exact forward, sigmoid-staircase backward (BPDA), APGD-CE + APGD-T
  twin_anneal    PGD on the sigmoid twin while its temperature anneals towards the quantizer
  square         Square, L-inf, score-based
  transfer       the other models' high-loss points
  rerun_2x       the straight-through attack that broke the most, rerun with twice the steps and
                 restarts (rerun_2x_quant: the same for the quantization-aware attacks)

(the twin and BPDA attacks only for models with quantized activations). The paper's attacks run
beside it on their own prefixes, and every one of them enters the worst case too.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn

from ..models import learned_steps
from ..train import default_eps
from .adaptive import Variant, annealed_twin, has_quantizers
from .budget import AttackError, Budget
from .common import device_of, input_gradients_only, predict
from .paper import CROSS_CHECKS, LABELS as PAPER_LABELS, PAPER, run_attack
from .scorebased import square_linf
from .shard import Shard
from .transfer import transfer, transfer_candidates
from .whitebox import apgd

STE = ("apgd_ce", "apgd_t")
QUANT_AWARE = ("twin_clip", "twin_sig_low", "twin_sig_high", "bpda_sig", "twin_anneal")
BLACK_BOX = ("square", "transfer")
CASCADE = STE + QUANT_AWARE + BLACK_BOX
GRADIENT = STE + QUANT_AWARE
DEFAULT_ATTACKS = CASCADE + PAPER
ATTACKS = CASCADE + PAPER + CROSS_CHECKS
LABELS = {"apgd_ce": "APGD-CE", "apgd_t": "APGD-T", "twin_clip": "Twin (clip)",
          "twin_sig_low": "Twin (sigmoid, low T)", "twin_sig_high": "Twin (sigmoid, high T)",
          "bpda_sig": "BPDA (sigmoid)", "twin_anneal": "Twin (annealed T)", "square": "Square", "transfer": "Transfer",
          "rerun_2x": "Rerun x2",
          "rerun_2x_quant": "Rerun x2 (quant.-aware)",
          **PAPER_LABELS}
# What each cascade attack is, in one line (the report prints these).
DESCRIPTIONS = {
    "apgd_ce": "APGD on the cross-entropy, straight-through gradients",
    "apgd_t": "APGD on the targeted DLR loss, top-k other classes, straight-through gradients",
    "twin_clip": "APGD-CE + APGD-T on a twin whose quantizers are clamp(x, 0, qmax*s), checked on the model",
    "twin_sig_low": "the same on a sigmoid-staircase twin at the low temperature",
    "twin_sig_high": "the same on a sigmoid-staircase twin at the high temperature",
    "bpda_sig": "exact forward, sigmoid-staircase derivative in the backward",
    "twin_anneal": "PGD on the sigmoid-staircase twin with its temperature annealed towards the quantizer "
                   "(restarts cycle CE, DLR and margin losses and alternate a smooth and a sharp start), "
                   "checked on the model",
    "square": "Square (score-based, no gradients)",
    "transfer": "the other models' high-loss points",
    "rerun_2x": "the straight-through attack that broke the most, rerun on the survivors with twice the steps "
                "and restarts",
    "rerun_2x_quant": "the quantization-aware attack that broke the most, rerun the same way",
}
PAPER_GRADIENT = ("fgsm", "pgd", "cw")
PAPER_BLACK_BOX = ("zoo", "substitute")


def check_attacks(attacks) -> list[str]:
    attacks = list(attacks)
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        raise AttackError(f"unknown attack {', '.join(map(repr, bad))}; choose from {', '.join(ATTACKS)}")
    return attacks


# ------------------------------------------------------------------ one cascade attack
def _gradient(loss_model, check, x, y, ids, eps, *, steps, restarts, targets, restarts_t, seed, tag, batch):
    """APGD-CE, then APGD-T on what survived; returns (broken bool [N] on the CPU, x_adv [N])."""
    broken, x_adv = torch.zeros(len(x), dtype=torch.bool), x.clone()
    if restarts:
        broken, x_adv = apgd(loss_model, x, y, ids, eps, steps=steps, restarts=restarts, loss="ce", seed=seed,
                             tag=f"{tag}/ce", check=check, batch_size=batch)
    if targets:
        rest = torch.nonzero(~broken).flatten()
        dev_rest = rest.to(x.device)
        b2, xa2 = apgd(loss_model, x[dev_rest], y[dev_rest], ids[rest], eps, steps=steps, restarts=restarts_t,
                       loss="dlr-t", targets=targets, seed=seed, tag=f"{tag}/t", check=check, batch_size=batch)
        broken[rest[b2]] = True
        x_adv[dev_rest[b2.to(x.device)]] = xa2[b2.to(x.device)]
    return broken, x_adv


def run_cascade_attack(name, model, x, y, ids, eps, b: Budget, *, seed=0, sources=None):
    """Runs cascade attack ``name`` on (x, y) (on the model's device).

    Returns (broken bool [N] on the CPU, x_adv [N], info). Every adversarial point is verified
    again here on the model itself: inside the epsilon ball and [0, 1], and misclassified."""
    info = {}
    kw = dict(seed=seed, tag=name, batch=b.batch_size)
    if name == "apgd_ce":
        broken, x_adv = _gradient(model, None, x, y, ids, eps, steps=b.apgd_steps, restarts=b.apgd_restarts,
                                  targets=0, restarts_t=0, **kw)
    elif name == "apgd_t":
        broken, x_adv = _gradient(model, None, x, y, ids, eps, steps=b.apgd_steps, restarts=0,
                                  targets=b.apgd_t_targets, restarts_t=b.apgd_t_restarts, **kw)
    elif name == "twin_anneal":
        broken, x_adv = annealed_twin(model, x, y, ids, eps, steps=b.anneal_steps, restarts=b.anneal_restarts,
                                      t_start=b.anneal_t_start, t_end=b.anneal_t_end, t_start_low=b.anneal_t_start_low,
                                      seed=seed, tag=name, batch_size=b.batch_size)
        info = {"surrogate": "sigmoid", "temperature": [b.anneal_t_start, b.anneal_t_start_low, b.anneal_t_end],
                "mode": "twin"}
    elif name in QUANT_AWARE:
        kind, temp = {"twin_clip": ("clip", 0.0), "twin_sig_low": ("sigmoid", b.twin_temp_low),
                      "twin_sig_high": ("sigmoid", b.twin_temp_high), "bpda_sig": ("sigmoid", b.twin_temp_high)}[name]
        mode = "bpda" if name == "bpda_sig" else "twin"
        loss_model = Variant(model, mode, kind, temp)
        broken, x_adv = _gradient(loss_model, model if mode == "twin" else None, x, y, ids, eps, steps=b.twin_steps,
                                  restarts=b.twin_restarts, targets=b.twin_targets, restarts_t=b.twin_restarts, **kw)
        info = {"surrogate": kind, "temperature": temp or None, "mode": mode}
    elif name == "square":
        broken, x_adv = square_linf(model, x, y, ids, eps, queries=b.square_queries, p_init=b.square_p_init,
                                    seed=seed, tag=name, batch_size=b.batch_size)
    elif name == "transfer":
        if not sources:
            return torch.zeros(len(x), dtype=torch.bool), x.clone(), {"sources": []}
        cands = {k: v[ids] for k, v in sources.items()}
        broken, x_adv, by = transfer(model, cands, x.cpu(), y.cpu(), torch.arange(len(x)), eps, b.batch_size)
        info = {"sources": list(sources), "broken_by": {k: sum(1 for s in by if s == k) for k in sources}}
    else:
        raise AttackError(f"unknown attack {name!r}")
    x_adv = x_adv.to(x.device)
    inside = ((x_adv - x).abs().flatten(1).amax(1) <= eps * (1 + 1e-6) + 1e-7) & (x_adv.flatten(1).amin(1) >= 0) \
        & (x_adv.flatten(1).amax(1) <= 1)
    wrong = torch.from_numpy(predict(model, x_adv, b.batch_size) != y.cpu().numpy())
    verified = broken & wrong & inside.cpu()
    if int((broken & ~verified).sum()):
        info["unverified"] = int((broken & ~verified).sum())  # a bug if ever non-zero: counted as robust
    return verified, x_adv, info


def _budget_keys(name: str) -> list[str]:
    return {"apgd_ce": ["apgd_steps", "apgd_restarts"], "apgd_t": ["apgd_steps", "apgd_t_targets", "apgd_t_restarts"],
            "square": ["square_queries", "square_p_init"], "transfer": ["transfer_steps"],
            "twin_anneal": ["anneal_steps", "anneal_restarts", "anneal_t_start", "anneal_t_start_low", "anneal_t_end"]}.get(
        name, ["twin_steps", "twin_restarts", "twin_targets", "twin_temp_low", "twin_temp_high"])


# ------------------------------------------------------------------ the evaluation of one model
def evaluate_model(model: nn.Module, x, y, *, ids=None, eps: float, budget: Budget, attacks=DEFAULT_ATTACKS,
                   seed: int = 0, sources=None, x_seed=None, num_classes: int = 10, attack_grad: str = "bpda",
                   sweep: bool = True, sweep_eps=None, log=print, shard: Shard | None = None) -> dict:
    """Attack one classifier (logits out, pixels in [0, 1]) on (x, y); returns a JSON-ready result.

    ids: each image's index in the test set (keys the random streams; default 0..n-1). sources:
    {name: transfer candidates indexed by test-set index} from the other models of the run.
    shard: under torchrun, this rank's part (shard.py); every rank calls this and gets the whole
    result, per example the same as one process's."""
    b = budget.validate()
    attacks = check_attacks(attacks)
    shard = shard or Shard()
    x, y = x.detach().float().cpu(), y.long().cpu()  # moved to the model's device batch by batch
    n = len(x)
    ids = torch.arange(n) if ids is None else torch.as_tensor(ids)
    dev = device_of(model)
    model.eval()
    t0 = time.time()
    clean = predict(model, x, b.batch_size) == y.numpy()
    quantized = has_quantizers(model)
    out = {"eps": eps, "n": n, "seed": seed, "attack_grad": attack_grad, "quantized": quantized,
           "clean": {"acc": float(clean.mean()), "n": n, "correct": clean.astype(int).tolist()},
           "budget": dataclasses.asdict(b), "paper": {}, "cascade": {}}
    alone = shard.world == 1
    quiet = (lambda *_: None)

    # The paper's attacks, each on its own prefix (sharded: each whole attack on one rank).
    paper = [a for a in attacks if a in PAPER + CROSS_CHECKS]
    mine = {}
    for name in shard.tasks(paper):
        k = min({"cw": b.cw_n, "cw_art": b.cw_n, "zoo": b.zoo_n}.get(name, n), n)
        mine[name] = run_attack(name, model, x[:k], y[:k], eps, b, attack_grad=attack_grad, x_seed=x_seed,
                                seed=seed, num_classes=num_classes)
        if alone:
            log(_paper_line(name, mine[name]))
    found = {k: v for part in shard.gather(mine) for k, v in part.items()}
    out["paper"] = {name: found[name] for name in paper}
    if not alone:
        for name in paper:
            log(_paper_line(name, out["paper"][name]))

    # The adaptive cascade on this rank's images (all of them in one process).
    part = shard.images(n)
    robust = torch.from_numpy(clean[part.numpy()].copy())
    xd, yd, pids = x[part].to(dev), y[part].to(dev), ids[part]
    order = [a for a in CASCADE if a in attacks and (quantized or a not in QUANT_AWARE)]
    casc = {}
    step_log = log if alone else quiet
    with input_gradients_only(model):
        for name in order:
            casc[name] = _run_on_survivors(name, model, xd, yd, pids, robust, eps, b, seed, sources, step_log)
        # Convergence: the strongest straight-through and the strongest quantization-aware attack
        # (the ones that broke the most over all ranks), again on the survivors with twice the
        # steps and restarts.
        broke = {a: sum(c[a] for c in shard.gather({a: casc[a]["broke"] for a in order})) for a in order}
        reruns = []
        for family in (STE, QUANT_AWARE):
            ran = [a for a in order if a in family]
            if ran:
                reruns.append(max(ran, key=lambda a: broke[a]))
        for k, strongest in enumerate(reruns):
            label = "rerun_2x" if k == 0 else "rerun_2x_quant"
            r = _run_on_survivors(strongest, model, xd, yd, pids, robust, eps, b.scaled(2), seed + 1, sources,
                                  step_log, label=label)
            r.update(rerun_of=strongest)
            casc[label] = r
        checks = {}
        if "apgd_ce" in attacks:
            checks["sanity"] = _sanity_counts(model, xd, yd, pids, clean[part.numpy()], b, seed)
        m, eps_list = min(b.sweep_n, n), sweep_eps or default_sweep(eps)  # the sweep's first images
        if sweep:
            first = part < m
            checks["sweep"] = _sweep_counts(model, xd[first.to(dev)], yd[first.to(dev)], pids[first], eps_list, b,
                                            seed=seed, quantized=quantized)
    gathered = shard.gather((part.tolist(), casc, checks))
    out["cascade"] = _merge_cascade([(idx, c) for idx, c, _ in gathered], clean)
    if not alone:
        for r in out["cascade"].values():
            log(_cascade_line(r))
    out["checks"] = {}
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
    out["worst_case"] = worst_case(out)
    out["checks"].update(gap_checks(out))
    out["steps"] = learned_steps(model)
    out["seconds"] = time.time() - t0
    log(f"  adaptive worst case {out['worst_case']['acc']:.3f} on {n} images ({out['seconds']:.0f}s)")
    return out


def _paper_line(name, r):
    return f"  {LABELS[name]:<24} acc {r['acc']:.3f} on {r['n']} images ({r['seconds']:.1f}s)"


def _cascade_line(r):
    return (f"  {r['label']:<24} broke {r['broke']:>4} of {r['attacked']:>4} survivors -> {r['robust_after']:.3f} "
            f"({r['seconds']:.1f}s)")


def _run_on_survivors(name, model, xd, yd, ids, robust, eps, b, seed, sources, log, label=None):
    """One cascade attack on the images still robust (``robust``, updated). ``status`` per image:
    1 survived, 0 broken, None not attacked; ``robust_after`` is over these images."""
    t = time.time()
    label = label or name
    todo = torch.nonzero(robust).flatten()
    status = [None] * len(robust)
    broke = 0
    info = {}
    if len(todo):
        dt = todo.to(xd.device)
        broken, _, info = run_cascade_attack(name, model, xd[dt], yd[dt], ids[todo], eps, b, seed=seed,
                                             sources=sources)
        hit = todo[broken]
        robust[hit] = False
        broke = len(hit)
        for i, bk in zip(todo.tolist(), broken.tolist()):
            status[i] = 0 if bk else 1
    r = {"attack": label, "label": LABELS[label], "attacked": len(todo), "broke": broke,
         "budget": {k: getattr(b, k) for k in _budget_keys(name)}, "status": status,
         "robust_after": float(robust.float().mean()) if len(robust) else 0.0, "seconds": time.time() - t, **info}
    if name == "transfer":
        r.setdefault("sources", list(sources or {}))  # also when no image was left to try them on
    log(_cascade_line(r))
    return r


def _merge_cascade(parts, clean) -> dict:
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
        unverified = sum(q.get("unverified", 0) for _, q in rs)
        if unverified:
            r["unverified"] = unverified
        robust &= np.array([st != 0 for st in status])
        r["robust_after"] = float(robust.mean()) if n else 0.0
        merged[label] = r
    return merged


def _sanity_counts(model, xd, yd, ids, clean, b, seed) -> tuple[int, int]:
    """APGD-CE at a large epsilon (1.0 = the whole pixel range) on the clean-correct images: (images
    it left robust, clean-correct images). It must leave none."""
    idx = torch.from_numpy(np.flatnonzero(clean))
    if not len(idx):
        return 0, 0
    di = idx.to(xd.device)
    broken, _ = apgd(model, xd[di], yd[di], ids[idx], b.sanity_eps, steps=b.apgd_steps, restarts=1, loss="ce",
                     seed=seed, tag="sanity", batch_size=b.batch_size)
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


# ------------------------------------------------------------------ worst case and checks
def _broken(status_or_correct, n, *, paper=False):
    """bool [n]: broken by this attack (paper results give `correct` on a prefix, clean-wrong included)."""
    out = np.zeros(n, bool)
    if paper:
        c = np.asarray(status_or_correct, bool)
        out[:len(c)] = ~c
    else:
        out[:] = [s == 0 for s in status_or_correct]
    return out


def worst_case(ev: dict) -> dict:
    """Per example: robust only if classified right and no attack (cascade or paper) broke it."""
    n = ev["n"]
    robust = np.asarray(ev["clean"]["correct"], bool).copy()
    for r in ev["cascade"].values():
        robust &= ~_broken(r["status"], n)
    for name, r in ev["paper"].items():
        if name in PAPER:  # the cross-checks are comparisons, not part of the evaluation
            robust &= ~_broken(r["correct"], n, paper=True)
    return {"acc": float(robust.mean()), "n": n, "robust": robust.astype(int).tolist(),
            "attacks": list(ev["cascade"]) + [a for a in ev["paper"] if a in PAPER]}


def gap_checks(ev: dict) -> dict:
    """The masking checks that compare attack families, per example, with counts out of n."""
    n = ev["n"]
    casc, paper = ev["cascade"], ev["paper"]
    clean = np.asarray(ev["clean"]["correct"], bool)

    def union(names, source, is_paper=False):
        u = np.zeros(n, bool)
        for a in names:
            if a in source:
                u |= _broken(source[a]["correct" if is_paper else "status"], n, paper=is_paper) & clean
        return u

    ste = union(STE, casc) | union(PAPER_GRADIENT, paper, True)
    quant = union(QUANT_AWARE, casc)
    gradient = ste | quant | union(["rerun_2x", "rerun_2x_quant"], casc)
    black = union(BLACK_BOX, casc) | union(PAPER_BLACK_BOX, paper, True)
    checks = {"ste_vs_quant_aware": {"only_quant_aware": int((quant & ~ste).sum()), "n": n,
                                     "ran": any(a in casc for a in QUANT_AWARE)},
              "black_box_vs_gradient": {"only_black_box": int((black & ~gradient).sum()), "n": n}}
    reruns = [casc[k] for k in ("rerun_2x", "rerun_2x_quant") if k in casc]
    if reruns:
        checks["convergence"] = {"attack": " + ".join(r["rerun_of"] for r in reruns),
                                 "attacks": [r["rerun_of"] for r in reruns],
                                 "extra_broken": sum(r["broke"] for r in reruns),
                                 "survivors": reruns[0]["attacked"], "n": n}
    return checks


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


def evaluate(model: nn.Module, dataset, attacks=DEFAULT_ATTACKS, *, eps: float | None = None,
             budget: Budget | None = None, attack_grad: str = "bpda", sweep: bool = True, sweep_eps=None,
             seed: int = 0, sources=None, log=print) -> dict:
    """Attack one classifier (logits out, pixels in [0, 1]) and return a JSON-ready result.

    ``dataset`` is a ``data.Dataset`` or an ``(x_test, y_test)`` pair; the first ``budget.n`` test
    images are attacked. ``eps`` defaults to 0.3 for 1-channel inputs and 8/255 else."""
    budget = (budget or Budget()).validate()
    attacks = check_attacks(attacks)
    x, y, x_seed, num_classes = attack_prefix(dataset, budget, attacks)
    eps = eps if eps is not None else default_eps(tuple(x.shape[1:]))
    return evaluate_model(model, x, y, eps=eps, budget=budget, attacks=attacks, seed=seed, sources=sources,
                          x_seed=x_seed, num_classes=num_classes, attack_grad=attack_grad, sweep=sweep,
                          sweep_eps=sweep_eps, log=log)


def evaluate_models(models: dict, dataset, attacks=DEFAULT_ATTACKS, *, eps: float | None = None,
                    budget: Budget | None = None, seed: int = 0, sweep: bool = True, sweep_eps=None,
                    attack_grad: str = "bpda", log=print, on_result=None, cached=None,
                    shard: Shard | None = None) -> dict:
    """Evaluate several models of one run, each also under transfer from all the others.

    ``on_result(name, result)`` is called as each model finishes (reproduce saves it there);
    ``cached`` holds results of a resumed run: those models only serve as transfer sources.
    ``shard``: under torchrun, this rank's part (every rank calls this; only rank 0 logs and
    should write), see shard.py."""
    budget = (budget or Budget()).validate()
    attacks = check_attacks(attacks)
    shard = shard or Shard()
    log = log if shard.main else (lambda *_: None)
    x, y, x_seed, num_classes = attack_prefix(dataset, budget, attacks)
    eps = eps if eps is not None else default_eps(tuple(x.shape[1:]))
    cands = {}
    if "transfer" in attacks and len(models) > 1:
        part = shard.images(len(x))  # a rank's cascade only ever tries its own images' candidates
        for name, m in models.items():
            t = time.time()
            cands[name] = x.clone()
            cands[name][part] = transfer_candidates(m, x[part], y[part], part, eps, steps=budget.transfer_steps,
                                                    seed=seed, batch_size=budget.batch_size)
            log(f"-- transfer candidates from {name} ({time.time() - t:.1f}s)")
    results = {}
    for name, m in models.items():
        if cached and name in cached:
            results[name] = cached[name]
            if on_result is not None:
                on_result(name, results[name])
            continue
        log(f"-- attacking {name}")
        results[name] = evaluate_model(m, x, y, eps=eps, budget=budget, attacks=attacks, seed=seed,
                                       sources={k: v for k, v in cands.items() if k != name}, x_seed=x_seed,
                                       num_classes=num_classes, attack_grad=attack_grad, sweep=sweep,
                                       sweep_eps=sweep_eps, log=log, shard=shard)
        if on_result is not None:
            on_result(name, results[name])
    return results
