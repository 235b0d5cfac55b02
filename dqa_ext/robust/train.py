"""Standard and PGD adversarial training (Madry et al.), seeded, resumable and DDP-ready.

A checkpoint is a plain dict of tensors and primitives (so ``torch.load(weights_only=True)`` reads it)
written atomically after every epoch. Under ``torchrun`` (WORLD_SIZE > 1) each rank trains on its
shard of every epoch's permutation; gradients are averaged by DDP (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import DATASETS, load_dataset
from .distributed import join, world_from_env
from .errors import UserError
from .models import ARCHS, build_model, default_arch, materialize, parse_activation
from .outputs import check_output_file, save_torch_atomic

FORMAT = "dqa_ext.robust/1"


class TrainError(UserError):
    """Bad training settings or an unusable checkpoint."""


@dataclasses.dataclass
class TrainConfig:
    data: str = "mnist5k"
    data_dir: str | None = None
    activation: str = "relu"
    adv: bool = False               # PGD adversarial training
    arch: str | None = None         # default: mnist_cnn for 1-channel data, resnet20 for 3-channel
    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 64
    optimizer: str | None = None    # adam (MNIST default) or sgd (CIFAR default, cosine schedule)
    lr: float | None = None
    weight_decay: float | None = None
    eps: float | None = None        # default: 0.3 (MNIST), 8/255 (CIFAR-10)
    pgd_steps: int = 7
    pgd_step_size: float | None = None  # default: 2.5 * eps / steps
    eps_warmup: float = 0.0         # epochs over which the training eps ramps linearly from 0
    n_train: int | None = None      # use only the first n training images
    init_from: str | None = None    # start from this checkpoint's weights (e.g. PGD fine-tuning)
    seed: int = 0
    device: str = "auto"
    amp: bool = True                # bf16 autocast, CUDA only
    out: str = "model.pt"
    resume: bool = False
    force: bool = False             # overwrite an existing --out (without resume)
    progress: bool | None = None    # tqdm bars; None: only on a terminal

    def validate(self) -> "TrainConfig":
        """Check every setting the user gave, before any data is loaded (one-line TrainError)."""
        parse_activation(self.activation)
        if self.data not in DATASETS:
            raise TrainError(f"--data {self.data!r}: choose one of {', '.join(DATASETS)}")
        if self.arch is not None and self.arch not in ARCHS:
            raise TrainError(f"--arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.optimizer is not None and self.optimizer not in ("adam", "sgd"):
            raise TrainError(f"--optimizer {self.optimizer!r}: use adam or sgd")
        for name in ("epochs", "batch_size", "pgd_steps"):
            _check_int(name, getattr(self, name))
        if self.n_train is not None:
            _check_int("n_train", self.n_train)
        _check_number("lr", self.lr, positive=True)
        _check_number("weight_decay", self.weight_decay)
        _check_number("eps", self.eps)
        _check_number("pgd_step_size", self.pgd_step_size, positive=True)
        _check_number("eps_warmup", self.eps_warmup)
        check_arch_kwargs(self.arch_kwargs)
        resolve_device(self.device)
        return self

    def resolved(self, input_shape) -> "TrainConfig":
        """Fill the data-dependent defaults, validating as we go."""
        self.validate()
        mnist = input_shape[0] == 1
        c = dataclasses.replace(self)
        c.arch = c.arch or default_arch(input_shape)
        check_arch_kwargs(c.arch_kwargs, c.arch)
        c.optimizer = c.optimizer or ("adam" if mnist else "sgd")
        c.lr = c.lr if c.lr is not None else (1e-3 if c.optimizer == "adam" else 0.1)
        c.weight_decay = c.weight_decay if c.weight_decay is not None else (0.0 if c.optimizer == "adam" else 5e-4)
        c.eps = c.eps if c.eps is not None else default_eps(input_shape)
        c.pgd_step_size = c.pgd_step_size if c.pgd_step_size is not None else 2.5 * c.eps / c.pgd_steps
        return c


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainError(f"{_flag(name)} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, positive: bool = False) -> None:
    """None means "the default"; anything else must be finite and > 0 (positive) or >= 0."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise TrainError(f"{_flag(name)} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


