"""Robustness toolkit of dqa_ext: data, models, (adversarial) training, attacks and reports. It uses
the core (dqa_ext.DQAReLU, dqa_ext.convert); the core never imports it.

ART and matplotlib are imported only inside the functions that need them.
"""
from .attacks import AttackSpec, Budget, Knob, TrueGradient, attack_names, default_attacks, true_gradient
from .checkpoint import load_model
from .checks import flags
from .config import TrainConfig
from .data import Dataset, load_dataset
from .errors import UserError
from .evaluate import evaluate, evaluate_models, run_attack
from .models import build_model, learned_steps, parse_activation
from .presets import PRESETS
from .report import write_report
from .reproduce import reproduce
from .train import train

__all__ = ["AttackSpec", "Budget", "Dataset", "Knob", "PRESETS", "TrainConfig", "TrueGradient", "UserError",
           "attack_names", "build_model", "default_attacks", "evaluate", "evaluate_models", "flags", "learned_steps",
           "load_dataset", "load_model", "parse_activation", "reproduce", "run_attack", "train", "true_gradient",
           "write_report"]
