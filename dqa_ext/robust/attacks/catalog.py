"""Every attack of the evaluation, one AttackSpec each (spec.py): its name, label, family, stage,
budget settings and runner. Every list of attacks, label, description, budget key, CLI help and
report column is read from here, at the time it is needed: adding an attack is one entry below
plus the file that holds its runner.

The cascade runs in the order of this list; the prefix attacks run beside it.
"""
from __future__ import annotations

from ..errors import AttackError
from . import adaptive, anneal, paper, repair, scorebased, transfer, whitebox
from .spec import FAMILIES, STAGES, AttackSpec, Knob

STE, QUANT, BLACK = "straight-through", "quantization-aware", "black-box"

_TWIN_KNOBS = (Knob("twin_steps", 100, "steps of the attacks through a twin or a surrogate backward", scales=True),
               Knob("twin_restarts", 1, "their restarts", scales=True),
               Knob("twin_targets", 9, "their APGD-T target classes", maximum=9))
_TWIN_USES = tuple(k.name for k in _TWIN_KNOBS)
_PGD = ("pgd_steps", "pgd_restarts", "pgd_step_rel")
_CW = ("cw_n", "cw_steps", "cw_search", "cw_lr", "cw_const")


def _twin_cost(b, losses: int = 1) -> float:
    return 1.5 * b.twin_steps * b.twin_restarts * (losses + b.twin_targets)  # the twin, and the model checking it


def _pgd_cost(b) -> float:
    return b.pgd_steps * b.pgd_restarts


def _check_twin_temperatures(b) -> None:
    if not 0 < b.twin_temp_low <= b.twin_temp_high:
        raise AttackError("budget twin_temp_low must be > 0 and <= twin_temp_high, got "
                          f"{b.twin_temp_low!r} and {b.twin_temp_high!r}")


def _check_anneal_temperatures(b) -> None:
    if not 0 < b.anneal_t_end <= b.anneal_t_start_low <= b.anneal_t_start:
        raise AttackError("budget anneal temperatures must satisfy 0 < anneal_t_end <= anneal_t_start_low <= "
                          f"anneal_t_start, got {b.anneal_t_end!r}, {b.anneal_t_start_low!r} and {b.anneal_t_start!r}")


def _check_near_temperatures(b) -> None:
    if not 0 < b.near_t_end <= b.near_t_start:
        raise AttackError("budget near-miss temperatures must satisfy 0 < near_t_end <= near_t_start, got "
                          f"{b.near_t_end!r} and {b.near_t_start!r}")


def _check_fraction(name: str, value) -> None:
    if not 0 < value <= 1:
        raise AttackError(f"budget {name} must be in (0, 1], got {value!r}")


