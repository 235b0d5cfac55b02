"""The paper's attacks (Rakin et al. 2018), each run on its own test-set prefix: FGSM and PGD (ART),
C&W-L2 (batched, whitebox.cw_l2), ZOO (ART), the substitute transfer attack, and PGD with the
quantizer's true (zero) derivative, the masking demonstration. Cross-checks of the project's own
attacks against ART live here too (``apgd_art``, ``square_art``, ``cw_art``): not in the default suite.

White-box gradients flow through DQAReLU's straight-through backward (BPDA); ``attack_grad="zero"``
swaps in the true derivative for every white-box attack.
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch
from torch import nn

from .adaptive import TrueGradient
from .budget import AttackError, Budget
from .common import device_of, predict
from .whitebox import cw_l2

WHITE_BOX = ("fgsm", "pgd", "cw")
GRADIENT_FREE = ("zoo", "substitute")
MINIMAL_L2 = ("cw", "zoo", "cw_art")  # unbounded L2 attacks: success rate and median L2
# Not in the default suite: the cross-checks of the project's APGD, Square and C&W against ART's.
CROSS_CHECKS = ("apgd_art", "square_art", "cw_art")
PAPER = WHITE_BOX + GRADIENT_FREE + ("pgd_zero",)
LABELS = {"fgsm": "FGSM", "pgd": "PGD", "cw": "C&W-L2", "zoo": "ZOO", "substitute": "Substitute",
          "pgd_zero": "PGD, true gradient", "apgd_art": "APGD-CE (ART)", "square_art": "Square (ART)",
          "cw_art": "C&W-L2 (ART)"}


# ------------------------------------------------------------------ helpers
def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def art_classifier(model: nn.Module, input_shape, num_classes: int):
    """ART wrapper; pixels in [0, 1] (normalisation is inside the model)."""
    from art.estimators.classification import PyTorchClassifier

    dev = device_of(model)
    if dev.type != "cuda":
        return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                                 nb_classes=num_classes, clip_values=(0.0, 1.0), device_type="cpu")
    # ART takes torch.cuda.current_device() and moves the model there: make that the model's GPU.
    with torch.cuda.device(dev):
        return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                                 nb_classes=num_classes, clip_values=(0.0, 1.0), device_type="gpu")


def _bounded(name: str, clf, eps: float, b: Budget):
    from art.attacks.evasion import (AutoProjectedGradientDescent, FastGradientMethod,
                                     ProjectedGradientDescent, SquareAttack)

    if name == "fgsm":
        return FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=b.batch_size)
    if name in ("pgd", "pgd_zero"):
        return ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=b.pgd_step_rel * eps / b.pgd_steps,
                                        max_iter=b.pgd_steps, num_random_init=b.pgd_restarts,
                                        batch_size=b.batch_size, verbose=False)
    if name == "apgd_art":
        return AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=b.apgd_steps,
                                            nb_random_init=b.apgd_restarts, batch_size=b.batch_size,
                                            loss_type="cross_entropy", verbose=False)
    if name == "square_art":
        return SquareAttack(clf, norm=np.inf, eps=eps, max_iter=b.square_queries, nb_restarts=1,
                            p_init=b.square_p_init, batch_size=b.batch_size, verbose=False)
    raise AttackError(f"unknown attack {name!r}")


def _minimal(name: str, clf, b: Budget):
    from art.attacks.evasion import CarliniL2Method, ZooAttack

    if name == "cw_art":
        return CarliniL2Method(clf, confidence=0.0, learning_rate=b.cw_lr, binary_search_steps=b.cw_search,
                               max_iter=b.cw_steps, initial_const=b.cw_const, batch_size=b.batch_size,
                               verbose=False)
    return ZooAttack(clf, confidence=0.0, learning_rate=b.zoo_lr, max_iter=b.zoo_steps,
                     binary_search_steps=b.zoo_search, initial_const=b.zoo_const, abort_early=True,
                     use_resize=False, use_importance=False, nb_parallel=b.zoo_parallel, batch_size=1,
                     variable_h=0.01, verbose=False)


def budget_of(name: str, b: Budget) -> dict:
    """The settings that name's numbers depend on, for the report."""
    pgd = ["pgd_steps", "pgd_restarts", "pgd_step_rel"]
    cw = ["cw_n", "cw_steps", "cw_search", "cw_lr", "cw_const"]
    keys = {"fgsm": [], "pgd": pgd, "pgd_zero": pgd, "cw": cw, "cw_art": cw,
            "apgd_art": ["apgd_steps", "apgd_restarts"], "square_art": ["square_queries", "square_p_init"],
            "zoo": ["zoo_n", "zoo_steps", "zoo_search", "zoo_const", "zoo_lr", "zoo_parallel"],
            "substitute": ["sub_seeds", "sub_rounds", "sub_epochs", "sub_lambda"]}[name]
    return {k: getattr(b, k) for k in keys}


