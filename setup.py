"""Builds dqa_ext._C against the torch installed in this environment: the CPU kernels always, the
CUDA kernels when torch has CUDA and a CUDA toolkit is found (FORCE_CUDA=1 requires them: an error instead of CPU kernels only,
DQA_EXT_NO_CUDA=1 skips them; see build_tools/cuda_config.py). Metadata lives in pyproject.toml.

Install with `pip install --no-build-isolation .`. pyproject.toml does not list torch as a build
requirement: pip's isolated build would fetch the newest torch (GBs) and build kernels that the
installed torch cannot load. Without torch here (an isolated build) this installs the Python
package without kernels, says so in one line, and dqa_ext runs the pure-PyTorch reference with a
warning that names the command to run.

Environment:
  DQA_EXT_CPU_CAPABILITY  default | avx2 | avx512  (x86-64 default: avx2; elsewhere: default)
  TORCH_CUDA_ARCH_LIST    CUDA archs, e.g. "8.0;9.0" (default: the visible GPUs', else
                          build_tools.cuda_config.DEFAULT_ARCH_LIST)
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (default: found from nvcc or /usr/local/cuda)
"""

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))  # PEP 517 builds do not put ROOT on sys.path
import cuda_config  # noqa: E402

NO_TORCH_LINE = ("dqa_ext: torch is not importable in this build environment (pip's build isolation): "
                 "installing WITHOUT the compiled kernels; install torch, then "
                 "`pip install --no-build-isolation .` to build them")

# at::vec picks its SIMD width from these macros; the compiler flags must allow the instructions.
CPU_CAPABILITIES = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def log(line):
    print(line, file=sys.stderr, flush=True)


def cpu_capability():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    cap = os.environ.get("DQA_EXT_CPU_CAPABILITY", "avx2" if x86 else "default").lower()
    if cap not in CPU_CAPABILITIES:
        raise SystemExit(f"DQA_EXT_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITIES)}, got {cap!r}")
    if cap != "default" and not x86:
        raise SystemExit(f"DQA_EXT_CPU_CAPABILITY={cap} needs an x86-64 machine, this is {platform.machine()}")
    return cap


def cuda_plan(torch):
    """Decides CUDA and exports CUDA_HOME / TORCH_CUDA_ARCH_LIST; must run before
    torch.utils.cpp_extension is imported (it reads CUDA_HOME at import)."""
    gpu = torch.version.cuda is not None and torch.cuda.is_available()
    plan = cuda_config.plan_cuda(dict(os.environ), torch.version.cuda, gpu,
                                 cuda_config.toolkit_candidates(os.environ))
    for line in plan.notes:
        log(f"dqa_ext: {line}")
    if plan.error:
        raise SystemExit(f"dqa_ext: {plan.error}")
    cuda_config.apply(plan, os.environ)
    if plan.enabled and "torch.utils.cpp_extension" in sys.modules:  # imported by torch itself: too late
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = plan.cuda_home
    return plan


def write_build_config(torch, cap, plan, archs):
    # Read by dqa_ext._backend before the library is loaded (an AVX2 build must not be loaded
    # on a CPU without AVX2, kernels built for another torch must not be loaded at all) and
    # reported by dqa_ext.backend_info().
    with open(os.path.join(ROOT, "dqa_ext", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CPU_CAPABILITY = {cap!r}\nWITH_CUDA = {plan.enabled!r}\nCUDA_ARCHS = {archs!r}\n")
        # Why there are no CUDA kernels (and how to get them), for the fallback warning.
        f.write(f"NO_CUDA_REASON = {(None if plan.enabled else plan.notes[-1])!r}\n")
        f.write(f"BUILT_WITH_TORCH = {torch.__version__!r}\n")


def extensions():
    """The extension and the build_ext command, or none without torch (an isolated build)."""
    try:
        import torch
    except ImportError:
        log(NO_TORCH_LINE)
        return [], {}
    cap = cpu_capability()
    plan = cuda_plan(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp"))
    # -fopenmp: at::parallel_for only runs in parallel when _OPENMP is defined (torch's own
    # libgomp then serves it).
    cxx = ["-O3", "-fopenmp"] + CPU_CAPABILITIES[cap]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    archs = ""
    if plan.enabled:
        from torch.utils.cpp_extension import _get_cuda_arch_flags  # private, but the flags torch uses

        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        archs = " ".join(_get_cuda_arch_flags())
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}
        ext = CUDAExtension("dqa_ext._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension("dqa_ext._C", sources, **kwargs)
    write_build_config(torch, cap, plan, archs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
