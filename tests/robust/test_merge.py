"""`dqa merge`: several runs on the same checkpoints as one per-image worst case, with the images
that only one run broke named, and runs on other checkpoints or other images refused in one line."""
import json

from dqa_ext.robust.report import write_report
from support.robust import dqa, evaluation, one_line_error, results_of


def _run(tmp_path, name, robust, *, command, sha="a" * 64, correct=None):
    ev = evaluation(sum(robust) / len(robust))
    ev["worst_case"]["robust"] = robust
    if correct is not None:
        ev["clean"]["correct"] = correct
    results = results_of(ev, producer="attack", names=("fixed2-pgd",))
    results["command"] = command
    results["models"][0].update(activation="fixed2", training="pgd", checkpoint_sha256=sha)
    write_report(results, tmp_path / name)
    return tmp_path / name


def test_merged_worst_case_is_the_per_image_intersection_and_names_what_one_run_alone_broke(capsys, tmp_path):
    a = _run(tmp_path, "a", [1] * 30 + [0] * 70, command="dqa attack m.pt --seed 0")
    b = _run(tmp_path, "b", [0, 0] + [1] * 28 + [1] + [0] * 69, command="dqa attack m.pt --seed 1")
    assert dqa(["merge", a, b / "results.json", "--out", tmp_path / "merged"]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    m = merged["models"][0]
    assert merged["producer"] == "merge" and m["eval"]["worst_case"]["acc"] == 0.28
    assert m["eval"]["worst_case"]["robust"] == [0, 0] + [1] * 28 + [0] * 70
    assert [r["broke_alone"] for r in m["eval"]["runs"]] == [[30], [0, 1]]
    assert any("not converged across runs: 3 image(s)" in f and "0, 1, 30" in f for f in m["flags"])
    md = (tmp_path / "merged" / "report.md").read_text()
    assert "| fixed2-pgd | **28.0** | 30.0 (1 only here) | 29.0 (2 only here) |" in md
    assert "`dqa attack m.pt --seed 1`" in md
    # A merge never replaces another command's report.
    err = one_line_error(capsys, ["merge", a, b, "--out", a])
    assert "does not replace them" in err


def test_runs_on_another_checkpoint_or_other_images_are_refused(capsys, tmp_path):
    a = _run(tmp_path, "a", [1] * 30 + [0] * 70, command="dqa attack m.pt")
    other = _run(tmp_path, "other", [1] * 30 + [0] * 70, command="dqa attack n.pt", sha="b" * 64)
    assert "another checkpoint" in one_line_error(capsys, ["merge", a, other, "--out", tmp_path / "m"])
    moved = _run(tmp_path, "moved", [1] * 30 + [0] * 70, command="dqa attack m.pt", sha=None,
                 correct=[0] + [1] * 99)
    assert "classifies the clean images differently" in one_line_error(
        capsys, ["merge", a, moved, "--out", tmp_path / "m"])
    assert "at least two" in one_line_error(capsys, ["merge", a, "--out", tmp_path / "m"])
    assert not (tmp_path / "m").exists()
