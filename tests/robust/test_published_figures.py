"""The robustness figures the README publishes are the committed report's: each cell of its table
and each paired test it quotes is recomputed here from docs/reports/default-cpu/results.json."""
import json
import re
from pathlib import Path

from dqa_ext.robust.comparisons import compare
from dqa_ext.robust.plots import baseline
from dqa_ext.robust.stats import proportion_interval

ROOT = Path(__file__).resolve().parents[2]


def _pct(v):
    return f"{100 * v:.1f}"


def _readme_rows():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^\| (\w+\d?-pgd) \| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \| ([\d.]+)-([\d.]+) \|$", text,
                      re.M), text


def test_the_readme_table_is_the_committed_reports():
    results = json.loads((ROOT / "docs" / "reports" / "default-cpu" / "results.json").read_text())
    models = {m["name"]: m for m in results["models"]}
    rows, _ = _readme_rows()
    assert len(rows) == 3
    for name, clean, pgd, worst, lo, hi in rows:
        ev = models[name]["eval"]
        wc = ev["worst_case"]
        assert (clean, pgd, worst) == (_pct(ev["clean"]["acc"]), _pct(baseline(ev)), _pct(wc["acc"]))
        assert (lo, hi) == tuple(_pct(v) for v in proportion_interval(sum(wc["robust"]), wc["n"]))


def test_the_paired_tests_the_readme_quotes_are_the_reports():
    results = json.loads((ROOT / "docs" / "reports" / "default-cpu" / "results.json").read_text())
    _, text = _readme_rows()
    rows = {(r["a"], r["b"]): r for r in compare(results["models"])}
    flat = " ".join(text.split())
    quoted = re.findall(r"\((\d+) (?:images only \S+ keeps )?against (\d+), p ([<=]) ([\d.]+)\)", flat)
    assert len(quoted) == 3
    for (name_a, name_b), (n1, n2, op, p) in zip([("dqa2-pgd", "relu-pgd"), ("fixed2-pgd", "dqa2-pgd"),
                                                  ("fixed2-pgd", "relu-pgd")], quoted):
        r = rows[(name_a, name_b)]
        assert {int(n1), int(n2)} == {r["a_only"], r["b_only"]}
        assert r["p"] < float(p) if op == "<" else f"{r['p']:.2f}" == p
