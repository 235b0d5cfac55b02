"""The commands end to end on tiny settings: train -> resume -> attack -> report, and the smoke preset
of reproduce (every model, attack and figure), recording no path of the machine it ran on."""
import json

import pytest

from dqa_ext.robust.attacks import catalog
from support.robust import dqa

pytestmark = [pytest.mark.slow]


def test_train_attack_report(tmp_path, capsys):
    ckpt = str(tmp_path / "m.pt")
    tiny = ["--channels", "8,16", "--hidden", "32", "--kernel", "3", "--n-train", "600", "--epochs", "1"]
    assert dqa(["train", "--act", "dqa2", "--out", ckpt] + tiny) == 0
    assert dqa(["train", "--act", "dqa2", "--out", ckpt, "--resume"] + tiny[:-1] + ["2"]) == 0
    # a second plain run would overwrite the finished checkpoint: refused without --force
    assert dqa(["train", "--act", "dqa2", "--out", ckpt] + tiny) == 2
    out = tmp_path / "rep"
    assert dqa(["attack", ckpt, "--attacks", "fgsm,pgd,pgd_zero", "--n-images", "40", "--budget", "pgd_steps=3",
                 "--budget", "sweep_n=20", "--sweep-eps", "0,0.3", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["models"][0]
    assert m["name"] == "dqa2-standard" and m["eval"]["budget"]["pgd_steps"] == 3 and m["eval"]["n"] == 40
    assert len(m["train"]["history"]) == 2
    (out / "report.md").unlink()
    assert dqa(["report", str(out)]) == 0
    assert "dqa2-standard" in (out / "report.md").read_text() and (out / "acc_vs_eps.png").is_file()
    assert "resuming" in capsys.readouterr().out


def test_reproduce_smoke_preset(tmp_path):
    assert dqa(["reproduce", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["relu-standard", "relu-pgd", "dqa2-standard", "dqa2-pgd"]
    relu, quant = res["models"][0]["eval"], res["models"][3]["eval"]
    assert set(relu["paper"]) == {"fgsm", "pgd", "cw", "zoo", "substitute", "pgd_zero"}
    cascade = [s for s in catalog.specs() if s.stage == "cascade"]
    assert "twin_anneal" in [s.name for s in cascade] and "repair" in [s.name for s in cascade]
    # no quantizers: no twins and no quantization-aware rerun
    assert set(relu["cascade"]) == {s.name for s in cascade if not s.needs_quantizers} | {"rerun_2x"}
    assert set(quant["cascade"]) == {s.name for s in cascade} | {"rerun_2x", "rerun_2x_quant"}
    assert quant["cascade"]["transfer"]["sources"] == ["relu-standard", "relu-pgd", "dqa2-standard"]
    assert "Robust accuracy under adaptive attack" in (tmp_path / "report.md").read_text()
    for f in ("report.md", "acc_vs_eps.png", "steps.png"):
        assert (tmp_path / f).is_file()
    assert res["command"] == f"dqa reproduce --preset smoke --out {tmp_path.name}"  # no path of this machine
    assert str(tmp_path) not in (tmp_path / "results.json").read_text()
    assert res["models"][0]["checkpoint"] == "models/relu-standard.pt"
