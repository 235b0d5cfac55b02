"""The device a command runs on: auto, cpu, cuda or cuda:N, checked against this machine."""
from __future__ import annotations

import re

import torch

from .errors import TrainError


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when there is one), cpu, cuda or cuda:N; a device this machine lacks is refused."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", name) if isinstance(name, str) else None
    if m is None:
        raise TrainError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name!r}: CUDA is not available on this machine (use cpu)")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise TrainError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)
