"""`dqa reproduce`: --quick keeps a preset's whole matrix (the paper preset on small files in the real
formats); a killed run leaves a report marked partial, resumes without retraining or re-evaluating,
counts the wall time of every session, and never mixes settings."""
import importlib
import json

import pytest

from dqa_ext.robust.errors import UserError
from dqa_ext.robust.presets import PRESETS
from support.robust import dqa, write_cifar, write_mnist

pytestmark = [pytest.mark.slow]

# The package exports functions named like these modules.
rep = importlib.import_module("dqa_ext.robust.reproduce")
evaluate = importlib.import_module("dqa_ext.robust.evaluate")


def test_paper_preset_quick_runs_every_model_loader_and_attack(tmp_path):
    data = tmp_path / "data"
    write_mnist(data, n_train=160, n_test=40)
    write_cifar(data, n=32)
    out = tmp_path / "out"
    assert dqa(["reproduce", "--preset", "paper", "--quick", "--data-dir", data, "--out", out]) == 0
    acts = PRESETS["paper"]["activations"]
    for ds in ("mnist", "cifar10"):
        res = json.loads((out / ds / "results.json").read_text())
        assert res["settings"]["quick"] is True and res["settings"]["data"].startswith(ds)
        assert sorted(m["name"] for m in res["models"]) == sorted(f"{a}-{t}" for a in acts for t in ("standard", "pgd"))
        for m in res["models"]:
            ev = m["eval"]
            assert set(ev["paper"]) == {"fgsm", "pgd", "cw", "zoo", "substitute", "pgd_zero"}
            quantized = m["activation"] != "relu"
            assert ("twin_clip" in ev["cascade"]) == quantized and "transfer" in ev["cascade"]
            assert m["train"]["config"]["arch"] == ("resnet20" if ds == "cifar10" else "mnist_cnn")
        assert (out / ds / "report.md").is_file()


def _run(out, **kw):
    return rep.reproduce(preset="default", quick=True, out=out, log=lambda *a: None, **kw)


def test_a_killed_run_resumes_without_retraining_or_reevaluating(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    _run(whole)
    expected = json.loads((whole / "results.json").read_text())

    out = tmp_path / "killed"

    def kill_at_third(msg, *a):
        if msg == "-- attacking fixed2-standard":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rep.reproduce(preset="default", quick=True, out=out, log=kill_at_third)
    assert sorted(p.name for p in (out / "evals").iterdir()) == ["relu-pgd.json", "relu-standard.json"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    assert len(mtimes) == 6
    partial = json.loads((out / "results.json").read_text())
    assert (partial["complete"], partial["expected_models"], len(partial["models"])) == (False, 6, 2)
    assert "**Partial report: 2 of 6 models evaluated.**" in (out / "report.md").read_text()

    calls = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda model, *a, **k: calls.append(1) or real(model, *a, **k))
    _run(out, resume=True)
    assert len(calls) == 4  # the two finished evaluations were reused
    assert {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()} == mtimes  # nothing retrained
    got = json.loads((out / "results.json").read_text())
    assert got["complete"] and "Partial" not in (out / "report.md").read_text()
    # The wall time counts the first session's work that the resumed run reused: every epoch (all
    # trained then) and the two reused evaluations.
    earlier = sum(h["seconds"] for m in got["models"] for h in m["train"]["history"]) \
        + sum(m["eval"]["seconds"] for m in partial["models"])
    assert got["resumed_seconds"] == pytest.approx(earlier) and got["wall_seconds"] > earlier
    for a, b in zip(expected["models"], got["models"]):
        assert a["name"] == b["name"]
        assert a["eval"]["worst_case"]["robust"] == b["eval"]["worst_case"]["robust"]
        assert a["eval"]["clean"]["correct"] == b["eval"]["clean"]["correct"]

    with pytest.raises(UserError, match=r"other settings \(budget\)"):
        _run(out, resume=True, budget_overrides={"apgd_steps": 3})
