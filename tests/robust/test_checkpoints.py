"""Checkpoints are read without running code and every field is checked: a bad one is one line at
the command line, weights that are not finite (a diverged run) are refused, and a warm start from
another model's checkpoint is refused before any work."""
import os

import numpy as np
import pytest
import torch

from dqa_ext.robust.checkpoint import load_model
from dqa_ext.robust.errors import TrainError, quote
from support.robust import forbid_work, one_line_error, untrained_checkpoint

TINY = ["--channels", "8,16", "--hidden", "32", "--kernel", "3", "--n-train", "128", "--epochs", "1"]


@pytest.fixture
def no_work(monkeypatch):
    forbid_work(monkeypatch)


def _meta(**over):
    meta = {"arch": "mnist_cnn", "arch_kwargs": {"channels": [8, 16], "hidden": 32, "kernel": 3},
            "activation": "relu", "training": "standard", "dataset": "mnist5k", "input_shape": [1, 28, 28],
            "num_classes": 10, "config": {}}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def _ckpt(**over):
    ckpt = {"format": "dqa_ext.robust/1", "meta": _meta(), "epoch": 1, "history": [], "model": {},
            "optimizer": {}, "scheduler": None}
    ckpt.update(over)
    return {k: v for k, v in ckpt.items() if v is not None}


BAD_CHECKPOINTS = {
    "text file": (b"hello world\n" * 4, "cannot read checkpoint"),
    "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "cannot read checkpoint"),
    "empty file": (b"", "cannot read checkpoint"),
    "a plain state dict": ({"w": torch.ones(1)}, "not a dqa_ext.robust checkpoint"),
    "no meta": (_ckpt(meta=None), "missing 'meta'"),
    "no model": (_ckpt(model=None), "missing 'model'"),
    "meta without arch": (_ckpt(meta=_meta(arch=None)), "missing meta 'arch'"),
    "meta without config": (_ckpt(meta=_meta(config=None)), "missing meta 'config'"),
    "bad input_shape": (_ckpt(meta=_meta(input_shape=[1, 28])), "bad meta 'input_shape'"),
    "bad arch": (_ckpt(meta=_meta(arch="vgg")), "bad meta 'arch'"),
    "bad epoch": (_ckpt(epoch="3"), "bad 'epoch'"),
    "one channel": (_ckpt(meta=_meta(arch_kwargs={"channels": [8]})), "--channels"),
    "weights of another model": (_ckpt(model={"1.weight": torch.ones(3, 1, 3, 3)}), "weights do not fit"),
}


def _write_checkpoint(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_one_line(capsys, no_work, tmp_path, name):
    content, match = BAD_CHECKPOINTS[name]
    path = tmp_path / "bad.pt"
    _write_checkpoint(path, content)
    assert match in one_line_error(capsys, ["attack", path, "--out", tmp_path / "rep"])
    with pytest.raises(TrainError, match=match):
        load_model(path)


def test_bad_checkpoint_to_resume_is_one_line(capsys, no_work, tmp_path):
    path = tmp_path / "m.pt"
    _write_checkpoint(path, _ckpt(meta=_meta(arch=None)))
    assert "missing meta 'arch'" in one_line_error(capsys, ["train", "--out", path, "--resume"] + TINY)


def test_a_checkpoint_with_weights_that_are_not_finite_is_refused(capsys, no_work, tmp_path):
    path = untrained_checkpoint(tmp_path / "nan.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, path)
    assert "1.weight holds NaN or inf" in one_line_error(capsys, ["attack", path, "--out", tmp_path / "rep"])
    with pytest.raises(TrainError, match="not finite"):
        load_model(path)
    assert not (tmp_path / "rep").exists()


def test_a_warm_start_from_another_model_is_refused_before_any_work(capsys, no_work, tmp_path):
    other = untrained_checkpoint(tmp_path / "relu.pt", "relu")
    err = one_line_error(capsys, ["train", "--act", "dqa2", "--init-from", other, "--out", tmp_path / "m.pt"])
    assert "--init-from" in err and "is a relu mnist_cnn (" in err and "not dqa2 mnist_cnn (default size)" in err
    assert "{" not in err


class _RunsCode:
    def __reduce__(self):
        return os.getcwd, ()


def test_a_refused_pickle_is_quoted_by_what_torch_refused(capsys, no_work, tmp_path):
    """torch.load's weights-only refusal opens with a paragraph of advice: the line quotes what it
    refused instead of that paragraph cut mid-word."""
    path = tmp_path / "code.pt"
    torch.save({"a": _RunsCode()}, path)
    err = one_line_error(capsys, ["attack", path, "--out", tmp_path / "rep"])
    assert "unsupported GLOBAL" in err and "getcwd" in err and "In PyTorch 2.6" not in err


def test_quoted_messages_lose_escape_codes_and_are_cut_at_a_word():
    text = "\x1b[1mWeightsUnpickler error:\x1b[0m\n\n" + "unsupported operand " * 20
    q = quote(text, limit=60)
    assert "\x1b" not in q and q.startswith("WeightsUnpickler error: unsupported operand")
    assert q.endswith("operand...") or q.endswith("unsupported...")
    assert len(q) <= 60
