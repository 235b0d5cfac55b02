"""`dqa reproduce`: --quick keeps a preset's whole matrix (the paper preset on small files in the real
formats), a killed run resumes without retraining or re-evaluating, and settings are never mixed."""
import importlib
import json

import pytest

from dqa_ext.cli import main
from dqa_ext.robust.attacks import suite
from dqa_ext.robust.errors import UserError

from test_robust_data import _write_cifar, _write_mnist

pytestmark = [pytest.mark.slow]

rep = importlib.import_module("dqa_ext.robust.reproduce")


def test_paper_preset_quick_runs_every_model_loader_and_attack(tmp_path):
    data = tmp_path / "data"
    _write_mnist(data, n_train=160, n_test=40)
    _write_cifar(data, n=32)
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", "paper", "--quick", "--data-dir", str(data), "--out", str(out)]) == 0
    acts = rep.PRESETS["paper"]["activations"]
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

    calls = []
    real = suite.evaluate_model
    monkeypatch.setattr(suite, "evaluate_model", lambda model, *a, **k: calls.append(1) or real(model, *a, **k))
    _run(out, resume=True)
    assert len(calls) == 4  # the two finished evaluations were reused
    assert {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()} == mtimes  # nothing retrained
    got = json.loads((out / "results.json").read_text())
    for a, b in zip(expected["models"], got["models"]):
        assert a["name"] == b["name"]
        assert a["eval"]["worst_case"]["robust"] == b["eval"]["worst_case"]["robust"]
        assert a["eval"]["clean"]["correct"] == b["eval"]["clean"]["correct"]

    with pytest.raises(UserError, match=r"other settings \(budget\)"):
        _run(out, resume=True, budget_overrides={"apgd_steps": 3})
