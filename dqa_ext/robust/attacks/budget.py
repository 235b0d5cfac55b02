"""How hard each attack tries. Each attack declares its settings in the catalog (catalog.py); the
evaluation's own settings are below. Every value is recorded in the report next to the numbers it
made, and each one can be set from the command line (``--budget KEY=VALUE``)."""
from __future__ import annotations

import math

from ..errors import AttackError
from . import catalog
from .spec import Knob

# The evaluation's own settings, around the attacks' (attacks/catalog.py).
FIRST = (Knob("n", 500, "images for the adaptive suite and the bounded paper attacks"),
         Knob("batch_size", 500, "images per forward pass"))
LAST = (Knob("sanity_eps", 1.0, "epsilon of the large-epsilon APGD-CE that must reach 0%"),
        Knob("sweep_n", 200, "images for the accuracy-against-epsilon curves"),
        Knob("sweep_steps", 50, "APGD-CE steps per epsilon of the curves"))


def knobs() -> dict[str, Knob]:
    """Every budget setting by name: the evaluation's, then each attack's in catalog order."""
    return {k.name: k for k in FIRST + tuple(k for s in catalog.specs() for k in s.knobs) + LAST}


class Budget:
    """Budgets of the adaptive suite (AutoAttack strength by default), of the paper's attacks and of
    the evaluation's checks: ``Budget(n=200, apgd_steps=50)``; ``knobs()`` lists the settings.

    The adaptive suite runs on the first ``n`` test images, each attack only on the images that
    every earlier attack of the suite left robust. The paper's attacks run on their own prefixes."""

    def __init__(self, **values):
        known = knobs()
        unknown = [k for k in values if k not in known]
        if unknown:
            raise AttackError(f"unknown budget setting {unknown[0]!r}; choose from {', '.join(known)}")
        self.__dict__.update({name: values.get(name, k.default) for name, k in known.items()})

    def __repr__(self) -> str:
        changed = [f"{k}={v!r}" for k, v in self.as_dict().items() if v != knobs()[k].default]
        return f"Budget({', '.join(changed)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Budget) and self.as_dict() == other.as_dict()

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def replace(self, **changes) -> "Budget":
        return Budget(**{**self.as_dict(), **changes})

    def of(self, names) -> dict:
        """The values of ``names`` (an attack's budget keys), for the report."""
        return {k: getattr(self, k) for k in names}

    def validate(self) -> "Budget":
        for name, k in knobs().items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (k.kind is int and not isinstance(v, int)):
                raise AttackError(f"budget {name} must be {'an integer' if k.kind is int else 'a number'}, got {v!r}")
            if not math.isfinite(v) or v < 0:
                raise AttackError(f"budget {name} must be a finite number >= 0, got {v!r}")
            if k.kind is int and v < 1:
                raise AttackError(f"budget {name} must be >= 1, got {v!r} (leave the attack out of --attacks to "
                                  "skip it)")
            if k.maximum is not None and v > k.maximum:
                raise AttackError(f"budget {name} must be <= {k.maximum}, got {v!r}")
        for s in catalog.specs():
            if s.check is not None:
                s.check(self)
        return self

    def scaled(self, factor: int) -> "Budget":
        """The same budget with ``factor`` x the steps and restarts (the convergence rerun)."""
        return self.replace(**{name: getattr(self, name) * factor for name, k in knobs().items() if k.scales})


def parse_budget_items(items) -> dict:
    """``--budget KEY=VALUE`` pairs as numbers of the knobs' types (values are checked by validate)."""
    known = knobs()
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise AttackError(f"--budget {item!r}: use KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            out[key] = known[key].kind(value)
        except ValueError:
            raise AttackError(f"--budget {item!r}: {value!r} is not {'an integer' if known[key].kind is int else 'a number'}") from None
    return out
