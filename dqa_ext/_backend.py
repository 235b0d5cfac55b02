"""Which implementation runs: the compiled extension where it is built for the tensor's device,
else the pure-PyTorch reference (with a one-time warning). DQA_EXT_BACKEND=reference|extension
forces one; forcing `extension` where it is not built is an error."""

import os
import warnings

import torch

_OP = "dqa_ext::fake_quantize"
_CHOICES = ("", "auto", "reference", "extension")

try:
    from . import _build_config as build_config
except ImportError:
    build_config = None


def _load_extension():
    """Returns (loaded, reason)."""
    if build_config is None:
        return False, "dqa_ext was not built (install with `pip install --no-build-isolation .`)"
    cap = build_config.CPU_CAPABILITY
    if cap == "avx2" and not torch.cpu._is_avx2_supported():
        return False, "the extension was built for AVX2, which this CPU lacks"
    if cap == "avx512" and not torch.cpu._is_avx512_supported():
        return False, "the extension was built for AVX-512, which this CPU lacks"
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as exc:
        return False, f"the extension failed to load: {exc}"
    from . import ops  # noqa: F401  (fake and autograd registrations)

    return True, ""


LOADED, LOAD_ERROR = _load_extension()
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
        why = LOAD_ERROR or f"this build has no {device_type} kernels"
        warnings.warn(f"dqa_ext: using the pure-PyTorch reference on {device_type} ({why})", stacklevel=3)
    return built


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
    if build_config is not None:
        info.update(cpu_capability=build_config.CPU_CAPABILITY, cuda_archs=build_config.CUDA_ARCHS,
                    built_with_torch=build_config.BUILT_WITH_TORCH)
    if LOAD_ERROR:
        info["load_error"] = LOAD_ERROR
    return info


def _version():
    try:
        from importlib.metadata import version

        return version("dqa_ext")
    except Exception:
        return "unknown"
