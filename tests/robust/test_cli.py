"""The `dqa` command: one-line errors, info, and train -> attack -> report on tiny settings."""
import json
import subprocess
import sys

import pytest

import dqa_ext
from dqa_ext.cli import main


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dqa: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv,match", [
    ([], "required"),
    (["fly"], "invalid choice"),
    (["train", "--act", "dqa9"], "bad activation 'dqa9'"),
    (["train", "--data", "mnist"], "--data-dir"),
    (["train", "--data", "mnist", "--data-dir", "/nonexistent"], "train-images-idx3-ubyte"),
    (["train", "--epochs", "x"], "invalid int value"),
    (["attack", "/nonexistent.pt"], "does not exist"),
    (["attack", "x.pt", "--attacks", "pgd,deepfool"], "unknown deepfool"),
    (["attack", "x.pt", "--budget", "pgd_steps"], "KEY=VALUE"),
    (["attack", "x.pt", "--budget", "speed=3"], "KEY=VALUE"),
    (["report", "/nonexistent"], "no results file"),
    (["reproduce", "--preset", "paper"], "--data-dir"),
    (["reproduce", "--preset", "huge"], "invalid choice"),
])
def test_errors_are_one_line(capsys, argv, match):
    assert match in _err(capsys, argv)


def test_info_prints_backend_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "backend" in info and "torch" in info


def test_python_dash_m_goes_through_the_cli(tmp_path):
    # From a neutral folder: `python -m` puts the working directory first on sys.path, and the
    # repository's source tree has no compiled extension.
    run = dict(capture_output=True, text=True, cwd=tmp_path)
    r = subprocess.run([sys.executable, "-m", "dqa_ext", "train", "--act", "bogus"], **run)
    assert r.returncode == 2 and r.stderr.strip().startswith("dqa: error: bad activation") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "dqa_ext", "info"], **run)
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["extension_loaded"] == dqa_ext.backend_info()["extension_loaded"]


def test_train_attack_report(tmp_path, capsys):
    ckpt = str(tmp_path / "m.pt")
    tiny = ["--channels", "8,16", "--hidden", "32", "--kernel", "3", "--n-train", "600", "--epochs", "1"]
    assert main(["train", "--act", "dqa2", "--adv", "--pgd-steps", "2", "--out", ckpt] + tiny) == 0
    assert main(["train", "--act", "dqa2", "--adv", "--pgd-steps", "2", "--out", ckpt, "--resume"]
                + tiny[:-1] + ["2"]) == 0
    # a second plain run would overwrite the finished checkpoint: refused without --force
    assert main(["train", "--act", "dqa2", "--adv", "--pgd-steps", "2", "--out", ckpt] + tiny) == 2
    out = tmp_path / "rep"
    assert main(["attack", ckpt, "--attacks", "fgsm,pgd,pgd_zero", "--n", "40", "--budget", "pgd_steps=3",
                 "--budget", "sweep_n=20", "--sweep-eps", "0,0.3", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["models"][0]
    assert m["name"] == "dqa2-pgd" and m["eval"]["budget"]["pgd_steps"] == 3 and m["eval"]["n"] == 40
    assert len(m["train"]["history"]) == 2
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "dqa2-pgd" in (out / "report.md").read_text() and (out / "acc_vs_eps.png").is_file()
    assert "resuming" in capsys.readouterr().out


def test_reproduce_smoke_preset(tmp_path):
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["relu-standard", "relu-pgd", "dqa2-standard", "dqa2-pgd"]
    relu, dqa = res["models"][0]["eval"], res["models"][3]["eval"]
    assert set(relu["paper"]) == {"fgsm", "pgd", "cw", "zoo", "substitute", "pgd_zero"}
    assert set(relu["cascade"]) == {"apgd_ce", "apgd_t", "square", "transfer", "rerun_2x"}  # no quantizers: no twins
    assert set(dqa["cascade"]) == set(relu["cascade"]) | {"twin_clip", "twin_sig_low", "twin_sig_high", "bpda_sig",
                                                          "twin_anneal", "rerun_2x_quant"}
    assert dqa["cascade"]["transfer"]["sources"] == ["relu-standard", "relu-pgd", "dqa2-standard"]
    assert "Robust accuracy under adaptive attack" in (tmp_path / "report.md").read_text()
    for f in ("report.md", "acc_vs_eps.png", "steps.png"):
        assert (tmp_path / f).is_file()
    assert res["command"] == f"dqa reproduce --preset smoke --out {tmp_path}"
