"""dqa_ext: fused quantized activations (DQA, Rakin et al. 2018) for PyTorch."""

from . import functional, reference
from ._backend import backend_info, set_backend
from .convert import convert
from .nn import DQAReLU

__all__ = ["DQAReLU", "backend_info", "convert", "functional", "reference", "set_backend"]
