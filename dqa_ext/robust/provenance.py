"""What a results file records about the run that made it: the software (versions, dqa_ext's
backend), the machine a reader needs to compare timings (CPU model, cores, threads, GPU), and the
command; never a path of the machine it ran on (absolute paths become file names)."""
from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.partition(":")[2].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(seed: int) -> dict:
    import numpy
    import torch

    import dqa_ext

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "seed": seed}
    try:
        import art

        info["adversarial-robustness-toolbox"] = art.__version__
    except ImportError:
        pass
    info["dqa_ext"] = dqa_ext.backend_info()
    return info


def portable_path(path, base=None) -> str | None:
    """A path as a reader of the results needs it: relative to ``base`` (the report's folder) when
    inside it, else as given when relative, else the file's name alone."""
    if path is None:
        return None
    p = Path(path)
    if base is not None:
        full, root = p.absolute(), Path(base).absolute()
        if full.is_relative_to(root):
            return full.relative_to(root).as_posix()
    return _outside(p)


def _outside(p: Path) -> str:
    return p.name if p.is_absolute() or str(p).startswith("~") else p.as_posix()


def portable_command(argv) -> str:
    """`dqa ARGS` with every absolute path (an argument, or an --option=value) reduced to its name."""
    out = []
    for arg in argv:
        opt, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        out.append(f"{opt}{sep}{_outside(Path(value))}" if value.startswith(("/", "~")) else arg)
    return "dqa " + shlex.join(out)


def portable_config(config: dict, base=None) -> dict:
    """A training config (as recorded in a checkpoint) with its paths made portable."""
    return {k: (portable_path(v, base) if k in ("out", "init_from", "data_dir") and isinstance(v, str) else v)
            for k, v in config.items()}
