"""The attack suite: ART's white-box and score-based attacks plus our substitute transfer attack.

White-box gradients flow through DQAReLU's straight-through backward, so FGSM/PGD/APGD/C&W here are
BPDA attacks (Athalye et al. 2018). ``attack_grad="zero"`` swaps in the quantizer's true derivative
(zero almost everywhere) to show what an evaluation blind to gradient masking would report.
Every attack runs on a prefix of the test set (the substitute's seeds come from its end), with the
budget recorded next to its result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time

import numpy as np
import torch
from torch import nn

from .models import dqa_modules, learned_steps
from .errors import UserError

WHITE_BOX = ("fgsm", "pgd", "apgd", "cw")
GRADIENT_FREE = ("zoo", "square", "substitute")
MINIMAL_L2 = ("cw", "zoo", "cw_art")  # unbounded L2 attacks: success rate and median L2
# Not in the default suite: PGD with the true (zero) gradient, the masking demonstration; and
# ART's own CarliniL2Method, much slower than `cw` (see cw_l2), for cross-checking it.
EXTRA = ("pgd_zero", "cw_art")
ATTACKS = WHITE_BOX + GRADIENT_FREE + EXTRA
DEFAULT_ATTACKS = WHITE_BOX + GRADIENT_FREE
LABELS = {"fgsm": "FGSM", "pgd": "PGD", "apgd": "APGD-CE", "cw": "C&W-L2", "zoo": "ZOO",
          "square": "Square", "substitute": "Substitute", "pgd_zero": "PGD, true grad",
          "cw_art": "C&W-L2 (ART)"}


class AttackError(UserError):
    """Bad attack name or budget."""


@dataclasses.dataclass
class Budget:
    """How hard each attack tries; recorded in every report. ``n`` images (a test-set prefix) for the
    bounded attacks, fewer for the slow ones (C&W, ZOO, Square)."""
    n: int = 500
    batch_size: int = 128
    pgd_steps: int = 40
    pgd_restarts: int = 1
    pgd_step_rel: float = 2.5       # step size = pgd_step_rel * eps / steps (Madry et al.)
    apgd_steps: int = 50
    apgd_restarts: int = 1
    cw_n: int = 500
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
    square_n: int = 500
    square_queries: int = 500
    square_restarts: int = 1
    sub_seeds: int = 150
    sub_rounds: int = 6
    sub_epochs: int = 10
    sub_lambda: float = 0.1
    sweep_n: int = 200              # images for the accuracy-vs-epsilon curves

    def validate(self) -> "Budget":
        for k, v in dataclasses.asdict(self).items():
            if not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and not math.isfinite(v)):
                raise AttackError(f"budget {k} must be a finite number >= 0, got {v!r}")
        if min(self.n, self.batch_size, self.pgd_steps, self.apgd_steps, self.sub_rounds) < 1:
            raise AttackError("budget n, batch_size, pgd_steps, apgd_steps and sub_rounds must be >= 1")
        return self


def default_sweep(eps: float) -> list[float]:
    """Epsilons for the accuracy curves: fractions of the nominal one, up to 4/3 of it."""
    return [round(eps * f, 6) for f in (0.0, 1 / 3, 2 / 3, 1.0, 4 / 3)]


# ------------------------------------------------------------------ true-gradient (masking) mode
class _ZeroBackward(torch.autograd.Function):
    """Forward: the quantizer's output; backward: its true derivative w.r.t. the input, zero."""

    @staticmethod
    def forward(ctx, x, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), None


def _zero_hook(module, inputs, output):
    return _ZeroBackward.apply(inputs[0], output.detach())


