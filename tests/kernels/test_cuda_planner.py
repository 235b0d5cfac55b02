"""The CUDA kernels' host planner and index walks, compiled with the host C++ compiler and run on
the CPU (no GPU, no CUDA toolkit): the planner's unit tests (csrc/cuda/tests/plan_test.cpp) and
the thread-by-thread emulation of every kernel's accesses (csrc/cuda/tests/emulate_test.cpp).
scripts/check_cuda_kernels.sh runs the same programs with more emulation cases."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def planner_object(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    out = tmp_path_factory.mktemp("planner") / "dqa_plan.o"
    _compile(["-c", "csrc/cuda/dqa_plan.cpp", "-o", str(out)])
    return out


def _compile(args):
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Icsrc", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"


@pytest.mark.parametrize("program,args", [("plan_test", []), ("emulate_test", ["400"])])
def test_host_program(planner_object, tmp_path, program, args):
    exe = tmp_path / program
    _compile([f"csrc/cuda/tests/{program}.cpp", str(planner_object), "-o", str(exe)])
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " 0 failed" in r.stdout, r.stdout[-2000:]
