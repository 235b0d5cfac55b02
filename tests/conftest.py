"""Fixtures shared by every test folder (kernels/, module/, build/, robust/); shared helpers live
in tests/support/. Markers (pyproject.toml): slow, multiprocess, cuda."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import support...` from any test folder

import dqa_ext  # noqa: E402
from dqa_ext import _backend  # noqa: E402


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
