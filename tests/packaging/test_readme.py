"""The README's example runs as written (in a scratch folder: it writes an ONNX file)."""

import re
from pathlib import Path

import pytest

from support.fresh import run_fresh

ROOT = Path(__file__).resolve().parents[2]


def readme_example():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path):
    pytest.importorskip("onnxscript", reason="the example exports to ONNX (pip install '.[test]')")
    code = f"import os\nos.chdir({str(tmp_path)!r})\n" + readme_example()
    run_fresh(code)
    assert (tmp_path / "dqa.onnx").stat().st_size > 0
