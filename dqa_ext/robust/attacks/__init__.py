"""Attacks by family, and the suite that runs them and computes the per-example worst case:

  whitebox.py     APGD (CE, DLR, targeted DLR) and C&W-L2, batched PyTorch
  adaptive.py     quantization-aware: differentiable twins, BPDA, the true-gradient demonstration
  scorebased.py   Square (L-inf)
  transfer.py     the other models' adversarial points
  paper.py        the paper's attacks (FGSM, PGD, C&W, ZOO, substitute) and the ART cross-checks
  suite.py        the cascade, the worst case, the convergence and masking checks; evaluate()
"""
from .adaptive import TrueGradient, Variant, quantizers_as, true_gradient
from .budget import AttackError, Budget
from .paper import run_attack
from .suite import (ATTACKS, CASCADE, DEFAULT_ATTACKS, DESCRIPTIONS, LABELS, evaluate, evaluate_model,
                    evaluate_models, worst_case)

__all__ = ["ATTACKS", "AttackError", "Budget", "CASCADE", "DEFAULT_ATTACKS", "DESCRIPTIONS", "LABELS",
           "TrueGradient", "Variant", "evaluate", "evaluate_model", "evaluate_models", "quantizers_as",
           "run_attack", "true_gradient", "worst_case"]
