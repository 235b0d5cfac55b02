"""Builds dqa_ext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is
found (or FORCE_CUDA=1; DQA_EXT_NO_CUDA=1 skips them). Metadata lives in pyproject.toml.

Environment:
  DQA_EXT_CPU_CAPABILITY  default | avx2 | avx512  (x86-64 default: avx2; elsewhere: default)
  TORCH_CUDA_ARCH_LIST    CUDA archs, e.g. "8.0;9.0" (torch's default: the visible GPUs')
"""

import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# at::vec picks its SIMD width from these macros; the compiler flags must allow the instructions.
CPU_CAPABILITIES = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def env_flag(name):
    return os.environ.get(name, "0") == "1"


def cpu_capability():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    cap = os.environ.get("DQA_EXT_CPU_CAPABILITY", "avx2" if x86 else "default").lower()
    if cap not in CPU_CAPABILITIES:
        raise SystemExit(f"DQA_EXT_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITIES)}, got {cap!r}")
    if cap != "default" and not x86:
        raise SystemExit(f"DQA_EXT_CPU_CAPABILITY={cap} needs an x86-64 machine, this is {platform.machine()}")
    return cap


def want_cuda():
    if env_flag("DQA_EXT_NO_CUDA"):
        return False
    if env_flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_archs():
    from torch.utils.cpp_extension import _get_cuda_arch_flags  # private, but the flags torch uses

    try:
        return " ".join(_get_cuda_arch_flags())
    except Exception as exc:  # no visible GPU and no TORCH_CUDA_ARCH_LIST
        return f"unknown ({exc})"


def write_build_config(cap, cuda, archs):
    # Read by dqa_ext._backend before the library is loaded (an AVX2 build must not be loaded
    # on a CPU without AVX2) and reported by dqa_ext.backend_info().
    with open(os.path.join(ROOT, "dqa_ext", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CPU_CAPABILITY = {cap!r}\nWITH_CUDA = {cuda!r}\nCUDA_ARCHS = {archs!r}\n")
        f.write(f"BUILT_WITH_TORCH = {torch.__version__!r}\n")


def extension():
    cap = cpu_capability()
    cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for only runs in parallel when _OPENMP is defined (torch's own
    # libgomp then serves it).
    cxx = ["-O3", "-fopenmp"] + CPU_CAPABILITIES[cap]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    archs = ""
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        archs = cuda_archs()
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DDQA_EXT_WITH_CUDA"],
                                        "nvcc": ["-O3", "-lineinfo", "-DDQA_EXT_WITH_CUDA"]}
        ext = CUDAExtension("dqa_ext._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension("dqa_ext._C", sources, **kwargs)
    write_build_config(cap, cuda, archs)
    return ext


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
