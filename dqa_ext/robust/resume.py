"""Where a training run starts: the checkpoint at --out it continues (--resume, refused when its
settings differ), or refuses to overwrite (without --force), and the checkpoint it warm-starts from
(--init-from)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoint import load_weights, read_checkpoint
from .config import TrainConfig, data_channels
from .errors import TrainError
from .models import default_arch

# Settings a resumed run may change: where things are, how they are shown, and (checked apart) epochs.
RESUME_MAY_CHANGE = ("epochs", "out", "resume", "force", "progress", "device", "amp", "data_dir", "init_from")


def previous_checkpoint(config: TrainConfig) -> dict | None:
    """The checkpoint at --out to resume from (or None); refuses to overwrite one without --force."""
    out = Path(config.out)
    if not out.exists():
        return None
    if config.resume:
        return read_checkpoint(out)
    if config.force:
        return None
    try:
        done = f"a checkpoint trained for {read_checkpoint(out)['epoch']} epoch(s)"
    except TrainError:
        done = "a file that is not a dqa checkpoint"
    raise TrainError(f"--out {out} already exists ({done}); use --resume to continue it or --force to "
                     "overwrite it")


def same(a, b) -> bool:
    """Settings compare equal across tuples and lists (a checkpoint stores lists)."""
    return _norm(a) == _norm(b)


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def check_world_size(ckpt: dict, world: int, out) -> None:
    """Each rank trains on its shard of every epoch, so another world size is another run.
    Checkpoints written before the field was recorded are accepted."""
    old_world = ckpt["meta"].get("world_size")
    if old_world is not None and old_world != world:
        raise TrainError(f"--resume: {out} was trained with WORLD_SIZE={old_world} but this run has "
                         f"WORLD_SIZE={world}, which shards the data differently; resume it with "
                         f"{old_world} process(es), or start over without --resume and with --force")


def check_resume(ckpt: dict, meta: dict, cfg: TrainConfig) -> None:
    """A resumed run must be the run that wrote the checkpoint: same model, data and training settings."""
    old_meta, old_cfg, new_cfg = ckpt["meta"], ckpt["meta"]["config"], meta["config"]
    diffs = [f"{k} {old_meta[k]!r} -> {meta[k]!r}"
             for k in ("arch", "activation", "training", "dataset", "input_shape", "num_classes", "arch_kwargs")
             if not same(old_meta[k], meta[k])]
    diffs += [f"{k} {old_cfg[k]!r} -> {new_cfg[k]!r}" for k in new_cfg
              if k not in RESUME_MAY_CHANGE and k in old_cfg and k != "arch_kwargs" and not same(old_cfg[k], new_cfg[k])]
    if diffs:
        raise TrainError(f"--resume: {cfg.out} was trained with other settings ({'; '.join(diffs)}); rerun with "
                         "the checkpoint's settings, or without --resume and with --force to start over")
    done = ckpt["epoch"]
    if done > cfg.epochs:
        raise TrainError(f"--resume: {cfg.out} is already trained for {done} epochs, more than --epochs "
                         f"{cfg.epochs}")
    if cfg.optimizer == "sgd" and old_cfg.get("epochs", cfg.epochs) != cfg.epochs:
        raise TrainError(f"--resume: {cfg.out} uses SGD with a cosine schedule over {old_cfg['epochs']} epochs; "
                         f"--epochs {cfg.epochs} would change the schedule (only Adam runs can be extended)")


def read_warm_start(cfg: TrainConfig) -> dict | None:
    """--init-from: a checkpoint of the same model (e.g. a standard model before PGD training), read
    and compared before any work."""
    if not cfg.init_from:
        return None
    try:
        init = read_checkpoint(cfg.init_from)
    except TrainError as e:
        raise TrainError(f"--init-from: {e}") from None
    im = init["meta"]
    arch = cfg.arch or default_arch(data_channels(cfg.data))
    if (im["activation"], im["arch"]) != (cfg.activation, arch) or not same(im["arch_kwargs"], cfg.arch_kwargs):
        raise TrainError(f"--init-from {cfg.init_from} is a {_model(im['activation'], im['arch'], im['arch_kwargs'])}, "
                         f"not {_model(cfg.activation, arch, cfg.arch_kwargs)}")
    return init


def _model(activation, arch, kwargs) -> str:
    """'dqa2 mnist_cnn (channels=[8, 16], hidden=32)', or '... (default size)'."""
    size = ", ".join(f"{k}={v}" for k, v in sorted((kwargs or {}).items())) or "default size"
    return f"{activation} {arch} ({size})"


def warm_start(model: nn.Module, init: dict, source) -> None:
    load_weights(model, init["model"], f"--init-from {source}")
