import os

import pytest
import torch

import dqa_ext
from dqa_ext import _backend

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def pytest_report_header(config):
    return f"dqa_ext backend: {dqa_ext.backend_info()}"


@pytest.fixture(scope="session", autouse=True)
def _extension_is_built():
    # The parity tests are the point of this suite: without the compiled CPU kernels they would
    # silently test the reference against itself. DQA_EXT_ALLOW_REFERENCE_ONLY=1 opts out.
    if not _backend.BUILT_FOR["cpu"] and os.environ.get("DQA_EXT_ALLOW_REFERENCE_ONLY") != "1":
        pytest.exit(f"dqa_ext's CPU extension is not built: {_backend.LOAD_ERROR}", returncode=3)


@pytest.fixture
def backend():
    """Restores the backend a test forces with dqa_ext.set_backend."""
    before = _backend.get_backend()
    yield dqa_ext.set_backend
    dqa_ext.set_backend(before)


def needs_extension(device):
    if not _backend.BUILT_FOR.get(device, False):
        pytest.skip(f"the extension has no {device} kernels in this build")
