"""Standard and PGD adversarial training (Madry et al.), seeded, resumable and DDP-ready.

A checkpoint (checkpoint.py) is written atomically after every epoch. Under ``torchrun``
(WORLD_SIZE > 1) each rank trains on its shard of every epoch's permutation; gradients are averaged
by DDP (gloo on CPU, NCCL on CUDA). A model whose test accuracy stays at chance after the eps
warm-up (the constant-prediction plateau PGD training from scratch falls into) stops the run with
what to do instead.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .attacks.common import project_linf
from .checks import at_chance
from .checkpoint import load_model, load_weights, write_checkpoint
from .config import TrainConfig
from .data import load_dataset
from .devices import resolve_device
from .distributed import join, world_from_env
from .errors import TrainError
from .models import build_model, materialize
from .outputs import check_output_file
from .resume import check_resume, check_world_size, previous_checkpoint, read_warm_start, warm_start

# scripts/independent (frozen audit code) imports load_model from this module.
__all__ = ["TrainConfig", "accuracy", "load_model", "pgd_attack", "train"]

# Consecutive epochs at chance after the warm-up that stop a run (the first one only warns).
COLLAPSE_PATIENCE = 2


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
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def _autocast(device: torch.device, amp: bool | None):
    enabled = bool(amp) and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def accuracy(model: nn.Module, x, y, device, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / max(1, len(x))


def _plain(d: dict) -> dict:
    """Only primitives in the checkpoint (weights_only=True loading)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else str(v)) for k, v in d.items()}


def _optimizer(model: nn.Module, cfg: TrainConfig):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("step") or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.optimizer == "sgd" else None
    return opt, sched


def _collapse_advice(cfg: TrainConfig) -> str:
    if cfg.adv and not cfg.init_from:
        return (f"PGD training from scratch stays on that plateau: start from a standard model with the eps ramped "
                f"up, as `dqa reproduce` does (dqa train --act {cfg.activation} --out std.pt, then this command with "
                "--init-from std.pt --eps-warmup 1 --force)")
    return "lower --lr, or check the data and labels"


def _check_collapse(history: list, cfg: TrainConfig, say) -> None:
    """Warns at the first epoch at chance after the warm-up; stops the run at the COLLAPSE_PATIENCE-th
    in a row (the checkpoint of that epoch is kept)."""
    streak = 0
    for rec in reversed(history):
        if not rec.get("collapsed"):
            break
        streak += 1
    if not streak:
        return
    what = f"{cfg.out}: test accuracy {history[-1]['test_acc']:.3f} is at chance {streak} epoch(s) after the eps warm-up"
    if streak < COLLAPSE_PATIENCE:
        say(f"warning: {what}; one more such epoch stops the run")
        return
    raise TrainError(f"{what}: the model collapsed; {_collapse_advice(cfg)}")


def train(config: TrainConfig, dataset=None, log=print, on_epoch_end=None) -> nn.Module:
    """Train per ``config`` and return the (unwrapped) model in eval mode; checkpoints go to config.out.

    ``on_epoch_end(epoch)`` is called after each checkpoint is written (tests use it to interrupt)."""
    # Everything the user gave is checked before any data is loaded or any epoch is run.
    config.validate()
    check_output_file(config.out, what="--out")
    from tqdm import auto as bars  # an optional dependency: missing, it is reported before any work

    previous = previous_checkpoint(config)
    init = read_warm_start(config)
    world, rank, _ = world_from_env()
    if previous is not None:  # before the process group and the data: a mismatch is found at once
        check_world_size(previous, world, config.out)
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
    opt, sched = _optimizer(model, cfg)

    meta = {"arch": cfg.arch, "arch_kwargs": dict(cfg.arch_kwargs), "activation": cfg.activation,
            "training": "pgd" if cfg.adv else "standard", "dataset": dataset.name,
            "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "world_size": world,  # each rank's data shard depends on it (checked on --resume)
            "config": _plain(dataclasses.asdict(cfg))}
    start_epoch, history = 0, []
    if init is not None:
        warm_start(model, init, cfg.init_from)
    if previous is not None:
        check_resume(previous, meta, cfg)
        load_weights(model, previous["model"], f"--resume {cfg.out}")
        try:
            opt.load_state_dict(previous["optimizer"])
            if sched is not None and previous.get("scheduler"):
                sched.load_state_dict(previous["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise TrainError(f"--resume {cfg.out}: its optimizer state does not fit this run ({e})") from None
        start_epoch, history = previous["epoch"], list(previous.get("history", []))
        if start_epoch == cfg.epochs:
            say(f"{cfg.out} is already trained for {start_epoch} epochs; nothing to do")
        else:
            say(f"resuming {cfg.out} after epoch {start_epoch}, training to epoch {cfg.epochs}")

    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    n = len(x_train)
    name = f"{cfg.activation}/{meta['training']}"
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
        bar = bars.tqdm(batches, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=(None if cfg.progress is None else not cfg.progress) if is_main else True, leave=False)
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
        if epoch + 1 >= max(1.0, cfg.eps_warmup) and at_chance(test_acc, len(x_test), dataset.num_classes):
            rec["collapsed"] = True
        history.append(rec)
        say(f"[{name}] epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} "
            f"{'adv-' if cfg.adv else ''}train-acc {rec['train_acc']:.3f} test-acc {test_acc:.3f} "
            f"({rec['seconds']:.1f}s)")
        if is_main:
            write_checkpoint(cfg.out, meta=meta, epoch=epoch + 1, history=history, model=model, optimizer=opt,
                             scheduler=sched)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
        _check_collapse(history, cfg, say)
    if distributed:  # rank 0's checkpoint is on disk before any rank goes on (a PGD run starts from it)
        torch.distributed.barrier()
    model.eval()
    model.dqa_meta = dict(meta, epoch=cfg.epochs, history=history, epochs_run=cfg.epochs - start_epoch)
    return model
