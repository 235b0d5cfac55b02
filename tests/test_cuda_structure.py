"""The CUDA kernels stay compilable without a CUDA build of torch: their translation units include
only CUDA headers and the shared math header (CI compiles them with nvcc for sm_80 and sm_90 via
scripts/check_cuda_kernels.sh). The Torch glue is the only CUDA-side file that sees torch."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = {"dqa_kernels.cuh", "../dqa_math.h"}
# CUDA's own headers (runtime, fp16/bf16, cub, libcu++) and the C++ standard library.
CUDA_OR_STD = re.compile(r"^(cuda_[a-z0-9_]+\.h|cub/.*|cuda/.*|c[a-z]+|[a-z_]+)$")
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def includes(path):
    return set(INCLUDE.findall(path.read_text()))


def test_kernel_units_include_only_cuda_headers():
    units = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
    assert units, "no CUDA kernel sources found"
    for unit in units:
        extra = {h for h in includes(unit) - PROJECT if not CUDA_OR_STD.match(h)}
        assert not extra, f"{unit.name} includes {sorted(extra)}: kernels must include CUDA headers only"


def test_shared_math_header_is_torch_free():
    assert includes(ROOT / "csrc" / "dqa_math.h") <= {"cfloat", "cmath"}


def test_cuda_glue_registers_both_ops():
    glue = (ROOT / "csrc" / "cuda" / "dqa_cuda.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(dqa_ext, CUDA" in glue
    for op in ("fake_quantize", "fake_quantize_backward"):
        assert re.search(rf'm\.impl\("{op}"', glue), op