@contextlib.contextmanager
def true_gradient(model: nn.Module):
    """Within the block every DQAReLU of ``model`` back-propagates its true derivative (zero)."""
    handles = [m.register_forward_hook(_zero_hook) for _, m in dqa_modules(model)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


class TrueGradient(nn.Module):
    """``model`` whose DQAReLUs back-propagate zero (forward unchanged); ReLU models are unaffected."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with true_gradient(self.model):
            return self.model(x)


# ------------------------------------------------------------------ helpers
def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x, batch_size: int = 500) -> np.ndarray:
    model.eval()
    dev = _device_of(model)
    x = torch.as_tensor(x)
    return torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


def art_classifier(model: nn.Module, input_shape, num_classes: int):
    """ART wrapper; pixels in [0, 1] (normalisation is inside the model)."""
    from art.estimators.classification import PyTorchClassifier

    dev = _device_of(model)
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=num_classes, clip_values=(0.0, 1.0),
                             device_type="gpu" if dev.type == "cuda" else "cpu")


def _bounded(name: str, clf, eps: float, b: Budget):
    from art.attacks.evasion import (AutoProjectedGradientDescent, FastGradientMethod,
                                     ProjectedGradientDescent, SquareAttack)

    if name == "fgsm":
        return FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=b.batch_size)
    if name in ("pgd", "pgd_zero"):
        return ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=b.pgd_step_rel * eps / b.pgd_steps,
                                        max_iter=b.pgd_steps, num_random_init=b.pgd_restarts,
                                        batch_size=b.batch_size, verbose=False)
    if name == "apgd":
        return AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=b.apgd_steps,
                                            nb_random_init=b.apgd_restarts, batch_size=b.batch_size,
                                            loss_type="cross_entropy", verbose=False)
    if name == "square":
        return SquareAttack(clf, norm=np.inf, eps=eps, max_iter=b.square_queries, nb_restarts=b.square_restarts,
                            batch_size=b.batch_size, verbose=False)
    raise AttackError(f"unknown attack {name!r}")


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, search: int, lr: float,
          const: float, confidence: float = 0.0, batch_size: int = 128) -> np.ndarray:
    """Carlini & Wagner's L2 attack (2017): Adam in tanh space on ||d||^2 + c * max(z_y - max z_j, -k),
    binary search over c; returns the smallest successful adversarial per image (x where none).

    Batched PyTorch rather than ART's CarliniL2Method, whose per-iteration line search took ~25 s per
    MNIST image at 30 iterations on a 2-core CPU and so could not run at a useful budget here."""
    dev = _device_of(model)
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        n = len(xb)
        lo, hi = torch.zeros(n, device=dev), torch.full((n,), 1e10, device=dev)
        c = torch.full((n,), float(const), device=dev)
        best_l2 = torch.full((n,), float("inf"), device=dev)
        best = xb.clone()
        w0 = torch.atanh((2 * xb - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        onehot = torch.nn.functional.one_hot(yb, model(xb[:1]).shape[1]).bool()
        for _ in range(max(1, search)):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            for _ in range(steps):
                adv = (torch.tanh(w) + 1) / 2
                logits = model(adv)
                real = logits[onehot]
                other = logits.masked_fill(onehot, float("-inf")).amax(1)
                l2 = (adv - xb).flatten(1).pow(2).sum(1)
                loss = (l2 + c * (real - other + confidence).clamp_min(0)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ok = logits.argmax(1) != yb
                    better = ok & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best[better] = adv[better].detach()
                    found |= ok
            # Binary search: shrink c where the attack succeeded, grow it (x10 until bracketed) elsewhere.
            hi = torch.where(found, torch.minimum(hi, c), hi)
            lo = torch.where(found, lo, torch.maximum(lo, c))
            c = torch.where(hi < 1e9, (lo + hi) / 2, c * 10)
        out.append(best.cpu())
    return torch.cat(out).numpy()


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
    keys = {"fgsm": [], "pgd": ["pgd_steps", "pgd_restarts", "pgd_step_rel"], "pgd_zero": ["pgd_steps", "pgd_restarts", "pgd_step_rel"],
            "apgd": ["apgd_steps", "apgd_restarts"], "cw": ["cw_n", "cw_steps", "cw_search", "cw_lr", "cw_const"],
            "cw_art": ["cw_n", "cw_steps", "cw_search", "cw_lr", "cw_const"],
            "zoo": ["zoo_n", "zoo_steps", "zoo_search", "zoo_const", "zoo_lr", "zoo_parallel"],
            "square": ["square_n", "square_queries", "square_restarts"],
            "substitute": ["sub_seeds", "sub_rounds", "sub_epochs", "sub_lambda"]}[name]
    return {k: getattr(b, k) for k in keys}


# ------------------------------------------------------------------ the API
def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, budget: Budget,
               *, attack_grad: str = "bpda", x_seed: torch.Tensor | None = None, seed: int = 0,
               num_classes: int = 10) -> dict:
    """One attack on (x, y); returns per-example survival (``correct``) and summary numbers.

    An example counts as robust only if the model is right on it both clean and under attack."""
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if attack_grad not in ("bpda", "zero"):
        raise AttackError(f"attack_grad must be 'bpda' or 'zero', got {attack_grad!r}")
    model.eval()
    t0 = time.time()
    _seed(seed)
    xn, yn = x.numpy(), y.numpy()
    clean_ok = predict(model, x) == yn
    zero = attack_grad == "zero" or name == "pgd_zero"
    target = TrueGradient(model) if (zero and name in WHITE_BOX + EXTRA) else model
    out = {"attack": name, "n": len(x), "eps": eps, "budget": budget_of(name, budget),
           "grad": "zero" if (zero and name in WHITE_BOX + EXTRA) else ("bpda" if name in WHITE_BOX + EXTRA else "none")}
    if name == "substitute":
        from .substitute import train_substitute

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


def _sizes(name: str, b: Budget, n_avail: int) -> int:
    n = {"cw": b.cw_n, "cw_art": b.cw_n, "zoo": b.zoo_n, "square": b.square_n}.get(name, b.n)
    return max(1, min(n, b.n, n_avail))


def worst_case(clean_correct: np.ndarray, per_attack: dict) -> dict:
    """Per-example worst case: an image counts only if it survives every attack that saw it.

    Attacks run on prefixes of one ordering, so two summaries are exact: over all attacks on the
    shortest prefix, and over the attacks that saw all ``n`` images on the full prefix."""
    n = len(clean_correct)
    m = min([len(r["correct"]) for r in per_attack.values()] or [n])
    surv_all = clean_correct[:m].copy()
    full = clean_correct.copy()
    full_names = []
    for name, r in per_attack.items():
        c = np.asarray(r["correct"], bool)
        surv_all &= c[:m]
        if len(c) == n:
            full &= c
            full_names.append(name)
    return {"all": {"acc": float(surv_all.mean()) if m else None, "n": m, "attacks": list(per_attack)},
            "full": {"acc": float(full.mean()), "n": n, "attacks": full_names}}


def evaluate(model: nn.Module, dataset, attacks=DEFAULT_ATTACKS, *, eps: float | None = None,
             budget: Budget | None = None, attack_grad: str = "bpda", sweep: bool = True,
             sweep_eps=None, seed: int = 0, log=print) -> dict:
    """Attack a classifier (logits out, pixels in [0, 1]) and return a JSON-ready result.

    ``dataset`` is a ``data.Dataset`` or an ``(x_test, y_test)`` pair. Attacks use the first
    ``budget.n`` images (fewer for C&W and ZOO); the substitute's seed images come from the end of
    the test set, disjoint from them. ``eps`` defaults to 0.3 for 1-channel inputs and 8/255 else."""
    budget = (budget or Budget()).validate()
    attacks = list(attacks)
    for a in attacks:
        if a not in ATTACKS:
            raise AttackError(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
    if isinstance(dataset, tuple):
        x_all, y_all = (torch.as_tensor(t) for t in dataset)
    else:
        x_all, y_all = dataset.x_test, dataset.y_test
    x_all, y_all = x_all.float().cpu(), y_all.long().cpu()
    if x_all.min() < 0 or x_all.max() > 1:
        raise AttackError("inputs must be pixels in [0, 1] (normalise inside the model)")
    num_classes = int(getattr(dataset, "num_classes", 10) if not isinstance(dataset, tuple) else max(10, int(y_all.max()) + 1))
    eps = eps if eps is not None else (0.3 if x_all.shape[1] == 1 else 8 / 255)
    n_seed = budget.sub_seeds if "substitute" in attacks else 0
    n_avail = len(x_all) - n_seed
    if n_avail < 1:
        raise AttackError(f"the test set ({len(x_all)} images) is smaller than the substitute's seed set")
    n = min(budget.n, n_avail)
    x, y = x_all[:n], y_all[:n]
    x_seed = x_all[len(x_all) - n_seed:] if n_seed else None
    model.eval()
    t0 = time.time()
    clean_ok = predict(model, x) == y.numpy()
    result = {"eps": eps, "attack_grad": attack_grad, "n": n, "seed": seed,
              "clean": {"acc": float(clean_ok.mean()), "n": n}, "budget": dataclasses.asdict(budget),
              "attacks": {}}
    has_dqa = bool(dqa_modules(model))
    for name in attacks:
        k = _sizes(name, budget, n)
        if name == "pgd_zero" and not has_dqa and "pgd" in result["attacks"] and attack_grad == "bpda":
            # Without quantizers the true gradient is the BPDA one: same attack, same seed, same result.
            r = dict(result["attacks"]["pgd"], attack=name, grad="zero", seconds=0.0)
        else:
            r = run_attack(name, model, x[:k], y[:k], eps, budget, attack_grad=attack_grad, x_seed=x_seed,
                           seed=seed, num_classes=num_classes)
        result["attacks"][name] = r
        extra = (f" success {r['success_rate']:.3f} median L2 {r['median_l2']}" if name in MINIMAL_L2 else "")
        log(f"  {LABELS[name]:<15} acc {r['acc']:.3f} on {k} images{extra} ({r['seconds']:.1f}s)")
    result["worst_case"] = worst_case(clean_ok, result["attacks"])
    if sweep:
        m = min(budget.sweep_n, n)
        result["sweep"] = eps_sweep(model, x_all[:m], y_all[:m], sweep_eps or default_sweep(eps), budget,
                                    attack_grad=attack_grad, seed=seed, num_classes=num_classes,
                                    known={a: r for a, r in result["attacks"].items() if r["eps"] == eps})
    result["steps"] = learned_steps(model)
    result["seconds"] = time.time() - t0
    return result


def eps_sweep(model, x, y, eps_list, budget: Budget, *, attack_grad="bpda", seed=0, num_classes=10,
              known=None) -> dict:
    """Accuracy under FGSM and PGD at each epsilon (for the curves and the monotonicity check).

    ``known`` holds results already computed at one epsilon on a prefix at least as long as x: the
    same attack on the same images, so its prefix is reused instead of run again."""
    out = {"eps": [float(e) for e in eps_list], "n": len(x)}
    known = known or {}
    for name in ("fgsm", "pgd"):
        accs = []
        for e in eps_list:
            r = known.get(name)
            if e == 0:
                accs.append(float((predict(model, x) == y.numpy()).mean()))
            elif r is not None and r["eps"] == e and len(r["correct"]) >= len(x):
                accs.append(float(np.mean(r["correct"][:len(x)])))
            else:
                accs.append(run_attack(name, model, x, y, float(e), budget, attack_grad=attack_grad,
                                       seed=seed, num_classes=num_classes)["acc"])
        out[name] = accs
    return out
