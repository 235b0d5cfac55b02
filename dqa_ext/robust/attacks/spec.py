"""What an attack is to the evaluation (AttackSpec, with the budget knobs it declares), and the one
signature every attack has: ``runner(Target) -> Outcome``.

An attack runs in one of two stages:
  cascade   on the images that every earlier cascade attack left robust (AutoAttack's way); its
            adversarial points are checked again on the model before they count;
  prefix    alone on its own test-set prefix (the paper's way), beside the cascade.
Its family says what the checks compare it with (checks.py):
  straight-through     white-box gradients through the quantizers' straight-through backward
  quantization-aware   smooth twins or surrogate backwards of the quantizers
  black-box            no gradients of the model (scores, labels or other models)
  true-gradient        the quantizer's true derivative: the masking demonstration
  cross-check          the project's attacks re-run with ART's; not part of the worst case
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

FAMILIES = ("straight-through", "quantization-aware", "black-box", "true-gradient", "cross-check")
STAGES = ("cascade", "prefix")


@dataclasses.dataclass(frozen=True)
class Knob:
    """One budget setting. Integer knobs (counts) must be >= 1 (a count of 0 would silently attack
    nothing), float knobs finite and >= 0; ``maximum`` caps either. ``scales``: multiplied in the
    convergence rerun (steps and restarts)."""
    name: str
    default: int | float
    doc: str
    maximum: int | float | None = None
    scales: bool = False

    @property
    def kind(self) -> type:
        return int if isinstance(self.default, int) else float


@dataclasses.dataclass
class Target:
    """What every attack gets. x, y: the images to attack and their labels, on the model's device;
    ids: each image's index in the test set (keys its random streams, so results do not depend on
    batching or sharding); sources: other models' transfer candidates, indexed by test-set index;
    x_seed: held-out images (the substitute attack's seed set); near: the attacks' closest points
    so far on the real model (near.NearMisses), for the repair and the near-miss restarts."""
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor
    eps: float
    budget: object  # budget.Budget
    seed: int = 0
    attack_grad: str = "bpda"
    sources: dict | None = None
    x_seed: torch.Tensor | None = None
    num_classes: int = 10
    near: object = None  # near.NearMisses


@dataclasses.dataclass
class Outcome:
    """broken: bool [N] on the CPU, the images the attack claims to break; x_adv: its adversarial
    points (cascade attacks; checked again on the model); info: what the report records beside it."""
    broken: torch.Tensor
    x_adv: torch.Tensor | None = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    name: str
    label: str
    family: str
    stage: str
    runner: Callable[[Target], Outcome]
    description: str
    knobs: tuple[Knob, ...] = ()     # the budget settings it declares (each declared by one attack)
    uses: tuple[str, ...] = ()       # settings declared by another attack that it reads too
    default: bool = True             # in the default suite
    needs_quantizers: bool = False   # only for models with quantized activations
    uses_gradients: bool = False     # white-box: `--attack-grad zero` gives it the true derivative
    prefix: str | None = None        # prefix stage: the knob that caps its images (else the budget's n)
    unbounded: bool = False          # minimal-L2: success rate and median L2; projected onto the ball
    iterative_version: str | None = None  # a single-step attack must not beat this iterative one
    baseline: bool = False           # the paper's own evaluation, reported alone beside the worst case
    check: Callable | None = None    # rules between knobs: check(budget) raises AttackError
    cost: Callable | None = None     # cost(budget): forward-backward passes per image, roughly (progress)

    @property
    def budget_keys(self) -> tuple[str, ...]:
        """The settings its numbers depend on, recorded beside them."""
        return self.uses + tuple(k.name for k in self.knobs)

    @property
    def in_worst_case(self) -> bool:
        return self.family != "cross-check"

    def units(self, budget) -> float:
        return float(self.cost(budget)) if self.cost is not None else 1.0
