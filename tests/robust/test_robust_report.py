"""Flags come from the numbers; load_results refuses files the report cannot read; report.md,
results.json and the plots are written, ranked by the adaptive worst case."""
import json

import pytest

from dqa_ext.robust.errors import UserError
from dqa_ext.robust.report import load_results, masking_flags, write_report


def _status(broke, attacked, n=100):
    return [0] * broke + [1] * (attacked - broke) + [None] * (n - attacked)


def _eval(wc=0.3, **checks):
    n = 100
    ev = {"eps": 0.3, "n": n, "clean": {"acc": 0.99, "n": n, "correct": [1] * 99 + [0]},
          "budget": {"n": n, "apgd_steps": 100},
          "cascade": {"apgd_ce": {"attack": "apgd_ce", "label": "APGD-CE", "attacked": 99, "broke": 60,
                                  "status": _status(60, 99), "robust_after": 0.39, "budget": {}},
                      "rerun_2x": {"attack": "rerun_2x", "label": "Rerun x2", "attacked": 39, "broke": 0,
                                   "rerun_of": "apgd_ce", "status": [None] * 60 + [1] * 39 + [None],
                                   "robust_after": 0.39, "budget": {}}},
          "paper": {"fgsm": {"acc": 0.5, "n": n, "correct": [1] * 50 + [0] * 50},
                    "pgd": {"acc": 0.4, "n": n, "correct": [1] * 40 + [0] * 60}},
          "worst_case": {"acc": wc, "n": n, "robust": [1] * int(wc * n) + [0] * (n - int(wc * n))},
          "checks": {"convergence": {"attack": "apgd_ce", "extra_broken": 0, "survivors": 39, "n": n},
                     "ste_vs_quant_aware": {"only_quant_aware": 0, "n": n, "ran": True},
                     "black_box_vs_gradient": {"only_black_box": 0, "n": n},
                     "sanity": {"eps": 1.0, "acc": 0.0, "n": n},
                     "sweep": {"eps": [0, 0.1, 0.3], "n": n, "acc": [0.99, 0.6, 0.3], "attack": "APGD-CE",
                               "steps": 50}},
          "steps": {"1": [0.5, 0.7], "4": [0.2, 0.3, 0.4]}}
    ev["checks"].update(checks)
    return ev


def test_an_honest_looking_result_raises_no_flags():
    assert masking_flags(_eval()) == []


def test_each_weakness_is_flagged_with_its_numbers():
    ev = _eval(convergence={"attack": "apgd_t", "extra_broken": 3, "survivors": 40, "n": 100},
               ste_vs_quant_aware={"only_quant_aware": 7, "n": 100, "ran": True},
               black_box_vs_gradient={"only_black_box": 2, "n": 100},
               sanity={"eps": 1.0, "acc": 0.05, "n": 100},
               sweep={"eps": [0, 0.1, 0.3], "n": 100, "acc": [0.99, 0.5, 0.7], "attack": "APGD-CE", "steps": 50})
    ev["paper"]["fgsm"]["correct"] = [1] * 20 + [0] * 80
    flags = " | ".join(masking_flags(ev))
    assert "not converged: APGD-T with twice the steps and restarts broke 3 more of 40 survivors (3.0 points" in flags
    assert "quantization-aware attacks broke 7 images (7.0 points)" in flags
    assert "gradient-free or transfer attacks broke 2 images (2.0 points)" in flags
    assert "APGD-CE at epsilon 1 leaves 5.0% robust" in flags
    assert "accuracy rises with epsilon (0.1 -> 0.3)" in flags
    assert "single-step FGSM (20.0%) beats iterative PGD (40.0%)" in flags
    # one more image than the tolerance is not yet a flag: 1 point of 100 is within noise
    assert masking_flags(_eval(convergence={"attack": "apgd_ce", "extra_broken": 1, "survivors": 39, "n": 100})) == []


def _results(*evs):
    names = ["dqa2-pgd", "relu-standard", "fixed2-pgd"]
    return {"command": "dqa reproduce --out X", "settings": {"data": "mnist5k", "eps": 0.3}, "wall_seconds": 12.0,
            "provenance": {"torch": "x"},
            "models": [{"name": names[i], "eval": ev, "train": {"history": [
                {"epoch": 1, "loss": 0.5, "test_acc": 0.9, "seconds": 3.0}]}} for i, ev in enumerate(evs)]}


def test_report_and_plots_are_written_ranked_by_the_worst_case(tmp_path):
    results = _results(_eval(0.3), {**_eval(0.0), "steps": {}}, _eval(0.45))
    paths = write_report(results, tmp_path)
    for key in ("results", "report", "eps", "steps"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert paths["eps"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report"].read_text()
    assert "dqa reproduce --out X" in md and "![accuracy against epsilon](acc_vs_eps.png)" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
            or line.startswith("| 3 |")]
    assert [r.split(" | ")[1] for r in rows] == ["fixed2-pgd", "dqa2-pgd", "relu-standard"]
    assert "| 1 | fixed2-pgd | 99.0 | **45.0** | 40.0 | 0 | 0 | 0 (APGD-CE) | 0.0 | 0 |" in md
    assert "60 / 99 -> 39.0" in md and "- **Adaptive worst case**:" in md
    saved = json.loads(paths["results"].read_text())
    assert saved["models"][0]["flags"] == masking_flags(results["models"][0]["eval"])
    assert load_results(tmp_path)["settings"]["eps"] == 0.3


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", "not a dqa results file"),
    ('{"models": []}', "'settings' is missing"),
    ('{"settings": {"eps": 0.3}, "models": [{"name": "a"}]}', r"models\[0\] needs"),
    ('{"settings": {"eps": 0.3}, "models": [{"name": "a", "eval": {"eps": 0.3}}]}', "has no n, clean"),
    ("not json", "not valid JSON"),
])
def test_load_results_refuses_what_the_report_cannot_read(tmp_path, content, match):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(UserError, match=match):
        load_results(tmp_path)


def test_bits_figure_for_a_matrix_of_bit_widths_and_none_for_one(tmp_path):
    from dqa_ext.robust.report import plot_bits

    def model(act, training, wc):
        return {"name": f"{act}-{training}", "activation": act, "training": training, "eval": _eval(wc)}

    results = {"command": "dqa reproduce --preset matrix", "settings": {"data": "mnist5k", "eps": 0.3},
               "models": [model("relu", "pgd", 0.3), model("relu", "standard", 0.0)]
               + [model(f"{fam}{b}", t, 0.1 * b) for fam in ("fixed", "dqa") for b in (1, 2, 3)
                  for t in ("standard", "pgd")]}
    paths = write_report(results, tmp_path / "matrix")
    assert paths["bits"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![robust accuracy against bits](robust_vs_bits.png)" in paths["report"].read_text()
    two_bits = dict(results, models=[m for m in results["models"] if m["activation"] in ("relu", "fixed2", "dqa2")])
    assert not plot_bits(two_bits, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    assert "bits" not in write_report(two_bits, tmp_path / "default")


def test_the_cli_checks_every_file_the_report_writes():
    from dqa_ext.cli import REPORT_FILES
    from dqa_ext.robust.report import FILES

    assert REPORT_FILES == FILES