CATALOG: tuple[AttackSpec, ...] = (
    # ---------------------------------------------------------------- the adaptive cascade
    AttackSpec("apgd_ce", "APGD-CE", STE, "cascade", whitebox.run_apgd_ce,
               "APGD on the cross-entropy, straight-through gradients",
               knobs=(Knob("apgd_steps", 100, "APGD steps (also the large-epsilon sanity check's)", scales=True),
                      Knob("apgd_restarts", 5, "APGD-CE restarts", scales=True)),
               cost=lambda b: b.apgd_steps * b.apgd_restarts),
    AttackSpec("apgd_t", "APGD-T", STE, "cascade", whitebox.run_apgd_t,
               "APGD on the targeted DLR loss, top-k other classes, straight-through gradients",
               uses=("apgd_steps",),
               knobs=(Knob("apgd_t_targets", 9, "APGD-T: the top-k other classes, one run each", maximum=9),
                      Knob("apgd_t_restarts", 1, "APGD-T restarts per target", scales=True)),
               cost=lambda b: b.apgd_steps * b.apgd_t_targets * b.apgd_t_restarts),
    AttackSpec("twin_clip", "Twin (clip)", QUANT, "cascade", adaptive.run_twin_clip,
               "APGD-CE + APGD-T on a twin whose quantizers are clamp(x, 0, qmax*s), checked on the model",
               knobs=_TWIN_KNOBS, needs_quantizers=True, cost=_twin_cost),
    AttackSpec("twin_sig_low", "Twin (sigmoid, low T)", QUANT, "cascade", adaptive.run_twin_sig_low,
               "the same on a sigmoid-staircase twin at the low temperature", uses=_TWIN_USES,
               knobs=(Knob("twin_temp_low", 0.1, "the low sigmoid-staircase temperature, in units of the step"),),
               needs_quantizers=True, cost=_twin_cost),
    AttackSpec("twin_sig_high", "Twin (sigmoid, high T)", QUANT, "cascade", adaptive.run_twin_sig_high,
               "the same on a sigmoid-staircase twin at the high temperature", uses=_TWIN_USES,
               knobs=(Knob("twin_temp_high", 0.2, "the high sigmoid-staircase temperature"),),
               needs_quantizers=True, check=_check_twin_temperatures, cost=_twin_cost),
    AttackSpec("bpda_sig", "BPDA (sigmoid)", QUANT, "cascade", adaptive.run_bpda_sig,
               "exact forward, sigmoid-staircase derivative in the backward", uses=_TWIN_USES + ("twin_temp_high",),
               needs_quantizers=True, cost=_twin_cost),
    # Non-saturating backwards: the derivatives above vanish on dead and saturated units; these do not.
    AttackSpec("bpda_identity", "BPDA (identity)", QUANT, "cascade", adaptive.run_bpda_identity,
               "exact forward, identity derivative through every quantizer (Athalye et al.'s BPDA: dead and "
               "saturated units pass gradients too); APGD on CE and margin, then APGD-T", uses=_TWIN_USES,
               needs_quantizers=True, cost=lambda b: _twin_cost(b, losses=2)),
    AttackSpec("twin_leaky_clip", "Twin (leaky clip)", QUANT, "cascade", adaptive.run_twin_leaky_clip,
               "the same on a twin whose quantizers are the clip with a slope outside [0, qmax*s], checked on the "
               "model", uses=_TWIN_USES,
               knobs=(Knob("twin_leak", 0.1, "the slope the leaky surrogates keep where the clip and the staircase "
                                             "are flat"),),
               needs_quantizers=True, cost=lambda b: _twin_cost(b, losses=2)),
    AttackSpec("bpda_leaky_sig", "BPDA (leaky staircase)", QUANT, "cascade", adaptive.run_bpda_leaky_sig,
               "exact forward, the derivative of the sigmoid staircase (high T) plus the leak in the backward",
               uses=_TWIN_USES + ("twin_temp_high", "twin_leak"), needs_quantizers=True,
               cost=lambda b: _twin_cost(b, losses=2)),
    AttackSpec("twin_anneal", "Twin (annealed T)", QUANT, "cascade", anneal.run_twin_anneal,
               "PGD on the sigmoid-staircase twin with its temperature annealed towards the quantizer, many starts "
               "per image side by side, checked on the model: random starts cycling the CE, DLR and margin losses "
               "and a smooth and a sharp temperature, and beyond the first 40 also targeted losses, starts at the "
               "image and at vertices and other step sizes; it counts the starts that broke each image",
               knobs=(Knob("anneal_steps", 200, "PGD steps on the annealed twin (not doubled in the rerun: its "
                                                "starts are)"),
                      Knob("anneal_restarts", 40, "its starts per image (the rerun's second 40 vary the loss, start "
                                                   "point and step size further)", scales=True),
                      Knob("anneal_t_start", 1.0, "the temperature the smooth starts start from"),
                      Knob("anneal_t_start_low", 0.3, "the temperature the sharp starts start from (closer to the "
                           "quantizer: the two find different rare points)"),
                      Knob("anneal_t_end", 0.03, "the temperature every start ends at")),
               needs_quantizers=True, check=_check_anneal_temperatures,
               cost=lambda b: 1.5 * b.anneal_steps * b.anneal_restarts),
    AttackSpec("square", "Square", BLACK, "cascade", scorebased.run_square, "Square (score-based, no gradients)",
               knobs=(Knob("square_queries", 5000, "Square's queries"),
                      Knob("square_p_init", 0.8, "Square's initial fraction of the image a square covers")),
               check=lambda b: _check_fraction("square_p_init", b.square_p_init),
               cost=lambda b: b.square_queries / 3),
    AttackSpec("repair", "Repair (near misses)", BLACK, "cascade", repair.run_repair,
               "Square's search on the real model, ties accepted, from the point where the attacks so far came "
               "closest to breaking each image (its smallest real margin), after a local pass (small windows, a "
               "fifth of the queries) from the gradient attacks' closest point; where it ends is the near miss "
               "the near-miss restarts below start from",
               knobs=(Knob("repair_queries", 5000, "queries of the near-miss repair per image (fewer left the "
                                                   "ReLU model's rare points to an independent audit)"),
                      Knob("repair_p_init", 0.3, "its initial fraction of the image a window covers (the local "
                                                 "pass: 0.05)")),
               check=lambda b: _check_fraction("repair_p_init", b.repair_p_init),
               cost=lambda b: 1.2 * b.repair_queries / 3),
    AttackSpec("twin_anneal_near", "Twin (annealed, near misses)", QUANT, "cascade", anneal.run_twin_anneal_near,
               "the annealed twin again from near the point where the attacks so far came closest to breaking each "
               "image (its smallest real margin): sharp temperatures, small cosine-decaying steps with momentum, "
               "the CE, DLR, margin and targeted margin losses in turn; it counts the starts that broke each image",
               knobs=(Knob("near_steps", 400, "PGD steps of each near-miss start through the twin (long, so that the "
                                              "temperature falls slowly: scripts/near_restart_budget.py measures "
                                              "what longer starts break against more starts)"),
                      Knob("near_restarts", 16, "near-miss starts per image", scales=True),
                      Knob("near_t_start", 0.3, "the temperature near-miss starts start from (every second one "
                                                "from a third of it)"),
                      Knob("near_t_end", 0.01, "the temperature they end at")),
               needs_quantizers=True, check=_check_near_temperatures,
               cost=lambda b: 1.5 * b.near_steps * b.near_restarts),
    AttackSpec("pgd_near", "PGD (near misses)", STE, "cascade", anneal.run_pgd_near,
               "the same starts from near each image's near miss with the model's own gradients (straight-through "
               "ones through quantizers): the local search that fresh random restarts miss",
               knobs=(Knob("near_pgd_steps", 100, "PGD steps of each of its starts (no temperature to anneal: "
                                                  "longer starts broke no more on the default PGD-trained ReLU model)"),),
               uses=("near_restarts",), cost=lambda b: 1.5 * b.near_pgd_steps * b.near_restarts),
    AttackSpec("transfer", "Transfer", BLACK, "cascade", transfer.run_transfer,
               "the other models' high-loss points",
               knobs=(Knob("transfer_steps", 100, "APGD-CE steps crafting each model's transfer candidates"),)),
    # ---------------------------------------------------------------- the paper's attacks (own prefixes)
    AttackSpec("fgsm", "FGSM", STE, "prefix", paper.run_fgsm, "FGSM (ART), straight-through gradients",
               uses_gradients=True, iterative_version="pgd"),
    AttackSpec("pgd", "PGD", STE, "prefix", paper.run_pgd,
               "PGD (ART) with straight-through gradients, as the paper evaluated",
               knobs=(Knob("pgd_steps", 40, "PGD steps"), Knob("pgd_restarts", 1, "PGD random starts"),
                      Knob("pgd_step_rel", 2.5, "PGD step size, in units of eps / steps (Madry et al.)")),
               uses_gradients=True, baseline=True, cost=_pgd_cost),
    AttackSpec("cw", "C&W-L2", STE, "prefix", paper.run_cw,
               "Carlini & Wagner's L2 attack (batched PyTorch), unbounded: success rate and median L2, and "
               "projected onto the epsilon ball for the worst case",
               knobs=(Knob("cw_n", 100, "images for C&W-L2"), Knob("cw_steps", 100, "C&W-L2 Adam steps"),
                      Knob("cw_search", 6, "C&W-L2 binary search steps over c"), Knob("cw_lr", 0.1, "C&W-L2 rate"),
                      Knob("cw_const", 0.5, "C&W-L2 initial c")),
               uses_gradients=True, prefix="cw_n", unbounded=True, cost=lambda b: b.cw_steps * b.cw_search),
    AttackSpec("zoo", "ZOO", BLACK, "prefix", paper.run_zoo,
               "ZOO (ART): gradients by finite differences, which are zero on a piecewise-constant network, so "
               "its 0% on quantized models says nothing about robustness",
               knobs=(Knob("zoo_n", 20, "images for ZOO"), Knob("zoo_steps", 40, "ZOO iterations"),
                      Knob("zoo_search", 1, "ZOO binary search steps"),
                      Knob("zoo_const", 10.0, "ZOO initial c (large: at small query budgets ART's ZOO otherwise "
                           "never leaves the starting point)"),
                      Knob("zoo_lr", 1.0, "ZOO rate"), Knob("zoo_parallel", 128, "coordinates estimated per ZOO "
                                                                              "iteration")),
               prefix="zoo_n", unbounded=True, cost=lambda b: b.zoo_steps * b.zoo_parallel),
    AttackSpec("substitute", "Substitute", BLACK, "prefix", paper.run_substitute,
               "label-only transfer from a substitute trained by Jacobian-based augmentation (Papernot et al.), "
               "FGSM and PGD on it",
               uses=_PGD,
               knobs=(Knob("sub_seeds", 150, "the substitute's held-out seed images (from the end of the test set)"),
                      Knob("sub_rounds", 6, "its augmentation rounds"), Knob("sub_epochs", 10, "epochs per round"),
                      Knob("sub_lambda", 0.1, "the augmentation step")),
               cost=lambda b: _pgd_cost(b) + b.sub_epochs * b.sub_seeds * 2 ** b.sub_rounds / (10 * b.n)),
    AttackSpec("pgd_zero", "PGD, true gradient", "true-gradient", "prefix", paper.run_pgd_zero,
               "PGD with the quantizer's true derivative (zero almost everywhere): what an evaluation blind to "
               "gradient masking would report", uses=_PGD, uses_gradients=True, cost=_pgd_cost),
    # ---------------------------------------------------------------- cross-checks against ART (not by default)
    AttackSpec("apgd_art", "APGD-CE (ART)", "cross-check", "prefix", paper.run_apgd_art,
               "ART's AutoProjectedGradientDescent, to compare with apgd_ce", uses=("apgd_steps", "apgd_restarts"),
               default=False, uses_gradients=True, cost=lambda b: b.apgd_steps * b.apgd_restarts),
    AttackSpec("square_art", "Square (ART)", "cross-check", "prefix", paper.run_square_art,
               "ART's SquareAttack, to compare with square", uses=("square_queries", "square_p_init"),
               default=False, cost=lambda b: b.square_queries / 3),
    AttackSpec("cw_art", "C&W-L2 (ART)", "cross-check", "prefix", paper.run_cw_art,
               "ART's CarliniL2Method, to compare with cw", uses=_CW, default=False, uses_gradients=True,
               prefix="cw_n", unbounded=True, cost=lambda b: 3 * b.cw_steps * b.cw_search),
)

