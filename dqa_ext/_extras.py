"""The robustness toolkit's optional dependencies (the `robust` extra) and the one line that says
how to install them. The kernels, DQAReLU and convert need only torch and numpy."""

from __future__ import annotations

INSTALL_ROBUST = 'pip install "dqa_ext[robust]"'

# Top-level module name -> the distribution that provides it (pyproject.toml's `robust` extra).
ROBUST_MODULES = {
    "art": "adversarial-robustness-toolbox",
    "mlxtend": "mlxtend",
    "matplotlib": "matplotlib",
    "scipy": "scipy",
    "tqdm": "tqdm",
}


def missing_robust_extra(exc: BaseException) -> str | None:
    """The one-line error for a ModuleNotFoundError of a `robust` extra's package (searched
    through the exception's causes), else None: the caller re-raises anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.partition(".")[0]
            if top in ROBUST_MODULES:
                return (f"this command needs the robustness extras ({ROBUST_MODULES[top]} is not installed): "
                        f"{INSTALL_ROBUST}")
        exc = exc.__cause__ or exc.__context__
    return None
