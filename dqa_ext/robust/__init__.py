"""Robustness toolkit of dqa_ext: data, models, (adversarial) training, attacks and reports.

ART and matplotlib are imported only inside the functions that need them.
"""
from .attacks import (ATTACKS, DEFAULT_ATTACKS, Budget, TrueGradient, evaluate, evaluate_models, run_attack,
                      true_gradient)
from .data import Dataset, load_dataset
from .errors import UserError
from .models import build_model, learned_steps, parse_activation
from .report import masking_flags, write_report
from .reproduce import PRESETS, reproduce
from .train import TrainConfig, load_model, train

__all__ = ["ATTACKS", "Budget", "DEFAULT_ATTACKS", "Dataset", "PRESETS", "TrainConfig", "TrueGradient", "UserError",
           "build_model", "evaluate", "evaluate_models", "learned_steps", "load_dataset", "load_model",
           "masking_flags", "parse_activation", "reproduce", "run_attack", "train", "true_gradient", "write_report"]
