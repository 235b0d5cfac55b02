"""Devices the tests run on, and the skip for a device the extension has no kernels for."""

import pytest
import torch

from dqa_ext import _backend

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


def needs_extension(device):
    if not _backend.BUILT_FOR.get(device, False):
        pytest.skip(f"the extension has no {device} kernels in this build")
