"""Which implementation runs: the compiled extension where it is built for the tensor's device,
else the pure-PyTorch reference (with a one-time warning). DQA_EXT_BACKEND=reference|extension
forces one; forcing `extension` where it is not built is an error."""

import importlib.machinery
import importlib.util
import os
import sys
import warnings

import torch

_OP = "dqa_ext::fake_quantize"
_CHOICES = ("", "auto", "reference", "extension")

try:
    from . import _build_config as build_config
except ImportError:
    build_config = None

REBUILD = "pip install --no-build-isolation ."


def _source_tree():
    """The checkout this package is imported from (it has setup.py and csrc/), else None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    is_checkout = os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))
    return root if is_checkout else None


def build_problem(built_with, running, library_present, source_tree=None, other_python_library=None):
    """Why the compiled kernels must not be loaded (one line saying what to run), or None.
    built_with: the torch version recorded at build time (None: no build record). Kernels built
    for another torch are never loaded: its C++ ABI and op registrations may differ.
    other_python_library: the file name of a _C this Python cannot import (built for another one)."""
    rebuild = "pip install --no-build-isolation -e ." if source_tree else REBUILD
    if not library_present and other_python_library:
        return (f"dqa_ext's compiled extension {other_python_library} was built for another Python "
                f"(this Python {_python_version()} loads {_C_NAMES[0]}): rebuild it with this Python, "
                f"`python -m {rebuild}` in the dqa_ext source")
    if library_present and built_with is None:
        return ("dqa_ext has a compiled extension but no record of the torch it was built with "
                "(dqa_ext/_build_config.py, which setup.py writes; a CMake build that copies only _C.so "
                "has none), so it is not loaded: build and install with "
                f"`{rebuild}` in the dqa_ext source")
    if not library_present:
        if source_tree:
            return (f"dqa_ext is imported from the source tree {source_tree}, which has no compiled "
                    "extension (it shadows any installed dqa_ext; `python -m` and `python -c` put the "
                    "current directory first): build in place with `pip install --no-build-isolation -e .`, "
                    "or run from another directory")
        return ("dqa_ext was installed without its compiled kernels (torch was not importable when it "
                f"was built, as in pip's isolated build): with torch installed, run `{REBUILD}` in the "
                "dqa_ext source")
    if built_with != running:
        return (f"its kernels were built with torch {built_with} but torch {running} is running; "
                f"rebuild them for this torch with `{REBUILD}` in the dqa_ext source")
    return None


# The names this Python imports _C from (e.g. _C.cpython-311-x86_64-linux-gnu.so, _C.abi3.so, _C.so).
_C_NAMES = ["_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def _python_version():
    return f"{sys.implementation.name} {sys.version_info.major}.{sys.version_info.minor}"


def _library_present():
    try:
        return importlib.util.find_spec(__package__ + "._C") is not None
    except (ImportError, ValueError):
        return False


def _other_python_library():
    """The name of a _C library next to this file that this Python cannot import (another ABI
    tag, as _C.cpython-310-....so under Python 3.11), else None."""
    try:
        names = sorted(os.listdir(os.path.dirname(os.path.abspath(__file__))))
    except OSError:
        return None
    return next((name for name in names if name.startswith("_C.") and name.endswith((".so", ".pyd"))
                 and name not in _C_NAMES), None)


def _load_extension():
    """Returns (loaded, reason)."""
    present = _library_present()
    problem = build_problem(getattr(build_config, "BUILT_WITH_TORCH", None), torch.__version__,
                            present, _source_tree(), None if present else _other_python_library())
    if problem:
        return False, problem
    cap = build_config.CPU_CAPABILITY
    if cap == "avx2" and not torch.cpu._is_avx2_supported():
        return False, "the extension was built for AVX2, which this CPU lacks"
    if cap == "avx512" and not torch.cpu._is_avx512_supported():
        return False, "the extension was built for AVX-512, which this CPU lacks"
    try:
        from . import _C  # loading the library registers the ops
    except ImportError as exc:
        return False, f"the extension failed to load: {exc}"
    from . import ops  # noqa: F401  (fake kernels, Inductor decompositions)

    return _C, ""


C, LOAD_ERROR = _load_extension()  # the _C module (its eager entry of the op), or False
LOADED = bool(C)
# The device types the extension has kernels for; read once so torch.compile sees constants.
BUILT_FOR = {
    dev: LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(_OP, dev.upper())
    for dev in ("cpu", "cuda")
}
_forced = os.environ.get("DQA_EXT_BACKEND", "").strip().lower()
_warned = set()


def set_backend(name):
    """'auto' (default), 'reference' or 'extension'; the same as DQA_EXT_BACKEND."""
    global _forced
    name = (name or "").strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"DQA_EXT_BACKEND must be one of 'auto', 'reference', 'extension', got {name!r}")
    _forced = name


def get_backend():
    return _forced or "auto"


set_backend(_forced)


def use_extension(device_type):
    """True when the ops of the extension should run for tensors on device_type."""
    if _forced == "reference":
        return False
    built = BUILT_FOR.get(device_type, False)
    if _forced == "extension":
        if not built:
            why = LOAD_ERROR or f"it has no {device_type} kernels in this build"
            raise RuntimeError(f"DQA_EXT_BACKEND=extension, but the extension cannot run on {device_type}: {why}")
        return True
    if not built and device_type not in _warned:
        _warned.add(device_type)
        why = LOAD_ERROR or _no_kernels_reason(device_type)
        warnings.warn(f"dqa_ext: using the pure-PyTorch reference on {device_type} ({why})", stacklevel=3)
    return built


def _no_kernels_reason(device_type):
    reason = getattr(build_config, "NO_CUDA_REASON", None) if device_type == "cuda" else None
    return f"this build has no {device_type} kernels" + (f": {reason}" if reason else "")


def backend_info():
    """What is built and what runs: CPU/CUDA kernels, SIMD level, CUDA archs, versions."""
    info = {
        "dqa_ext": _version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backend": get_backend(),
        "extension_loaded": LOADED,
        "cpu_kernels": BUILT_FOR["cpu"],
        "cuda_kernels": BUILT_FOR["cuda"],
    }
    built_with = getattr(build_config, "BUILT_WITH_TORCH", None)
    # Which torch the kernels were built with against the one running: a mismatch is never silent.
    info["built_with_torch"] = built_with
    info["torch_matches_build"] = None if built_with is None else built_with == torch.__version__
    if build_config is not None:
        info.update(cpu_capability=build_config.CPU_CAPABILITY, cuda_archs=build_config.CUDA_ARCHS)
        if getattr(build_config, "NO_CUDA_REASON", None):
            info["no_cuda_kernels_because"] = build_config.NO_CUDA_REASON
    if LOAD_ERROR:
        info["load_error"] = LOAD_ERROR
    return info


def _version():
    try:
        from importlib.metadata import version

        return version("dqa_ext")
    except Exception:
        return "unknown"
