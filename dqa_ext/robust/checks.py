"""The judge: what an evaluation's per-example results mean (report.py only renders them).

  worst_case      per image, robust only if classified right and no attack of the worst case broke it
  gap_checks      images that one family of attacks broke and another did not (masked gradients)
  predictions     whether the clean predictions are degenerate (constant, or not finite)
  flags           the evaluation's weaknesses, each with the numbers that raised it: Carlini et al.
                  2019's checklist (not converged: any image a rerun finds; masked straight-through
                  gradients, black-box beats white-box, accuracy not falling with epsilon, a large
                  epsilon not reaching 0%, single-step beating iterative, an unbounded attack not
                  reaching 100%) and a model whose predictions are degenerate
  at_chance       whether an accuracy on n images is at chance (intervals and tests: stats.py)
"""
from __future__ import annotations

import math

import numpy as np

from .attacks import catalog
from .attacks.catalog import BLACK, QUANT, STE

# A model that predicts one class for this share of the images has collapsed (constant predictions).
DEGENERATE_SHARE = 0.9


def _spec(name: str):
    """The catalog entry of a recorded attack, or None (a rerun, or an attack this version lacks)."""
    return next((s for s in catalog.specs() if s.name == name), None)


def _broken(result: dict, n: int, *, prefix: bool) -> np.ndarray:
    """bool [n]: broken by this attack (prefix results give `correct` on a prefix, clean-wrong included)."""
    out = np.zeros(n, bool)
    if prefix:
        c = np.asarray(result["correct"], bool)
        out[:len(c)] = ~c
    else:
        out[:] = [s == 0 for s in result["status"]]
    return out


def worst_case(ev: dict) -> dict:
    """Per example: robust only if classified right and no attack (cascade or prefix) broke it."""
    n = ev["n"]
    robust = np.asarray(ev["clean"]["correct"], bool).copy()
    for r in ev["cascade"].values():
        robust &= ~_broken(r, n, prefix=False)
    counted = [a for a in ev["paper"] if (_spec(a) is None or _spec(a).in_worst_case)]
    for name in counted:
        robust &= ~_broken(ev["paper"][name], n, prefix=True)
    return {"acc": float(robust.mean()), "n": n, "robust": robust.astype(int).tolist(),
            "attacks": list(ev["cascade"]) + counted}


def gap_checks(ev: dict) -> dict:
    """The masking checks that compare attack families, per example, with counts out of n."""
    n = ev["n"]
    casc, prefix = ev["cascade"], ev["paper"]
    clean = np.asarray(ev["clean"]["correct"], bool)

    def union(family: str | None, results: dict, is_prefix: bool, names=None) -> np.ndarray:
        u = np.zeros(n, bool)
        for a, r in results.items():
            s = _spec(a)
            if (names is not None and a in names) or (s is not None and s.family == family):
                u |= _broken(r, n, prefix=is_prefix) & clean
        return u

    reruns = catalog.rerun_names()
    ste = union(STE, casc, False) | union(STE, prefix, True)
    quant = union(QUANT, casc, False)
    gradient = ste | quant | union(None, casc, False, names=reruns)
    black = union(BLACK, casc, False) | union(BLACK, prefix, True)
    checks = {"ste_vs_quant_aware": {"only_quant_aware": int((quant & ~ste).sum()), "n": n,
                                     "ran": any(_spec(a) is not None and _spec(a).family == QUANT for a in casc)},
              "black_box_vs_gradient": {"only_black_box": int((black & ~gradient).sum()), "n": n}}
    done = [casc[k] for k in reruns if k in casc]
    if done:
        extra = sorted({i for r in done for i, st in enumerate(r["status"]) if st == 0})
        checks["convergence"] = {"attack": " + ".join(r["rerun_of"] for r in done),
                                 "attacks": [r["rerun_of"] for r in done],
                                 "extra_broken": sum(r["broke"] for r in done), "images": extra,
                                 "survivors": done[0]["attacked"], "n": n}
    return checks


def predictions(pred: np.ndarray, finite: bool, num_classes: int) -> dict:
    """How the clean predictions spread over the classes: a collapsed model predicts one class."""
    counts = np.bincount(np.asarray(pred, int), minlength=num_classes) if len(pred) else np.zeros(num_classes, int)
    top = int(counts.argmax())
    return {"top_class": top, "top_share": float(counts[top] / max(1, len(pred))), "finite": bool(finite),
            "n": int(len(pred)), "num_classes": num_classes}


def at_chance(acc: float, n: int, num_classes: int) -> bool:
    """Accuracy within three standard deviations of guessing (1 / num_classes) on n images."""
    p = 1.0 / num_classes
    return acc <= p + 3 * math.sqrt(p * (1 - p) / max(1, n))


# ---------------------------------------------------------------- flags
def _tol(n: int) -> float:
    """More than 1 point counts as a difference."""
    return 0.01 if n >= 100 else 1.0 / max(1, n)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _list(idx, most: int = 12) -> str:
    """Image positions, at most ``most`` of them named."""
    shown = ", ".join(map(str, idx[:most]))
    return shown + (f" and {len(idx) - most} more" if len(idx) > most else "")


