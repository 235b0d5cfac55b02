"""Standard and PGD adversarial training (Madry et al.), seeded, resumable and DDP-ready.

A checkpoint is a plain dict of tensors and primitives (so ``torch.load(weights_only=True)`` reads it)
written atomically after every epoch. Under ``torchrun`` (WORLD_SIZE > 1) each rank trains on its
shard of every epoch's permutation; gradients are averaged by DDP (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_dataset
from .errors import UserError
from .models import build_model, default_arch, materialize, parse_activation

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
    progress: bool | None = None    # tqdm bars; None: only on a terminal

    def resolved(self, input_shape) -> "TrainConfig":
        """Fill the data-dependent defaults, validating as we go."""
        parse_activation(self.activation)
        mnist = input_shape[0] == 1
        c = dataclasses.replace(self)
        c.arch = c.arch or default_arch(input_shape)
        c.optimizer = c.optimizer or ("adam" if mnist else "sgd")
        if c.optimizer not in ("adam", "sgd"):
            raise TrainError(f"bad optimizer {c.optimizer!r}: use adam or sgd")
        c.lr = c.lr if c.lr is not None else (1e-3 if c.optimizer == "adam" else 0.1)
        c.weight_decay = c.weight_decay if c.weight_decay is not None else (0.0 if c.optimizer == "adam" else 5e-4)
        c.eps = c.eps if c.eps is not None else default_eps(input_shape)
        if c.epochs < 1 or c.batch_size < 1 or c.pgd_steps < 1 or c.eps < 0:
            raise TrainError("epochs, batch size and PGD steps must be >= 1 and eps >= 0")
        c.pgd_step_size = c.pgd_step_size if c.pgd_step_size is not None else 2.5 * c.eps / c.pgd_steps
        return c


def default_eps(input_shape) -> float:
    return 0.3 if input_shape[0] == 1 else 8 / 255


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} requested but CUDA is not available")
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


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise TrainError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainError(f"{path} is not a dqa_ext.robust checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    meta = ckpt["meta"]
    model = build_model(meta["arch"], meta["activation"], tuple(meta["input_shape"]), meta["num_classes"],
                        **meta["arch_kwargs"])
    # Lazy DQA steps exist only after a forward; the state dict then overwrites them.
    materialize(model, torch.rand(2, *meta["input_shape"]))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model in eval mode; it takes pixels in [0, 1]. ``.dqa_meta`` holds its settings."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device).eval()
    model.dqa_meta = dict(ckpt["meta"], epoch=ckpt["epoch"], history=ckpt.get("history", []))
    return model


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


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
    world, rank, local = _dist_info()
    distributed = world > 1
    device = resolve_device(config.device)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
            "config": _plain(dataclasses.asdict(cfg))}
    start_epoch, history = 0, []
    if cfg.init_from:
        init = read_checkpoint(cfg.init_from)
        if init["meta"]["activation"] != cfg.activation or init["meta"]["arch"] != cfg.arch:
            raise TrainError(f"--init-from {cfg.init_from} is a {init['meta']['activation']} "
                             f"{init['meta']['arch']}, not {cfg.activation} {cfg.arch}")
        model.load_state_dict(init["model"])
    if cfg.resume and Path(cfg.out).is_file():
        ckpt = read_checkpoint(cfg.out)
        old = ckpt["meta"]
        for key in ("arch", "activation", "training", "dataset"):
            if old[key] != meta[key]:
                raise TrainError(f"--resume: checkpoint {cfg.out} has {key}={old[key]!r}, this run {meta[key]!r}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("scheduler"):
            sched.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"], list(ckpt.get("history", []))
        say(f"resuming {cfg.out} after epoch {start_epoch}/{cfg.epochs}")

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
            save_atomic({"format": FORMAT, "meta": meta, "epoch": epoch + 1, "history": history,
                         "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict() if sched is not None else None}, cfg.out)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    model.eval()
    model.dqa_meta = dict(meta, epoch=cfg.epochs, history=history)
    return model


def _plain(d: dict) -> dict:
    """Only primitives in the checkpoint (weights_only=True loading)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else str(v)) for k, v in d.items()}
