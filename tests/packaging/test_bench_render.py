"""benchmarks/_render.py: a committed results .json renders back to its committed tables."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))  # after tests/: its conftest stays the one imported

import _render  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _tables(text):
    """The generated part of a results .md (the hand-written analysis is appended after it)."""
    return text.split("## Analysis (from ")[0].rstrip()


def test_results_json_renders_to_its_committed_markdown(tmp_path):
    for name in ("cuda-nvidia-h200", "cuda-nvidia-h200-compile"):
        src = RESULTS / f"{name}.json"
        written = _render.render(src, tmp_path, name)
        md = tmp_path / f"{name}.md"
        assert md in written
        assert _tables(md.read_text()) == _tables((RESULTS / f"{name}.md").read_text())
        assert "| f32 [32,64,56,56] pc nchw fwd: fraction of copy bandwidth" in md.read_text()