# After the cascade, the attack of each family with the highest break rate (broken / attacked) is
# rerun on the survivors with fresh seeds and twice the starts and steps (knobs marked ``scales``):
# the convergence check. family -> (the rerun's name, label, description).
RERUNS = {
    STE: ("rerun_2x", "Rerun x2", "the straight-through attack with the highest break rate, rerun on the "
                                  "survivors with fresh seeds and twice the steps and restarts"),
    QUANT: ("rerun_2x_quant", "Rerun x2 (quant.-aware)", "the quantization-aware attack with the highest break "
                                                         "rate, rerun the same way"),
}


# ---------------------------------------------------------------- reading the catalog
def specs() -> tuple[AttackSpec, ...]:
    """The catalog, checked: one entry per name, known families and stages, each knob declared once
    and every used one declared."""
    declared, names = {}, set()
    for s in CATALOG:
        if s.name in names or s.family not in FAMILIES or s.stage not in STAGES:
            raise RuntimeError(f"attack catalog entry {s.name!r}: duplicate name, or unknown family or stage")
        names.add(s.name)
        for k in s.knobs:
            if declared.setdefault(k.name, s.name) != s.name:
                raise RuntimeError(f"budget setting {k.name!r} is declared by {declared[k.name]} and {s.name}")
    missing = [(s.name, k) for s in CATALOG for k in s.uses + ((s.prefix,) if s.prefix else ()) if k not in declared]
    if missing:
        raise RuntimeError(f"attack {missing[0][0]} uses the undeclared budget setting {missing[0][1]!r}")
    return CATALOG


def spec(name: str) -> AttackSpec:
    for s in specs():
        if s.name == name:
            return s
    raise AttackError(f"unknown attack {name!r}; choose from {', '.join(attack_names())}")


def attack_names(*, stage: str | None = None, family: str | None = None) -> list[str]:
    return [s.name for s in specs() if (stage is None or s.stage == stage) and (family is None or s.family == family)]


def default_attacks() -> list[str]:
    return [s.name for s in specs() if s.default]


def check_attacks(attacks) -> list[str]:
    """``attacks`` as a list of catalog names (None: the default suite); unknown names refused."""
    attacks = default_attacks() if attacks is None else list(attacks)
    known = attack_names()
    bad = [a for a in attacks if a not in known]
    if bad:
        raise AttackError(f"unknown attack {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
    return attacks


def label(name: str) -> str:
    """The report's name for an attack or a rerun."""
    for rerun, rerun_label, _ in RERUNS.values():
        if name == rerun:
            return rerun_label
    return spec(name).label


def description(name: str) -> str:
    for rerun, _, text in RERUNS.values():
        if name == rerun:
            return text
    return spec(name).description


def rerun_names() -> list[str]:
    return [rerun for rerun, _, _ in RERUNS.values()]
