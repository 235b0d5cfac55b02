"""Papernot et al. 2017's black-box substitute attack, which no maintained PyTorch library provides.

The attacker sees only the target's labels (a label-only oracle). Starting from a small held-out
seed set, it alternates: train a substitute on oracle labels, then grow the set by Jacobian-based
dataset augmentation, x' = clip(x + lambda * sign(d substitute_logit[oracle(x)] / dx)), and label the
new points with the oracle. Adversarial examples crafted on the final substitute (FGSM, PGD via ART)
are then transferred to the target. Defaults follow cleverhans' mnist_blackbox tutorial: 150 seeds,
6 substitute epochs (augmentation rounds), lambda 0.1, a 200-200 MLP substitute, 10 epochs per round.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model


@dataclasses.dataclass
class SubstituteResult:
    correct_fgsm: np.ndarray      # per eval image: target still right after the transferred FGSM
    correct_pgd: np.ndarray
    queries: int                  # oracle label queries spent
    agreement: float              # substitute/target agreement on the eval images
    seconds: float = 0.0


@torch.no_grad()
def oracle_labels(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Labels only: the attacker never sees logits or gradients of the target."""
    model.eval()
    dev = next(iter(model.parameters()), torch.empty(0)).device
    return torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def jacobian_augment(sub: nn.Module, x: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """One step along the sign of the substitute's Jacobian row for each point's oracle label."""
    sub.eval()
    x = x.clone().requires_grad_(True)
    logits = sub(x)
    (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), x)
    return (x.detach() + lam * grad.sign()).clamp_(0, 1)


def train_substitute(target: nn.Module, x_seed: torch.Tensor, *, rounds: int = 6, epochs: int = 10,
                     lam: float = 0.1, arch: str = "mlp", batch_size: int = 32, lr: float = 1e-3,
                     seed: int = 0, num_classes: int = 10) -> tuple[nn.Module, int]:
    """Returns the substitute (eval mode) and the number of oracle queries it cost."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sub = build_model(arch, "relu", tuple(x_seed.shape[1:]), num_classes)
    opt = torch.optim.Adam(sub.parameters(), lr=lr)
    x = x_seed.clone()
    y = oracle_labels(target, x)
    queries = len(x)
    for r in range(rounds):
        sub.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(sub(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if r < rounds - 1:
            # Periodic step sign as in cleverhans' tutorial: -lambda for rounds 0-2, +lambda after.
            coef = -1.0 if r < 3 else 1.0
            x_new = jacobian_augment(sub, x, y, coef * lam)
            y_new = oracle_labels(target, x_new)
            queries += len(x_new)
            x, y = torch.cat([x, x_new]), torch.cat([y, y_new])
    return sub.eval(), queries
