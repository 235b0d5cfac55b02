"""The comparisons a report makes between its models, each with its paired exact test (stats.py):
every quantized model against the ReLU model of the same training, bit widths against each other
(same quantizer, same training) and fixed against learned steps (same bits, same training).

The tests are paired because every model is attacked on the same images: an image counts for a
model when it is robust there (the worst case). A difference is called significant only when its
Holm-adjusted p is below ALPHA over the report's comparisons that could be significant at all (a
pair with no discordant image has p = 1 whatever happens, so it is left out of the family, as
Tarone 1990 allows).
"""
from __future__ import annotations

from itertools import combinations

from .models import ModelError, parse_activation
from .stats import ALPHA, holm, paired_test


def _kind(m: dict):
    """(quantizer, bits) of a results entry, or None when dqa does not name its activation."""
    try:
        return parse_activation(m.get("activation", ""))
    except ModelError:  # an entry made through the API, with its own activation name
        return None


def pairs(models: list[dict]) -> list[tuple[str, dict, dict]]:
    """(what is compared, model a, model b) for the models of a report, in a stable order."""
    by = {}
    for m in models:
        k = _kind(m)
        if k is not None and "robust" in m["eval"]["worst_case"]:
            by.setdefault((k[0], k[1], m.get("training")), m)
    out = []
    for training in dict.fromkeys(t for _, _, t in by):
        quant = sorted((k for k in by if k[2] == training and k[0] != "relu"), key=lambda k: (k[0], k[1]))
        relu = by.get(("relu", None, training))
        if relu is not None:
            out += [("vs ReLU", by[k], relu) for k in quant]
        for mode in ("fixed", "dynamic"):
            out += [("bits", by[a], by[b]) for a, b in combinations([k for k in quant if k[0] == mode], 2)]
        out += [("fixed vs learned", by[k], by[("dynamic", k[1], training)]) for k in quant
                if k[0] == "fixed" and ("dynamic", k[1], training) in by]
    return out


def compare(models: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Every comparison of ``models`` (results.json entries) with its numbers: both accuracies, the
    discordant images, the exact p, Holm's adjusted p and whether the difference is significant."""
    rows = []
    for what, a, b in pairs(models):
        ra, rb = a["eval"]["worst_case"]["robust"], b["eval"]["worst_case"]["robust"]
        if len(ra) != len(rb):
            continue  # not the same images: nothing to pair
        rows.append({"what": what, "a": a["name"], "b": b["name"], "acc_a": sum(ra) / len(ra),
                     "acc_b": sum(rb) / len(rb), **paired_test(ra, rb)})
    family = [r for r in rows if r["a_only"] + r["b_only"]]
    for r, adjusted in zip(family, holm([r["p"] for r in family])):
        r["p_holm"] = adjusted
    for r in rows:
        r.setdefault("p_holm", 1.0)
        r["significant"] = r["p_holm"] < alpha
    return rows
