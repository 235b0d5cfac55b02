"""How hard each attack tries. Every field is recorded in the report next to the numbers it made."""
from __future__ import annotations

import dataclasses
import math

from ..errors import UserError


class AttackError(UserError):
    """Bad attack name or budget."""


@dataclasses.dataclass
class Budget:
    """Budgets of the adaptive suite (AutoAttack strength by default) and of the paper's attacks.

    The adaptive suite runs on the first ``n`` test images, each attack only on the images that
    every earlier attack of the suite left robust. The paper's attacks run on their own prefixes."""
    n: int = 500                    # images for the adaptive suite and the bounded paper attacks
    batch_size: int = 500           # images per forward pass
    # --- the adaptive suite (AutoAttack's APGD, Croce & Hein 2020)
    apgd_steps: int = 100
    apgd_restarts: int = 5          # APGD-CE restarts
    apgd_t_targets: int = 9         # APGD-T: the top-k other classes, one run each
    apgd_t_restarts: int = 1
    square_queries: int = 5000
    square_p_init: float = 0.8
    twin_steps: int = 100           # attacks through a smooth twin / a surrogate backward
    twin_restarts: int = 1
    twin_targets: int = 9
    twin_temp_low: float = 0.1      # sigmoid-staircase temperatures, in units of the step
    twin_temp_high: float = 0.2
    anneal_steps: int = 200         # twin_anneal: PGD on the sigmoid twin, temperature annealed
    anneal_restarts: int = 40       # (restarts cycle through the CE, DLR and margin losses)
    anneal_t_start: float = 1.0     # even restarts start smooth, odd ones closer to the quantizer:
    anneal_t_start_low: float = 0.3  # the two find different rare points (docs/robust.md)
    anneal_t_end: float = 0.03
    transfer_steps: int = 100       # APGD-CE steps crafting each model's transfer candidates
    sanity_eps: float = 1.0         # a large-epsilon APGD-CE that must reach 0%
    sweep_n: int = 200              # images for the accuracy-vs-epsilon curves
    sweep_steps: int = 50
    # --- the paper's attacks (Rakin et al. 2018): FGSM, PGD, C&W-L2, ZOO, substitute
    pgd_steps: int = 40
    pgd_restarts: int = 1
    pgd_step_rel: float = 2.5       # step size = pgd_step_rel * eps / steps (Madry et al.)
    cw_n: int = 100
    cw_steps: int = 100
    cw_search: int = 6              # binary search steps over c
    cw_lr: float = 0.1
    cw_const: float = 0.5
    zoo_n: int = 20
    zoo_steps: int = 40
    zoo_search: int = 1
    zoo_const: float = 10.0         # large c and lr: at small query budgets ART's ZOO otherwise
    zoo_lr: float = 1.0             # never leaves the starting point
    zoo_parallel: int = 128         # coordinates estimated per iteration
    sub_seeds: int = 150
    sub_rounds: int = 6
    sub_epochs: int = 10
    sub_lambda: float = 0.1

    # Fields that must be >= 1 (a count of 0 would silently run on one image or do nothing).
    POSITIVE = ("n", "batch_size", "apgd_steps", "apgd_restarts", "apgd_t_targets", "apgd_t_restarts",
                "square_queries", "twin_steps", "twin_restarts", "twin_targets", "anneal_steps", "anneal_restarts",
                "transfer_steps",
                "sweep_n", "sweep_steps", "pgd_steps", "pgd_restarts", "cw_n", "cw_steps", "cw_search",
                "zoo_n", "zoo_steps", "zoo_search", "zoo_parallel", "sub_seeds", "sub_rounds", "sub_epochs")

    def validate(self) -> "Budget":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = int if f.type in (int, "int") else float
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)):
                raise AttackError(f"budget {f.name} must be {'an integer' if want is int else 'a number'}, got {v!r}")
            if not math.isfinite(v) or v < 0:
                raise AttackError(f"budget {f.name} must be a finite number >= 0, got {v!r}")
            if f.name in self.POSITIVE and v < 1:
                raise AttackError(f"budget {f.name} must be >= 1, got {v!r} (leave the attack out of "
                                  "--attacks to skip it)")
        if self.apgd_t_targets > 9 or self.twin_targets > 9:
            raise AttackError("budget apgd_t_targets and twin_targets must be <= 9 (the other classes)")
        if not 0 < self.square_p_init <= 1:
            raise AttackError(f"budget square_p_init must be in (0, 1], got {self.square_p_init!r}")
        if not 0 < self.anneal_t_end <= self.anneal_t_start_low <= self.anneal_t_start:
            raise AttackError("budget anneal temperatures must satisfy 0 < anneal_t_end <= anneal_t_start_low <= "
                              f"anneal_t_start, got {self.anneal_t_end!r}, {self.anneal_t_start_low!r} and "
                              f"{self.anneal_t_start!r}")
        if not 0 < self.twin_temp_low <= self.twin_temp_high:
            raise AttackError("budget twin_temp_low must be > 0 and <= twin_temp_high, got "
                              f"{self.twin_temp_low!r} and {self.twin_temp_high!r}")
        return self

    def scaled(self, factor: int) -> "Budget":
        """The same budget with factor x the steps and restarts of the gradient attacks (convergence check)."""
        keys = ("apgd_steps", "apgd_restarts", "apgd_t_restarts", "twin_steps", "twin_restarts", "anneal_steps",
                "anneal_restarts")
        return dataclasses.replace(self, **{k: getattr(self, k) * factor for k in keys})
