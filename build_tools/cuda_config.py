"""Whether setup.py builds the CUDA kernels, with which toolkit (CUDA_HOME) and for which archs.

`plan_cuda` is a pure function of its inputs (the environment, torch's CUDA version, whether a GPU
is visible, the candidate toolkit folders) so tests can cover every machine kind. It imports
nothing from torch: setup.py must set CUDA_HOME before torch.utils.cpp_extension is imported,
because that module reads it once, at import.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass, field

# With no visible GPU, torch would derive the archs from the visible devices and crash
# (`arch_list[-1] += '+PTX'` on an empty list). This default covers what CUDA 12 and 13 both
# target and what torch's own CUDA 13 wheels support (sm_75 and newer): 7.5 (Turing: T4),
# 8.0 (A100; its SASS also runs on 8.6/8.7/8.9 consumer and L4/L40 parts), 9.0 (H100/H200), and
# 9.0 PTX, which the driver JIT-compiles for newer GPUs (Blackwell 10.x/12.x). Three cubins
# keep the build a few minutes on two cores. TORCH_CUDA_ARCH_LIST overrides it.
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"

# What makes a folder a CUDA toolkit for torch's build: nvcc and the runtime headers. A folder
# that only has bin/nvcc (torch guesses /usr/local from /usr/local/bin/nvcc) is not one.
TOOLKIT_FILES = (os.path.join("bin", "nvcc"), os.path.join("include", "cuda_runtime.h"))

HOW_TO_GET_CUDA = ("install the CUDA toolkit matching torch's CUDA (nvcc and headers), set CUDA_HOME "
                   "to it, and reinstall with `pip install --no-build-isolation .`")


@dataclass
class CudaPlan:
    enabled: bool
    cuda_home: str | None = None      # the toolkit to export as CUDA_HOME before the build
    arch_list: str | None = None      # TORCH_CUDA_ARCH_LIST to export; None: torch's (visible GPUs)
    notes: list = field(default_factory=list)  # one-line messages for the build log
    error: str | None = None          # set: stop the build with this line


def env_flag(env, name):
    return env.get(name, "0").strip() == "1"


def is_toolkit(path):
    return bool(path) and all(os.path.isfile(os.path.join(path, f)) for f in TOOLKIT_FILES)


def toolkit_version(path):
    """The toolkit's CUDA version as "major.minor" (include/cuda.h's CUDA_VERSION, e.g. 13000 is
    13.0; else version.json), or None when neither says. Read from files, not `nvcc --version`,
    so a plan costs no subprocess."""
    try:
        with open(os.path.join(path, "include", "cuda.h"), errors="replace") as f:
            found = re.search(r"^\s*#\s*define\s+CUDA_VERSION\s+(\d+)", f.read(), re.MULTILINE)
        if found:
            number = int(found.group(1))
            return f"{number // 1000}.{number % 1000 // 10}"
    except OSError:
        pass
    try:
        with open(os.path.join(path, "version.json")) as f:
            version = json.load(f)["cuda"]["version"]
        return ".".join(str(version).split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def major(version):
    return str(version).split(".")[0]


def toolkit_candidates(env, which=shutil.which):
    """Folders that may hold the CUDA toolkit, most explicit first: CUDA_HOME, CUDA_PATH, the
    folder above nvcc's real path (a symlinked nvcc resolves to its toolkit), /usr/local/cuda."""
    found = [env.get("CUDA_HOME"), env.get("CUDA_PATH")]
    nvcc = which("nvcc", path=env.get("PATH"))
    if nvcc:
        found.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    found.append("/usr/local/cuda")
    out = []
    for path in found:
        if path and path not in out:
            out.append(path)
    return out


def plan_cuda(env, torch_cuda, gpu_visible, candidates, is_toolkit=is_toolkit,
              toolkit_version=toolkit_version):
    """The CUDA decision, as torchao and xformers make it: torch has CUDA and a toolkit of the same
    CUDA major version is found; FORCE_CUDA=1 turns "CPU kernels only" into an error;
    DQA_EXT_NO_CUDA=1 skips. torch_cuda: torch.version.cuda (None for a CPU build); gpu_visible:
    torch.cuda.is_available(); candidates: toolkit_candidates(env)."""
    if env_flag(env, "DQA_EXT_NO_CUDA"):
        return CudaPlan(False, notes=["DQA_EXT_NO_CUDA=1: CPU kernels only"])
    force = env_flag(env, "FORCE_CUDA")
    if torch_cuda is None:
        if force:  # no libc10_cuda/libtorch_cuda to link against: the link would fail minutes later
            return CudaPlan(False, error="FORCE_CUDA=1 but this torch has no CUDA (torch.version.cuda "
                                         "is None): install a CUDA torch, or unset FORCE_CUDA")
        return CudaPlan(False, notes=["this torch has no CUDA: CPU kernels only"])

    plan = CudaPlan(True)
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name) and not is_toolkit(env[name]):
            plan.notes.append(f"{name}={env[name]} is not a CUDA toolkit "
                              f"(no bin/nvcc and include/cuda_runtime.h there), ignored")
    # torch's build refuses a toolkit of another CUDA major version (_check_cuda_version raises),
    # so such a toolkit is skipped here, where a CUDA torch can still fall back to the CPU kernels.
    mismatched = []
    for path in filter(is_toolkit, candidates):
        version = toolkit_version(path)
        if version is not None and major(version) != major(torch_cuda):
            mismatched.append(f"{path} has CUDA {version}")
            continue
        plan.cuda_home = path
        break
    skipped = "; ".join(mismatched)
    if plan.cuda_home is None:
        where = ", ".join(candidates) or "nowhere"
        found = (f"no CUDA {major(torch_cuda)}.x toolkit ({skipped})" if mismatched else
                 "no CUDA toolkit (bin/nvcc and include/cuda_runtime.h)")
        if force:
            plan.error = f"FORCE_CUDA=1 but {found} was found in {where}: set CUDA_HOME to the toolkit"
            return plan
        return CudaPlan(False, notes=plan.notes + [
            f"torch has CUDA {torch_cuda} but {found} was found (looked in {where}): "
            f"CPU kernels only; for the CUDA kernels {HOW_TO_GET_CUDA}"])
    if mismatched:
        plan.notes.append(f"skipped CUDA toolkits of another major version than torch's CUDA "
                          f"{torch_cuda}: {skipped}")

    user_archs = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if user_archs:
        plan.arch_list = user_archs
    elif not gpu_visible:
        plan.arch_list = DEFAULT_ARCH_LIST
        plan.notes.append(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CUDA "
                          f"kernels for {DEFAULT_ARCH_LIST}")
    plan.notes.append(f"building the CUDA kernels with the toolkit in {plan.cuda_home}")
    return plan


def apply(plan, environ):
    """Exports the plan's CUDA_HOME and arch list (before torch.utils.cpp_extension is imported)."""
    if plan.enabled:
        environ["CUDA_HOME"] = plan.cuda_home
        if plan.arch_list:
            environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
