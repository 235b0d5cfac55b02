"""The adversarial images behind a report: saved beside it by `dqa attack`, checked again from the
checkpoint and the test set by `dqa verify`, which fails on a point that does not hold."""
import json

import numpy as np

from dqa_ext.robust.adversarial import FOLDER, load
from dqa_ext.robust.data import load_dataset
from support.robust import dqa, one_line_error, untrained_checkpoint


def _rewrite(path, **arrays):
    z = load(path)
    z.update(arrays)
    np.savez_compressed(path, **z)


def test_every_counted_break_has_a_point_that_verify_checks_again(tmp_path, capsys):
    ckpt = untrained_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "rep"
    assert dqa(["attack", ckpt, "--attacks", "apgd_ce,fgsm", "--n-images", "30", "--budget", "apgd_steps=5",
                "--no-sweep", "--out", out]) == 0
    m = json.loads((out / "results.json").read_text())["models"][0]
    broken = [i for i, (c, r) in enumerate(zip(m["eval"]["clean"]["correct"], m["eval"]["worst_case"]["robust"]))
              if c and not r]
    saved_path = out / FOLDER / "relu-standard.npz"
    saved = load(saved_path)
    assert broken and saved["index"].tolist() == broken  # every image the worst case counts as broken
    assert set(saved["attack"].tolist()) <= {"apgd_ce", "fgsm", "rerun_2x"}
    capsys.readouterr()
    assert dqa(["verify", out, "--checkpoint-dir", tmp_path]) == 0
    assert f"{len(broken)} of {len(broken)} saved adversarial images hold" in capsys.readouterr().out

    # A point moved outside the ball, or back to the clean image, fails the check.
    x = saved["x"].copy()
    x[0] = np.clip(x[0] + 0.5, 0, 1)
    _rewrite(saved_path, x=x)
    assert "outside the ball" in one_line_error(capsys, ["verify", out, "--checkpoint-dir", tmp_path])
    x[0] = load_dataset("mnist5k").x_test[saved["index"][0]].numpy()
    _rewrite(saved_path, x=x)
    assert "classified right" in one_line_error(capsys, ["verify", out, "--checkpoint-dir", tmp_path])
    # Another checkpoint under the same name is refused; so is a report without its images.
    (tmp_path / "other").mkdir()
    untrained_checkpoint(tmp_path / "other" / "m.pt", seed=1)
    assert "not the checkpoint" in one_line_error(capsys, ["verify", out, "--checkpoint-dir", tmp_path / "other"])
    saved_path.unlink()
    assert "no saved adversarial images" in one_line_error(capsys, ["verify", out, "--checkpoint-dir", tmp_path])
