"""The statistics of the claims a report makes (scipy.stats underneath):

  proportion_interval   an accuracy measured on n images: the exact (Clopper-Pearson) 95% interval
  paired_test           two models on the same images: the exact McNemar test, i.e. a two-sided
                        binomial test on the discordant images (robust for one model only)
  holm                  p-values adjusted for the several comparisons of one report (Holm 1979)
"""
from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

ALPHA = 0.05


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson's exact interval of a proportion k / n. It never undercovers, unlike Wilson's,
    which matters at the 0-30% accuracies that robust models have."""
    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def paired_test(robust_a, robust_b) -> dict:
    """Exact McNemar: of the images exactly one model keeps (``a_only``, ``b_only``), is either model
    more often the one? p: two-sided binomial test of a_only among the discordant images at 1/2."""
    a, b = np.asarray(robust_a, bool), np.asarray(robust_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results need the same images, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "n": int(a.size), "p": float(p)}


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i + 1), kept monotone
    and at most 1. A comparison is significant at level alpha when its adjusted p is below alpha."""
    p = np.asarray(pvalues, float)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
