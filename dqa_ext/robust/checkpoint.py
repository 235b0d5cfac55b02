"""The checkpoint format of `dqa train`: a plain dict of tensors and primitives, so that
``torch.load(weights_only=True)`` reads it (no file we read can run code), every field checked on
reading, weights that are not finite refused, written atomically (outputs.py).

  format      FORMAT
  meta        arch, arch_kwargs, activation, training, dataset, input_shape, num_classes, config,
              world_size (the data shards depend on it)
  epoch       epochs trained
  model       the state dict
  history     per epoch: loss, train_acc, test_acc, seconds (and collapsed, when it was)
  optimizer, scheduler   to resume
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from .config import check_arch_kwargs
from .errors import TrainError, UserError, quote
from .models import ARCHS, build_model, materialize, parse_activation
from .outputs import save_torch_atomic

FORMAT = "dqa_ext.robust/1"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# key -> (check, what it must be); the checkpoint's own fields, then its "meta"
CHECKPOINT_KEYS = {
    "meta": (lambda v: isinstance(v, dict), "a dict"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "model": (lambda v: isinstance(v, dict), "a dict of tensors"),
}
OPTIONAL_CHECKPOINT_KEYS = {
    "history": (lambda v: isinstance(v, list), "a list"),
    "optimizer": (lambda v: isinstance(v, dict), "a dict"),
    "scheduler": (lambda v: v is None or isinstance(v, dict), "a dict or None"),
}
META_KEYS = {
    "arch": (lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}"),
    "activation": (lambda v: isinstance(v, str), "a string"),
    "training": (lambda v: v in ("standard", "pgd"), "standard or pgd"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "input_shape": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(d) and d > 0 for d in v),
                    "three integers > 0"),
    "num_classes": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "arch_kwargs": (lambda v: isinstance(v, dict), "a dict"),
    "config": (lambda v: isinstance(v, dict), "a dict"),
}


def _check_keys(d: dict, keys: dict, where: str, path, required: bool) -> None:
    for key, (ok, expected) in keys.items():
        if key not in d:
            if required:
                raise TrainError(f"checkpoint {path} is missing {where}{key!r}")
            continue
        if not ok(d[key]):
            raise TrainError(f"checkpoint {path} has a bad {where}{key!r}: expected {expected}, "
                             f"got {quote(repr(d[key]), 60)}")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``train``, read with ``weights_only=True`` and its fields checked."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist" if not path.exists()
                         else f"checkpoint {path} is not a regular file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise TrainError(f"cannot read checkpoint {path}: not a file written by `dqa train` (not a PyTorch "
                         "checkpoint at all)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types, some with multi-line messages
        raise TrainError(f"cannot read checkpoint {path}: not a file written by `dqa train` "
                         f"({type(e).__name__}: {quote(e, 120)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainError(f"{path} is not a dqa_ext.robust checkpoint (no format {FORMAT!r})")
    _check_keys(ckpt, CHECKPOINT_KEYS, "", path, required=True)
    _check_keys(ckpt, OPTIONAL_CHECKPOINT_KEYS, "", path, required=False)
    _check_keys(ckpt["meta"], META_KEYS, "meta ", path, required=True)
    try:
        parse_activation(ckpt["meta"]["activation"])
        check_arch_kwargs(ckpt["meta"]["arch_kwargs"], ckpt["meta"]["arch"])
    except UserError as e:
        raise TrainError(f"checkpoint {path} has bad meta: {e}") from None
    return ckpt


def write_checkpoint(path, *, meta: dict, epoch: int, history: list, model: nn.Module, optimizer=None,
                     scheduler=None) -> None:
    save_torch_atomic({"format": FORMAT, "meta": meta, "epoch": epoch, "history": history,
                       "model": model.state_dict(),
                       "optimizer": optimizer.state_dict() if optimizer is not None else {},
                       "scheduler": scheduler.state_dict() if scheduler is not None else None}, path)


def load_weights(model: nn.Module, state: dict, source) -> None:
    """load_state_dict with a one-line error (torch's lists every mismatched tensor), refusing
    weights that are not finite: a model trained into NaN predicts garbage that looks like numbers."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainError(f"{source}: its weights are not finite ({bad[0]}{' and more' if len(bad) > 1 else ''} "
                         "holds NaN or inf); the run that wrote it diverged")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        raise TrainError(f"{source}: its weights do not fit the model its settings describe ({quote(e)})") from None


def model_from_checkpoint(ckpt: dict, source="checkpoint") -> nn.Module:
    meta = ckpt["meta"]
    model = build_model(meta["arch"], meta["activation"], tuple(meta["input_shape"]), meta["num_classes"],
                        **meta["arch_kwargs"])
    # Lazy DQA steps exist only after a forward; the state dict then overwrites them.
    materialize(model, torch.rand(2, *meta["input_shape"]))
    load_weights(model, ckpt["model"], source)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model in eval mode; it takes pixels in [0, 1]. ``.dqa_meta`` holds its settings."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, f"checkpoint {path}").to(device).eval()
    model.dqa_meta = dict(ckpt["meta"], epoch=ckpt["epoch"], history=ckpt.get("history", []))
    return model
