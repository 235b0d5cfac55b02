"""The CUDA kernels stay compilable and testable without a CUDA build of torch: the kernel units
include only CUDA headers and the project's own torch-free headers (CI compiles them with nvcc
for sm_80 and sm_90 via scripts/check_cuda_kernels.sh), the host planner, counter slots, index
walks and fast division include no CUDA header at all (g++ compiles and tests them), and the
Torch glue is the only CUDA-side file that sees torch. The GPU run's script passes its dry run."""

import os
import pathlib
import re

import pytest
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
PLAIN = {"dqa_plan.h", "dqa_walk.h", "dqa_divide.h", "dqa_counters.h", "../dqa_math.h",
         "cuda/dqa_plan.h", "cuda/dqa_walk.h", "cuda/dqa_divide.h", "cuda/dqa_counters.h"}
PROJECT = PLAIN | {"dqa_kernels.cuh", "dqa_device.cuh"}
STD = re.compile(r"^(c[a-z]+|[a-z_]+)$")  # <cstdint>, <atomic>, ...
# CUDA's own headers (runtime, fp16/bf16, cub, libcu++) and the C++ standard library.
CUDA_OR_STD = re.compile(r"^(cuda_[a-z0-9_]+\.h|cub/.*|cuda/.*|c[a-z]+|[a-z_]+)$")
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def includes(path):
    return set(INCLUDE.findall(path.read_text()))


def test_kernel_units_include_only_cuda_headers():
    units = sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh"))
    assert units, "no CUDA kernel sources found"
    for unit in units:
        extra = {h for h in includes(unit) - PROJECT if not CUDA_OR_STD.match(h)}
        assert not extra, f"{unit.name} includes {sorted(extra)}: kernels must include CUDA headers only"


def test_planner_and_walks_are_plain_cpp():
    """g++ compiles the planner and the index walks with no CUDA toolkit: standard headers only."""
    names = ("dqa_plan.h", "dqa_walk.h", "dqa_divide.h", "dqa_counters.h", "dqa_plan.cpp", "dqa_counters.cpp")
    plain = [CUDA_DIR / n for n in names] + sorted((CUDA_DIR / "tests").glob("*.cpp"))
    for unit in plain:
        assert unit.exists(), unit
        extra = {h for h in includes(unit) - PLAIN if not STD.match(h)}
        assert not extra, f"{unit.name} includes {sorted(extra)}: the planner must build without CUDA"


def test_only_the_glue_sees_torch():
    for unit in sorted(CUDA_DIR.glob("*.cpp")):
        torch_headers = {h for h in includes(unit) if h.startswith(("ATen/", "c10/", "torch/"))}
        if unit.name == "dqa_cuda.cpp":
            assert torch_headers, "the glue registers the ops with torch"
        else:
            assert not torch_headers, f"{unit.name} includes {sorted(torch_headers)}"


def test_shared_math_header_is_torch_free():
    assert includes(ROOT / "csrc" / "dqa_math.h") <= {"cfloat", "cmath"}


def test_cuda_glue_registers_both_ops():
    glue = (CUDA_DIR / "dqa_cuda.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(dqa_ext, CUDA" in glue
    for op in ("fake_quantize", "fake_quantize_backward"):
        assert re.search(rf'm\.impl\("{op}"', glue), op


@pytest.mark.slow
def test_gpu_verify_dry_run(tmp_path):
    """The GPU run's script without a GPU: host steps, the measuring scripts' dry runs (cases,
    byte counts, tables, every op called once on the CPU), then it stops, saying so."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_verify.sh"), "--dry-run", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    assert "result: all steps passed" in summary and "stopped after the host steps: --dry-run" in summary
    for step in ("dry_device_time", "dry_profile", "dry_train_step"):
        assert f"| {step} | ok |" in summary, summary
    assert len(list((tmp_path / "out").iterdir())) <= 6
