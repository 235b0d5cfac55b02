"""dqa_ext: fused quantized activations (DQA, Rakin et al. 2018) for PyTorch."""

from . import export, functional, reference  # export: ONNX registrations, made lazily
from ._backend import backend_info, set_backend
from .calibrate import calibrate, freeze_steps
from .convert import ConvertReport, convert
from .nn import DQAReLU

__all__ = ["ConvertReport", "DQAReLU", "backend_info", "calibrate", "convert", "freeze_steps", "functional",
           "reference", "set_backend"]
