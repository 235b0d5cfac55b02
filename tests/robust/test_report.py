"""report.md, results.json and the figures: written ranked by the adaptive worst case, partial runs
marked as such, results files checked on reading, and one command's outputs never replacing
another's (distinct default folders, a refusal in one line, no figure of an old report left beside
a new one)."""
import json

import pytest

from dqa_ext.robust.checks import flags
from dqa_ext.robust.cli import build_parser
from dqa_ext.robust.plots import plot_bits
from dqa_ext.robust.report import write_report
from dqa_ext.robust.results import ResultsError, load_results
from support.robust import dqa, evaluation, one_line_error, results_of, untrained_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_and_figures_are_written_ranked_by_the_worst_case(tmp_path):
    results = results_of(evaluation(0.3), {**evaluation(0.0), "steps": {}}, evaluation(0.45))
    paths = write_report(results, tmp_path)
    for key in ("results", "report", "eps", "steps"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert paths["eps"].read_bytes()[:8] == PNG
    md = paths["report"].read_text()
    assert "dqa reproduce --out X" in md and "![accuracy against epsilon](acc_vs_eps.png)" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert [r.split(" | ")[1] for r in rows] == ["fixed2-pgd", "dqa2-pgd", "relu-standard"]
    assert "| 1 | fixed2-pgd | 99.0 | **45.0** | 35.0-55.3 | 40.0 | 0 | 0 | 0 (APGD-CE) | 0.0 | 0 |" in md
    assert "60 / 99 -> 39.0" in md and "- **Adaptive worst case**:" in md and "Partial" not in md
    saved = json.loads(paths["results"].read_text())
    assert saved == json.loads(json.dumps(results))  # the report renders; it does not edit the results
    assert load_results(tmp_path)["settings"]["eps"] == 0.3


def test_flags_stored_with_the_results_are_the_ones_rendered(tmp_path):
    results = results_of(evaluation(0.3))
    results["models"][0]["flags"] = ["a flag the judge raised when the results were made"]
    md = write_report(results, tmp_path)["report"].read_text()
    assert "a flag the judge raised when the results were made" in md
    del results["models"][0]["flags"]  # results built by hand: the judge's flags are rendered
    assert flags(results["models"][0]["eval"]) == [] and "**dqa2-pgd**: none" in \
        write_report(results, tmp_path)["report"].read_text()


def test_a_partial_report_says_how_far_the_run_got(tmp_path):
    results = results_of(evaluation(0.3), evaluation(0.2))
    results.update(expected_models=6, complete=False)
    md = write_report(results, tmp_path)["report"].read_text()
    assert "**Partial report: 2 of 6 models evaluated.**" in md and "--resume" in md


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", "not a dqa results file"),
    ('{"models": []}', "'settings' is missing"),
    ('{"settings": {"eps": 0.3}, "models": [{"name": "a"}]}', r"models\[0\] needs"),
    ('{"settings": {"eps": 0.3}, "models": [{"name": "a", "eval": {"eps": 0.3}}]}', "has no n, clean"),
    ('{"schema": 99, "settings": {"eps": 0.3}, "models": []}', "schema 99"),
    ("not json", "not valid JSON"),
])
def test_load_results_refuses_what_the_report_cannot_read(tmp_path, content, match):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ResultsError, match=match):
        load_results(tmp_path)


