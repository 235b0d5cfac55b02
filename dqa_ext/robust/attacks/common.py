"""What every attack family shares: prediction, the L-inf projection, the margin losses,
per-example random streams."""
from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def logits_of(model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits on the CPU, computed in batches on the model's device."""
    dev = device_of(model) if isinstance(model, nn.Module) else torch.device("cpu")
    return torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])


def predict(model, x, batch_size: int = 500) -> np.ndarray:
    if isinstance(model, nn.Module):
        model.eval()
    return logits_of(model, torch.as_tensor(x), batch_size).argmax(1).numpy()


@contextlib.contextmanager
def input_gradients_only(model: nn.Module):
    """Attacks differentiate w.r.t. the input only: parameters stop requiring gradients (faster),
    and the model is in eval mode; both are restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


@contextlib.contextmanager
def exact_float32():
    """TF32 off for the block (CUDA matmuls and convolutions round inputs to 10 mantissa bits with it
    on): an adversarial point found on the GPU must break the model that a CPU re-check runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def project_linf(x_new: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x_new moved into the L-inf ball of radius eps around x, and into the pixel range [0, 1]."""
    return torch.min(torch.max(x_new, x - eps), x + eps).clamp_(0.0, 1.0)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j: negative exactly when the prediction is wrong."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - other


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference-of-logits ratio (untargeted), to be maximised."""
    z, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = (logits.argmax(1) == y).float()
    return -(z_y - z[:, -2] * top_is_y - z[:, -1] * (1 - top_is_y)) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """APGD-T's loss: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), to be maximised."""
    z, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def example_seed(seed: int, tag: str, example: int) -> int:
    """A seed for one example's random stream in one attack: keyed by the example's index in the
    test set, not by its position in a batch or a shard, so results do not depend on how the
    images are split."""
    h = hashlib.blake2b(f"{seed}/{tag}/{example}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def example_uniform(ids, shape, seed: int, tag: str) -> torch.Tensor:
    """[len(ids), *shape] uniform in [-1, 1), each row from its example's own stream."""
    rows = [torch.rand(shape, generator=torch.Generator().manual_seed(example_seed(seed, tag, int(i))))
            for i in ids]
    return (torch.stack(rows) * 2 - 1) if rows else torch.empty(0, *shape)


def example_generators(ids, seed: int, tag: str) -> list[np.random.Generator]:
    return [np.random.default_rng(example_seed(seed, tag, int(i))) for i in ids]
