"""The paper's attacks (Rakin et al. 2018), each run on its own test-set prefix: FGSM and PGD (ART),
C&W-L2 (batched, whitebox.cw_l2), ZOO (ART), the substitute transfer attack, and PGD with the
quantizer's true (zero) derivative, the masking demonstration. The cross-checks of the project's own
attacks against ART's run the same way (``apgd_art``, ``square_art``, ``cw_art``).

White-box gradients flow through DQAReLU's straight-through backward (BPDA); ``attack_grad="zero"``
swaps in the true derivative for every white-box attack.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from ..errors import AttackError
from .adaptive import TrueGradient
from .common import device_of, predict, project_linf
from .spec import Outcome, Target
from .substitute import train_substitute
from .whitebox import cw_l2


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


def _bounded(name: str, clf, eps: float, b):
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


def _minimal(name: str, clf, b):
    from art.attacks.evasion import CarliniL2Method, ZooAttack

    if name == "cw_art":
        return CarliniL2Method(clf, confidence=0.0, learning_rate=b.cw_lr, binary_search_steps=b.cw_search,
                               max_iter=b.cw_steps, initial_const=b.cw_const, batch_size=b.batch_size,
                               verbose=False)
    return ZooAttack(clf, confidence=0.0, learning_rate=b.zoo_lr, max_iter=b.zoo_steps,
                     binary_search_steps=b.zoo_search, initial_const=b.zoo_const, abort_early=True,
                     use_resize=False, use_importance=False, nb_parallel=b.zoo_parallel, batch_size=1,
                     variable_h=0.01, verbose=False)


def _gradient_target(t: Target, zero: bool = False) -> nn.Module:
    """The model whose gradients a white-box attack follows: straight-through, or with the
    quantizers' true (zero) derivative (``--attack-grad zero``, or always for pgd_zero)."""
    return TrueGradient(t.model) if (zero or t.attack_grad == "zero") else t.model


def _wrong(model, adv, y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(predict(model, adv) != y)


def _run_bounded(t: Target, name: str, model: nn.Module) -> Outcome:
    _seed(t.seed)
    xn, yn = t.x.cpu().numpy(), t.y.cpu().numpy()
    clf = art_classifier(model, t.x.shape[1:], t.num_classes)
    adv = _bounded(name, clf, t.eps, t.budget).generate(xn, y=yn)
    if np.abs(adv - xn).max() > t.eps + 1e-5:
        raise AssertionError(f"{name} left the eps ball")
    return Outcome(_wrong(t.model, adv, yn), torch.from_numpy(adv))


def _run_unbounded(t: Target, adv: np.ndarray) -> Outcome:
    """A minimal-L2 attack's points: success rate and median L2 among the clean-correct images; projected
    onto the L-inf ball they are eps-bounded attacks too, and that is what enters the worst case."""
    xn, yn = t.x.cpu().numpy(), t.y.cpu().numpy()
    adv = adv.astype(np.float32)
    clean_ok = predict(t.model, t.x) == yn
    success = clean_ok & (predict(t.model, adv) != yn)
    l2 = np.sqrt(((adv - xn).reshape(len(xn), -1) ** 2).sum(1))
    proj = project_linf(torch.from_numpy(adv), t.x.cpu().float(), t.eps)
    return Outcome(_wrong(t.model, proj, yn), proj,
                   info={"success_rate": float(success.sum() / max(1, clean_ok.sum())),
                         "median_l2": float(np.median(l2[success])) if success.any() else None})


def run_fgsm(t: Target) -> Outcome:
    return _run_bounded(t, "fgsm", _gradient_target(t))


def run_pgd(t: Target) -> Outcome:
    return _run_bounded(t, "pgd", _gradient_target(t))


def run_pgd_zero(t: Target) -> Outcome:
    return _run_bounded(t, "pgd_zero", _gradient_target(t, zero=True))


def run_apgd_art(t: Target) -> Outcome:
    return _run_bounded(t, "apgd_art", _gradient_target(t))


def run_square_art(t: Target) -> Outcome:
    return _run_bounded(t, "square_art", t.model)


def run_cw(t: Target) -> Outcome:
    _seed(t.seed)
    b = t.budget
    adv = cw_l2(_gradient_target(t), t.x.cpu(), t.y.cpu(), steps=b.cw_steps, search=b.cw_search, lr=b.cw_lr,
                const=b.cw_const, batch_size=b.batch_size)
    return _run_unbounded(t, adv)


def _run_art_minimal(t: Target, name: str, model: nn.Module) -> Outcome:
    _seed(t.seed)
    xn, yn = t.x.cpu().numpy(), t.y.cpu().numpy()
    adv = _minimal(name, art_classifier(model, t.x.shape[1:], t.num_classes), t.budget).generate(xn, y=yn)
    return _run_unbounded(t, adv)


def run_cw_art(t: Target) -> Outcome:
    return _run_art_minimal(t, "cw_art", _gradient_target(t))


def run_zoo(t: Target) -> Outcome:
    return _run_art_minimal(t, "zoo", t.model)


def run_substitute(t: Target) -> Outcome:
    """Papernot et al.'s label-only substitute (substitute.py), FGSM and PGD crafted on it; an image
    counts as broken if either transfers."""
    _seed(t.seed)
    if t.x_seed is None:
        raise AttackError("the substitute attack needs held-out seed images (x_seed)")
    b = t.budget
    x = t.x.cpu()
    xn, yn = x.numpy(), t.y.cpu().numpy()
    clean_ok = predict(t.model, x) == yn
    sub, queries = train_substitute(t.model, t.x_seed, rounds=b.sub_rounds, epochs=b.sub_epochs, lam=b.sub_lambda,
                                    seed=t.seed, num_classes=t.num_classes)
    sub_clf = art_classifier(sub, x.shape[1:], t.num_classes)
    kept = {}
    for kind in ("fgsm", "pgd"):
        _seed(t.seed)
        adv = _bounded(kind, sub_clf, t.eps, b).generate(xn, y=yn)
        kept[kind] = clean_ok & (predict(t.model, adv) == yn)
    broken = ~(kept["fgsm"] & kept["pgd"])
    return Outcome(torch.from_numpy(broken), info={
        "queries": queries, "acc_fgsm": float(kept["fgsm"].mean()), "acc_pgd": float(kept["pgd"].mean()),
        "agreement": float((predict(sub, x) == predict(t.model, x)).mean())})
