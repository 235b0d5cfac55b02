"""The statistics behind every claim of a report: exact intervals that never undercover, the exact
paired (McNemar) test, Holm's adjustment, and the comparisons a report makes with them."""
import math

import pytest

from dqa_ext.robust.comparisons import compare, pairs
from dqa_ext.robust.report import write_report
from dqa_ext.robust.stats import holm, paired_test, proportion_interval
from support.robust import evaluation, results_of


def _binom_pmf(k, n, p):
    return math.comb(n, k) * p ** k * (1 - p) ** (n - k)


def test_the_interval_has_the_closed_form_at_the_ends():
    n = 200
    assert proportion_interval(0, n) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)), abs=1e-12)
    assert proportion_interval(n, n) == pytest.approx((0.025 ** (1 / n), 1.0), abs=1e-12)


@pytest.mark.parametrize("n", [20, 57])
def test_the_interval_covers_at_least_95_percent_for_every_true_accuracy(n):
    # Exact coverage, summed over every outcome k: Wilson's interval falls below 95% at some of
    # these accuracies (robust accuracies are often near 0); Clopper-Pearson's never does.
    bounds = [proportion_interval(k, n) for k in range(n + 1)]
    for i in range(1, 100):
        p = i / 100
        coverage = sum(_binom_pmf(k, n, p) for k, (lo, hi) in enumerate(bounds) if lo <= p <= hi)
        assert coverage >= 0.95 - 1e-12, (p, coverage)


def test_the_paired_test_is_the_exact_binomial_on_the_discordant_images():
    a = [1] * 7 + [0] * 11 + [1] * 50 + [0] * 132   # 7 kept only by a, 11 only by b, 50 by both
    b = [0] * 7 + [1] * 11 + [1] * 50 + [0] * 132
    t = paired_test(a, b)
    by_hand = min(1.0, 2 * sum(math.comb(18, i) for i in range(8)) / 2 ** 18)
    assert (t["a_only"], t["b_only"], t["n"]) == (7, 11, 200) and t["p"] == pytest.approx(by_hand, rel=1e-12)
    assert paired_test([1, 0], [1, 0])["p"] == 1.0
    with pytest.raises(ValueError, match="same images"):
        paired_test([1, 0], [1, 0, 1])


def test_holm_multiplies_by_the_rank_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def _model(act, training, robust):
    ev = evaluation(sum(robust) / len(robust))
    ev["worst_case"]["robust"] = robust
    return {"name": f"{act}-{training}", "activation": act, "training": training, "eval": ev}


def test_a_report_compares_like_with_like_and_calls_a_difference_only_where_it_is_significant(tmp_path):
    relu = [1] * 30 + [0] * 70
    models = [_model("relu", "pgd", relu),
              _model("fixed2", "pgd", [1] * 28 + [0] * 72),        # 2 images fewer than ReLU: no finding
              _model("dqa2", "pgd", [0] * 30 + [0] * 70),          # 30 fewer: a finding
              _model("fixed1", "standard", [0] * 100), _model("relu", "standard", [0] * 100)]
    what = [(w, a["name"], b["name"]) for w, a, b in pairs(models)]
    assert what == [("vs ReLU", "dqa2-pgd", "relu-pgd"), ("vs ReLU", "fixed2-pgd", "relu-pgd"),
                    ("fixed vs learned", "fixed2-pgd", "dqa2-pgd"), ("vs ReLU", "fixed1-standard", "relu-standard")]
    rows = {(r["a"], r["b"]): r for r in compare(models)}
    assert rows[("dqa2-pgd", "relu-pgd")]["significant"] and not rows[("fixed2-pgd", "relu-pgd")]["significant"]
    # Three comparisons have discordant images: Holm multiplies the smallest p by 3.
    smallest = rows[("dqa2-pgd", "relu-pgd")]
    assert smallest["p_holm"] == pytest.approx(3 * smallest["p"])
    assert rows[("fixed1-standard", "relu-standard")]["p_holm"] == 1.0  # no discordant image: outside the family
    results = results_of(*(m["eval"] for m in models), names=[m["name"] for m in models])
    for entry, m in zip(results["models"], models):
        entry.update(activation=m["activation"], training=m["training"])
    md = write_report(results, tmp_path)["report"].read_text()
    assert "## Which differences are real" in md
    assert "| vs ReLU | dqa2-pgd | relu-pgd | 0.0 | 30.0 | 0 | 30 | <0.0001 | <0.0001 | **yes** |" in md
    assert "| vs ReLU | fixed2-pgd | relu-pgd | 28.0 | 30.0 | 0 | 2 | 0.50 | 0.50 | no |" in md
    assert "fixed1-standard" not in md.split("## Which differences are real")[1].split("##")[0].split("Left out")[0]
    assert "Left out: 1 comparison(s) of models that keep exactly the same images" in md
