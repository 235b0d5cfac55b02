"""The CUDA kernels' host planner, counter slots, index walks and fast division, compiled with the
host C++ compiler and run on the CPU (no GPU, no CUDA toolkit): the planner's unit tests
(csrc/cuda/tests/plan_test.cpp), the thread-by-thread emulation of every kernel's accesses and of
the step-gradient reduction (emulate_test.cpp), and the proof that the kernels' division is the
IEEE one (divide_test.cpp). scripts/check_cuda_kernels.sh runs the same programs with more
emulation cases, then the SASS report."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def host_objects(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    out = tmp_path_factory.mktemp("planner")
    objects = []
    for unit in ("dqa_plan", "dqa_counters"):
        obj = out / f"{unit}.o"
        _compile(["-c", f"csrc/cuda/{unit}.cpp", "-o", str(obj)])
        objects.append(str(obj))
    return objects


def _compile(args):
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Icsrc", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"


# program, extra compiler flags, objects it links, arguments
PROGRAMS = {
    "plan_test": (["-pthread"], 2, []),
    "emulate_test": ([], 1, ["400"]),
    "divide_test": (["-ffp-contract=off"], 0, ["4"]),
}


def test_planner_under_sanitizers(tmp_path):
    """The planner tests under ASan and UBSan: the counter slots survive static destruction (a
    CUDA thread may release one while the process exits), no signed overflow in the planner."""
    if CXX is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "plan_test"
    flags = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    probe = subprocess.run([CXX, *flags, "-x", "c++", "-", "-o", str(tmp_path / "probe")],
                           input="int main() { return 0; }", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the compiler cannot link ASan/UBSan here")
    _compile([*flags, "csrc/cuda/dqa_plan.cpp", "csrc/cuda/dqa_counters.cpp", "csrc/cuda/tests/plan_test.cpp",
              "-pthread", "-o", str(exe)])
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " 0 failed" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]


# The emulation and the division proof take seconds to compile and run: slow here, and
# scripts/check_cuda_kernels.sh (CI) runs them with more cases anyway.
@pytest.mark.parametrize("program", [p if p == "plan_test" else pytest.param(p, marks=pytest.mark.slow)
                                     for p in sorted(PROGRAMS)])
def test_host_program(host_objects, tmp_path, program):
    flags, nobjects, args = PROGRAMS[program]
    exe = tmp_path / program
    _compile([f"csrc/cuda/tests/{program}.cpp", *host_objects[:nobjects], *flags, "-o", str(exe)])
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " 0 failed" in r.stdout, r.stdout[-2000:]