ARCH_KWARGS = {"mnist_cnn": ("channels", "hidden", "kernel"), "resnet20": ("width",), "mlp": ("hidden",)}


def check_arch_kwargs(kwargs: dict, arch: str | None = None) -> None:
    """Architecture settings by name and value; with ``arch``, also that it takes them."""
    if not isinstance(kwargs, dict):
        raise TrainError(f"arch_kwargs must be a dict, got {type(kwargs).__name__}")
    known = ARCH_KWARGS.get(arch, sorted({k for v in ARCH_KWARGS.values() for k in v}))
    for key, value in kwargs.items():
        if key not in known:
            takes = ", ".join(_flag(k) for k in known)
            raise TrainError(f"{_flag(key)} does not apply to {arch} (it takes {takes})" if arch
                             else f"unknown architecture setting {key!r} (known: {takes})")
        if key == "channels":
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
                raise TrainError(f"--channels must be two integers >= 1 (e.g. 32,64), got {value!r}")
        else:
            _check_int(key, value)
            if key == "kernel" and value % 2 == 0:
                # padding kernel // 2 keeps the image size only for odd kernels
                raise TrainError(f"--kernel must be odd (same padding), got {value!r}")


def default_eps(input_shape) -> float:
    return 0.3 if input_shape[0] == 1 else 8 / 255


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N, checked against the devices this machine has."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", name) if isinstance(name, str) else None
    if m is None:
        raise TrainError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name!r}: CUDA is not available on this machine (use cpu)")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise TrainError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def pgd_attack(model: nn.Module, x, y, eps: float, steps: int, step_size: float, amp=None):
    """L-inf PGD with a uniform random start (Madry et al.), used for adversarial training.

    Gradients are taken w.r.t. the input only, so the parameters' .grad is untouched (and DDP's
    reducer, if any, is not involved: pass the unwrapped module)."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    x_adv = (x + delta).clamp_(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with _autocast(x.device, amp):
            loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def _autocast(device: torch.device, amp: bool | None):
    enabled = bool(amp) and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


save_atomic = save_torch_atomic  # the old name


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
                             f"got {str(d[key])[:60]!r}")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``train``, read with ``weights_only=True`` and its fields checked."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist" if not path.exists()
                         else f"checkpoint {path} is not a regular file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types, some with multi-line messages
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise TrainError(f"cannot read checkpoint {path}: not a file written by `dqa train` "
                         f"({type(e).__name__}: {detail})") from e
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


def _load_weights(model: nn.Module, state: dict, source) -> None:
    """load_state_dict with a one-line error (torch's lists every mismatched tensor)."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        detail = str(e).strip().splitlines()[1].strip() if len(str(e).strip().splitlines()) > 1 else first
        raise TrainError(f"{source}: its weights do not fit the model its settings describe ({detail[:160]})") from None


def model_from_checkpoint(ckpt: dict, source="checkpoint") -> nn.Module:
    meta = ckpt["meta"]
    model = build_model(meta["arch"], meta["activation"], tuple(meta["input_shape"]), meta["num_classes"],
                        **meta["arch_kwargs"])
    # Lazy DQA steps exist only after a forward; the state dict then overwrites them.
    materialize(model, torch.rand(2, *meta["input_shape"]))
    _load_weights(model, ckpt["model"], source)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model in eval mode; it takes pixels in [0, 1]. ``.dqa_meta`` holds its settings."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, f"checkpoint {path}").to(device).eval()
    model.dqa_meta = dict(ckpt["meta"], epoch=ckpt["epoch"], history=ckpt.get("history", []))
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x, y, device, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / max(1, len(x))


def train(config: TrainConfig, dataset=None, log=print, on_epoch_end=None) -> nn.Module:
    """Train per ``config`` and return the (unwrapped) model in eval mode; checkpoints go to config.out.

    ``on_epoch_end(epoch)`` is called after each checkpoint is written (tests use it to interrupt)."""
    # Everything the user gave is checked before any data is loaded or any epoch is run.
    config.validate()
    check_output_file(config.out, what="--out")
    previous = _previous_checkpoint(config)
    world, rank, _ = world_from_env()
    if previous is not None:  # before the process group and the data: a mismatch is found at once
        _check_resume_world_size(previous, world, config.out)
    distributed = world > 1
    device = join(resolve_device(config.device))
    if dataset is None:
        dataset = load_dataset(config.data, config.data_dir)
    cfg = config.resolved(dataset.input_shape)
    is_main = rank == 0
    say = log if is_main else (lambda *_: None)

    x_train, y_train = dataset.x_train, dataset.y_train
    if cfg.n_train:
        x_train, y_train = x_train[:cfg.n_train], y_train[:cfg.n_train]
    x_test, y_test = dataset.x_test[:1000], dataset.y_test[:1000]

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.activation, dataset.input_shape, dataset.num_classes, **cfg.arch_kwargs)
    model.to(device)
    # Same first batch on every rank: lazy DQA steps are initialised identically before DDP.
    materialize(model, x_train[:cfg.batch_size].to(device))

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("step") or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.optimizer == "sgd" else None

    meta = {"arch": cfg.arch, "arch_kwargs": dict(cfg.arch_kwargs), "activation": cfg.activation,
            "training": "pgd" if cfg.adv else "standard", "dataset": dataset.name,
            "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "world_size": world,  # each rank's data shard depends on it (checked on --resume)
            "config": _plain(dataclasses.asdict(cfg))}
    start_epoch, history = 0, []
    if cfg.init_from:
        init = read_checkpoint(cfg.init_from)
        im = init["meta"]
        if (im["activation"], im["arch"], _norm(im["arch_kwargs"])) != (cfg.activation, cfg.arch, _norm(cfg.arch_kwargs)):
            raise TrainError(f"--init-from {cfg.init_from} is a {im['activation']} {im['arch']} {im['arch_kwargs']}, "
                             f"not {cfg.activation} {cfg.arch} {cfg.arch_kwargs}")
        _load_weights(model, init["model"], f"--init-from {cfg.init_from}")
    if previous is not None:
        ckpt = previous
        _check_resume(ckpt, meta, cfg)
        _load_weights(model, ckpt["model"], f"--resume {cfg.out}")
        try:
            opt.load_state_dict(ckpt["optimizer"])
            if sched is not None and ckpt.get("scheduler"):
                sched.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise TrainError(f"--resume {cfg.out}: its optimizer state does not fit this run ({e})") from None
        start_epoch, history = ckpt["epoch"], list(ckpt.get("history", []))
        if start_epoch == cfg.epochs:
            say(f"{cfg.out} is already trained for {start_epoch} epochs; nothing to do")
        else:
            say(f"resuming {cfg.out} after epoch {start_epoch}, training to epoch {cfg.epochs}")

    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    from tqdm.auto import tqdm

    n = len(x_train)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        # Seeds depend only on (seed, epoch, rank), so a resumed run replays the same epochs.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        per_rank = n // world  # equal shards keep DDP's collective calls in step
        shard = perm[rank * per_rank:(rank + 1) * per_rank]
        torch.manual_seed(cfg.seed * 7919 + epoch * 131 + rank)
        model.train()
        tot_loss, tot_correct, seen = 0.0, 0, 0
        batches = range(0, len(shard), cfg.batch_size)
        bar = tqdm(batches, desc=f"{cfg.activation}/{meta['training']} epoch {epoch + 1}/{cfg.epochs}",
                   disable=(None if cfg.progress is None else not cfg.progress) if is_main else True,
                   leave=False)
        for b, i in enumerate(bar):
            idx = shard[i:i + cfg.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            if cfg.adv:
                # A ramped eps lets small models escape the constant-prediction plateau that PGD
                # training at MNIST's eps 0.3 otherwise starts in.
                frac = min(1.0, (epoch + b / len(batches)) / cfg.eps_warmup) if cfg.eps_warmup > 0 else 1.0
                xb = pgd_attack(model, xb, yb, cfg.eps * frac, cfg.pgd_steps, cfg.pgd_step_size * frac, cfg.amp)
            with _autocast(device, cfg.amp):
                logits = net(xb)
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.item() * len(idx)
            tot_correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}")
        if sched is not None:
            sched.step()
        if not math.isfinite(tot_loss):
            raise TrainError(f"training diverged (loss {tot_loss}) in epoch {epoch + 1}")
        test_acc = accuracy(model, x_test, y_test, device)
        rec = {"epoch": epoch + 1, "loss": tot_loss / max(1, seen), "train_acc": tot_correct / max(1, seen),
               "test_acc": test_acc, "seconds": time.time() - t0}
        history.append(rec)
        say(f"[{cfg.activation}/{meta['training']}] epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} "
            f"{'adv-' if cfg.adv else ''}train-acc {rec['train_acc']:.3f} test-acc {test_acc:.3f} "
            f"({rec['seconds']:.1f}s)")
        if is_main:
            save_torch_atomic({"format": FORMAT, "meta": meta, "epoch": epoch + 1, "history": history,
                         "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict() if sched is not None else None}, cfg.out)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if distributed:  # rank 0's checkpoint is on disk before any rank goes on (a PGD run starts from it)
        torch.distributed.barrier()
    model.eval()
    model.dqa_meta = dict(meta, epoch=cfg.epochs, history=history, epochs_run=cfg.epochs - start_epoch)
    return model


def _previous_checkpoint(config: TrainConfig) -> dict | None:
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


# Settings a resumed run may change: where things are, how they are shown, and (checked apart) epochs.
RESUME_MAY_CHANGE = ("epochs", "out", "resume", "force", "progress", "device", "amp", "data_dir", "init_from")


def _norm(v):
    """Tuples and lists compare equal (a checkpoint stores lists)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _check_resume_world_size(ckpt: dict, world: int, out) -> None:
    """Each rank trains on its shard of every epoch, so another world size is another run.
    Checkpoints written before the field was recorded are accepted."""
    old_world = ckpt["meta"].get("world_size")
    if old_world is not None and old_world != world:
        raise TrainError(f"--resume: {out} was trained with WORLD_SIZE={old_world} but this run has "
                         f"WORLD_SIZE={world}, which shards the data differently; resume it with "
                         f"{old_world} process(es), or start over without --resume and with --force")


def _check_resume(ckpt: dict, meta: dict, cfg: TrainConfig) -> None:
    """A resumed run must be the run that wrote the checkpoint: same model, data and training settings."""
    old_meta, old_cfg, new_cfg = ckpt["meta"], ckpt["meta"]["config"], meta["config"]
    diffs = [f"{k} {old_meta[k]!r} -> {meta[k]!r}"
             for k in ("arch", "activation", "training", "dataset", "input_shape", "num_classes", "arch_kwargs")
             if _norm(old_meta[k]) != _norm(meta[k])]
    diffs += [f"{k} {old_cfg[k]!r} -> {new_cfg[k]!r}" for k in new_cfg
              if k not in RESUME_MAY_CHANGE and k in old_cfg and k != "arch_kwargs"
              and _norm(old_cfg[k]) != _norm(new_cfg[k])]
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


def _plain(d: dict) -> dict:
    """Only primitives in the checkpoint (weights_only=True loading)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else str(v)) for k, v in d.items()}
