"""The attacks, one family per file, all with one signature (spec.py: ``runner(Target) -> Outcome``),
and the catalog that names them:

  catalog.py      one AttackSpec per attack: name, label, family, stage, budget settings, runner
  budget.py       Budget: the values of every attack's settings and the evaluation's own
  whitebox.py     APGD (CE, DLR, targeted DLR) and C&W-L2, batched PyTorch
  adaptive.py     quantization-aware: differentiable twins, BPDA, the true-gradient demonstration
  scorebased.py   Square (L-inf)
  transfer.py     the other models' adversarial points
  substitute.py   Papernot et al.'s label-only substitute
  paper.py        the paper's attacks (FGSM, PGD, C&W, ZOO, substitute) and the ART cross-checks
  common.py       prediction, the L-inf projection, losses, per-example random streams
  shard.py        which images and attacks a rank takes under torchrun

The runner that puts them together is ../evaluate.py; the judge of what they found, ../checks.py.
"""
from .adaptive import TrueGradient, Variant, quantizers_as, true_gradient
from .budget import Budget
from .catalog import attack_names, default_attacks
from .spec import AttackSpec, Knob, Outcome, Target

__all__ = ["AttackSpec", "Budget", "Knob", "Outcome", "Target", "TrueGradient", "Variant", "attack_names",
           "default_attacks", "quantizers_as", "true_gradient"]