def test_bits_figure_for_a_matrix_of_bit_widths_and_none_for_one(tmp_path):
    def model(act, training, wc):
        return {"name": f"{act}-{training}", "activation": act, "training": training, "eval": evaluation(wc)}

    results = {**results_of(), "command": "dqa reproduce --preset matrix",
               "models": [model("relu", "pgd", 0.3), model("relu", "standard", 0.0)]
               + [model(f"{fam}{b}", t, 0.1 * b) for fam in ("fixed", "dqa") for b in (1, 2, 3)
                  for t in ("standard", "pgd")]}
    paths = write_report(results, tmp_path / "matrix")
    assert paths["bits"].read_bytes()[:8] == PNG
    assert "![robust accuracy against bits](robust_vs_bits.png)" in paths["report"].read_text()
    two_bits = dict(results, models=[m for m in results["models"] if m["activation"] in ("relu", "fixed2", "dqa2")])
    assert not plot_bits(two_bits, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    # Re-rendered into the same folder, the report that has no bits figure leaves none behind.
    paths = write_report(two_bits, tmp_path / "matrix")
    assert "bits" not in paths and not (tmp_path / "matrix" / "robust_vs_bits.png").exists()


def test_attack_and_reproduce_write_to_different_folders_by_default():
    parser = build_parser()
    attack = parser.parse_args(["attack", "m.pt"]).out
    reproduce = parser.parse_args(["reproduce"]).out
    assert attack != reproduce and parser.parse_args(["report"]).path == reproduce


def test_attack_never_replaces_a_reproduce_report(capsys, tmp_path):
    """`dqa attack m.pt --out DIR` where `dqa reproduce` wrote DIR: refused in one line, nothing replaced."""
    write_report(results_of(evaluation(0.3), evaluation(0.2)), tmp_path / "rep")
    before = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    assert "acc_vs_eps.png" in before
    ckpt = untrained_checkpoint(tmp_path / "m.pt")
    err = one_line_error(capsys, ["attack", ckpt, "--out", tmp_path / "rep", "--attacks", "fgsm", "--no-sweep"])
    assert "holds the results of `dqa reproduce --out X`" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()} == before
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "report.md").write_text("someone's notes")
    assert "not a dqa report folder" in one_line_error(capsys, ["attack", ckpt, "--out", tmp_path / "stray"])
    write_report(results_of(evaluation(0.3), producer="attack"), tmp_path / "attack-like")
    assert "does not replace" in one_line_error(capsys, ["reproduce", "--out", tmp_path / "attack-like"])


def test_a_new_attack_report_leaves_no_figure_of_the_old_one(tmp_path):
    """The same command into its own folder: the new report replaces the old one, and a figure the
    new one does not draw (no sweep) is not left beside it."""
    ckpt = untrained_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "rep"
    base = ["attack", ckpt, "--out", out, "--attacks", "fgsm", "--n-images", "20", "--budget", "apgd_steps=2",
            "--budget", "sweep_n=10", "--budget", "sweep_steps=1"]
    assert dqa(base + ["--sweep-eps", "0,0.3"]) == 0
    assert (out / "acc_vs_eps.png").is_file()
    assert dqa(base + ["--no-sweep"]) == 0
    assert not (out / "acc_vs_eps.png").exists()
    assert "acc_vs_eps" not in (out / "report.md").read_text()
    # What a reader needs, not this machine's paths: the command and the checkpoint by name.
    results = json.loads((out / "results.json").read_text())
    assert str(tmp_path) not in json.dumps(results) and results["command"].startswith("dqa attack m.pt --out rep")
    assert results["models"][0]["checkpoint"] == "m.pt" and results["provenance"]["cpu"]


def test_report_rerenders_only_into_its_own_results(capsys, tmp_path):
    write_report(results_of(evaluation(0.3)), tmp_path / "a")
    write_report(results_of(evaluation(0.2), producer="attack"), tmp_path / "b")
    assert dqa(["report", tmp_path / "a"]) == 0
    assert dqa(["report", tmp_path / "a", "--out", tmp_path / "copy"]) == 0
    assert (tmp_path / "copy" / "report.md").is_file()
    assert "holds other results" in one_line_error(capsys, ["report", tmp_path / "a", "--out", tmp_path / "b"])


def test_a_report_never_removes_a_file_it_did_not_write(tmp_path):
    (tmp_path / "steps.png").write_bytes(b"someone's figure")
    results = results_of(evaluation(0.3))
    del results["producer"]  # results made through the API
    with pytest.raises(ResultsError, match="not a dqa report folder"):
        write_report(results, tmp_path)
    assert (tmp_path / "steps.png").read_bytes() == b"someone's figure" and len(list(tmp_path.iterdir())) == 1