# ------------------------------------------------------------------ the API
def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, budget: Budget,
               *, attack_grad: str = "bpda", x_seed: torch.Tensor | None = None, seed: int = 0,
               num_classes: int = 10) -> dict:
    """One attack on (x, y); returns per-example survival (``correct``) and summary numbers.

    An example counts as robust only if the model is right on it both clean and under attack."""
    if name not in PAPER + CROSS_CHECKS:
        raise AttackError(f"unknown attack {name!r}; choose from {', '.join(PAPER + CROSS_CHECKS)}")
    if attack_grad not in ("bpda", "zero"):
        raise AttackError(f"attack_grad must be 'bpda' or 'zero', got {attack_grad!r}")
    model.eval()
    t0 = time.time()
    _seed(seed)
    xn, yn = x.numpy(), y.numpy()
    clean_ok = predict(model, x) == yn
    zero = attack_grad == "zero" or name == "pgd_zero"
    gradient = name in WHITE_BOX + ("pgd_zero", "apgd_art", "cw_art")
    target = TrueGradient(model) if (zero and gradient) else model
    out = {"attack": name, "label": LABELS[name], "n": len(x), "eps": eps, "budget": budget_of(name, budget),
           "grad": ("zero" if zero else "ste") if gradient else "none"}
    if name == "substitute":
        from ..substitute import train_substitute

        if x_seed is None:
            raise AttackError("the substitute attack needs held-out seed images (x_seed)")
        sub, queries = train_substitute(model, x_seed, rounds=budget.sub_rounds, epochs=budget.sub_epochs,
                                        lam=budget.sub_lambda, seed=seed, num_classes=num_classes)
        sub_clf = art_classifier(sub, x.shape[1:], num_classes)
        per = {}
        for kind in ("fgsm", "pgd"):
            _seed(seed)
            adv = _bounded(kind, sub_clf, eps, budget).generate(xn, y=yn)
            per[kind] = clean_ok & (predict(model, adv) == yn)
        correct = per["fgsm"] & per["pgd"]
        out.update(queries=queries, acc_fgsm=float(per["fgsm"].mean()), acc_pgd=float(per["pgd"].mean()),
                   agreement=float((predict(sub, x) == predict(model, x)).mean()))
    elif name in MINIMAL_L2:
        if name == "cw":
            adv = cw_l2(target, x, y, steps=budget.cw_steps, search=budget.cw_search, lr=budget.cw_lr,
                        const=budget.cw_const, batch_size=budget.batch_size)
        else:
            adv = _minimal(name, art_classifier(target, x.shape[1:], num_classes), budget).generate(xn, y=yn)
        adv = adv.astype(np.float32)
        pred = predict(model, adv)
        success = clean_ok & (pred != yn)
        l2 = np.sqrt(((adv - xn).reshape(len(xn), -1) ** 2).sum(1))
        # Projected onto the L-inf ball the adversarial point is a valid eps-bounded attack too.
        proj = np.clip(adv, xn - eps, xn + eps)
        correct = clean_ok & (predict(model, proj) == yn)
        out.update(success_rate=float(success.sum() / max(1, clean_ok.sum())),
                   median_l2=float(np.median(l2[success])) if success.any() else None)
    else:
        clf = art_classifier(target, x.shape[1:], num_classes)
        adv = _bounded(name, clf, eps, budget).generate(xn, y=yn)
        assert np.abs(adv - xn).max() <= eps + 1e-5, "attack left the eps ball"
        correct = clean_ok & (predict(model, adv) == yn)
    out.update(acc=float(correct.mean()), correct=correct.astype(int).tolist(), seconds=time.time() - t0)
    return out