def _mean(v) -> float:
    return sum(v) / len(v) if len(v) else float("nan")


def degenerate(ev: dict) -> str | None:
    """The flag of a model whose clean predictions are degenerate (constant, at chance, not finite), or None."""
    p = ev.get("checks", {}).get("predictions")
    if not p:
        return None
    acc = ev["clean"]["acc"]
    if not p["finite"]:
        return "the model's logits are not finite (NaN or inf) on some images: its numbers mean nothing"
    if p["top_share"] >= DEGENERATE_SHARE or at_chance(acc, p["n"], p["num_classes"]):
        return (f"degenerate model: it predicts class {p['top_class']} for {_pct(p['top_share'])}% of the images "
                f"and is right on {_pct(acc)}% (chance {_pct(1 / p['num_classes'])}%); it collapsed, and its "
                "robustness numbers say nothing")
    return None


def flags(ev: dict) -> list[str]:
    """The evaluation's weaknesses, each with the numbers that show it."""
    out = []
    if degenerate(ev):
        out.append(degenerate(ev))
    n = ev["n"]
    checks = ev.get("checks", {})
    c = checks.get("convergence")
    if c and c["extra_broken"] > 0:  # no tolerance: each image the rerun finds is one the run had missed
        names = " and ".join(catalog.label(a) for a in c.get("attacks", [c["attack"]]))
        at = f" (images {_list(c['images'])})" if c.get("images") else ""
        out.append(f"not converged: {names} rerun with fresh seeds and twice the starts broke {c['extra_broken']} "
                   f"more of {c['survivors']} survivors{at}, {100 * c['extra_broken'] / n:.1f} points; the worst "
                   "case includes them, and more budget may find more")
    out += _rare_point_flags(ev.get("cascade", {}))
    g = checks.get("ste_vs_quant_aware")
    if g and g["only_quant_aware"] / n > _tol(n):
        out.append(f"straight-through gradients are masked: quantization-aware attacks broke {g['only_quant_aware']} "
                   f"images ({100 * g['only_quant_aware'] / n:.1f} points) that no straight-through attack broke")
    bb = checks.get("black_box_vs_gradient")
    if bb and bb["only_black_box"] / n > _tol(n):
        out.append(f"gradient-free or transfer attacks broke {bb['only_black_box']} images "
                   f"({100 * bb['only_black_box'] / n:.1f} points) that no gradient attack broke")
    sw = checks.get("sweep")
    if sw and len(sw["acc"]) > 1:
        accs, eps, tol = sw["acc"], sw["eps"], _tol(sw["n"])
        rises = [(eps[i], eps[i + 1]) for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + tol]
        if rises:
            out.append(f"accuracy rises with epsilon ({rises[0][0]:g} -> {rises[0][1]:g}) under {sw['attack']}")
        elif accs[-1] >= accs[0] - tol:
            out.append(f"accuracy does not fall as epsilon grows ({_pct(accs[0])}% at 0, {_pct(accs[-1])}% at "
                       f"{eps[-1]:g})")
    s = checks.get("sanity")
    if s and s["acc"] > 0:
        out.append(f"APGD-CE at epsilon {s['eps']:g} leaves {_pct(s['acc'])}% robust (should be 0): gradients do "
                   "not lead the attack")
    out += _prefix_flags(ev.get("paper", {}))
    return out


# An image that fell to this share of an attack's starts or less, or to one start only, was found by
# luck: more may be hiding.
RARE_SHARE = 0.1


def _rare_point_flags(cascade: dict) -> list[str]:
    """Attacks that count the starts breaking each image: images broken by few of them."""
    out = []
    for name, r in cascade.items():
        if not r.get("starts") or not r.get("start_hits"):
            continue
        most = max(1, int(RARE_SHARE * r["starts"]))
        rare = sorted((h, i) for i, h in r["start_hits"] if h <= most)
        if rare:
            shown = ", ".join(f"image {i}: {h} of {r['starts']}" for h, i in rare[:5])
            out.append(f"rare points: {r['label']} broke {len(rare)} of its {len(r['start_hits'])} images with at "
                       f"most {most} of its {r['starts']} starts ({shown}"
                       f"{' and more' if len(rare) > 5 else ''}): images it left robust may fall to more starts")
    return out


def _prefix_flags(results: dict) -> list[str]:
    out = []
    for name, r in results.items():
        s = _spec(name)
        if s is None:
            continue
        strong = results.get(s.iterative_version) if s.iterative_version else None
        if strong is not None:
            k = min(r["n"], strong["n"])
            f, q = _mean(r["correct"][:k]), _mean(strong["correct"][:k])
            if f < q - _tol(k):
                out.append(f"single-step {s.label} ({_pct(f)}%) beats iterative {catalog.label(s.iterative_version)} "
                           f"({_pct(q)}%)")
        if (s.unbounded and s.family == STE and r.get("success_rate") is not None
                and r["success_rate"] < 1 - _tol(r["n"])):
            out.append(f"unbounded {s.label} reaches only {_pct(r['success_rate'])}% success")
    return out
