"""A training run's settings (TrainConfig): checked before any data is loaded, each bad value named
by its command-line flag, and completed with the data-dependent defaults."""
from __future__ import annotations

import dataclasses
import math

from .data import DATASETS, default_eps
from .devices import resolve_device
from .errors import TrainError
from .models import ARCHS, default_arch, parse_activation


@dataclasses.dataclass
class TrainConfig:
    data: str = "mnist5k"
    data_dir: str | None = None
    activation: str = "relu"
    adv: bool = False               # PGD adversarial training
    arch: str | None = None         # default: mnist_cnn for 1-channel data, resnet20 for 3-channel
    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 64
    optimizer: str | None = None    # adam (MNIST default) or sgd (CIFAR default, cosine schedule)
    lr: float | None = None
    weight_decay: float | None = None
    eps: float | None = None        # default: 0.3 (MNIST), 8/255 (CIFAR-10)
    pgd_steps: int = 7
    pgd_step_size: float | None = None  # default: 2.5 * eps / steps
    eps_warmup: float = 0.0         # epochs over which the training eps ramps linearly from 0
    n_train: int | None = None      # use only the first n training images
    init_from: str | None = None    # start from this checkpoint's weights (the warm start of PGD training)
    seed: int = 0
    device: str = "auto"
    amp: bool = True                # bf16 autocast, CUDA only
    out: str = "model.pt"
    resume: bool = False
    force: bool = False             # overwrite an existing --out (without resume)
    progress: bool | None = None    # tqdm bars; None: only on a terminal

    def validate(self) -> "TrainConfig":
        """Check every setting the user gave, before any data is loaded (one-line TrainError)."""
        parse_activation(self.activation)
        if self.data not in DATASETS:
            raise TrainError(f"--data {self.data!r}: choose one of {', '.join(DATASETS)}")
        if self.arch is not None and self.arch not in ARCHS:
            raise TrainError(f"--arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.optimizer is not None and self.optimizer not in ("adam", "sgd"):
            raise TrainError(f"--optimizer {self.optimizer!r}: use adam or sgd")
        for name in ("epochs", "batch_size", "pgd_steps"):
            _check_int(name, getattr(self, name))
        if self.n_train is not None:
            _check_int("n_train", self.n_train)
        _check_number("lr", self.lr, positive=True)
        _check_number("weight_decay", self.weight_decay)
        _check_number("eps", self.eps)
        if self.eps is not None and self.eps > 1:
            raise TrainError(f"--eps must be at most 1 (pixels are in [0, 1]; 1 already covers every image), "
                             f"got {self.eps!r}")
        if self.resume and self.force:
            raise TrainError("--resume continues --out's run and --force replaces it: give one of them")
        _check_number("pgd_step_size", self.pgd_step_size, positive=True)
        _check_number("eps_warmup", self.eps_warmup)
        # The architecture follows from the data's channels, so its settings can be checked now.
        check_arch_kwargs(self.arch_kwargs, self.arch or default_arch(data_channels(self.data)))
        resolve_device(self.device)
        return self

    def resolved(self, input_shape) -> "TrainConfig":
        """Fill the data-dependent defaults, validating as we go."""
        self.validate()
        mnist = input_shape[0] == 1
        c = dataclasses.replace(self)
        c.arch = c.arch or default_arch(input_shape)
        check_arch_kwargs(c.arch_kwargs, c.arch)
        c.optimizer = c.optimizer or ("adam" if mnist else "sgd")
        c.lr = c.lr if c.lr is not None else (1e-3 if c.optimizer == "adam" else 0.1)
        c.weight_decay = c.weight_decay if c.weight_decay is not None else (0.0 if c.optimizer == "adam" else 5e-4)
        c.eps = c.eps if c.eps is not None else default_eps(input_shape)
        c.pgd_step_size = c.pgd_step_size if c.pgd_step_size is not None else 2.5 * c.eps / c.pgd_steps
        return c


def data_channels(name: str) -> tuple[int]:
    """The channel count of a dataset, known from its name before it is loaded."""
    return (3,) if name == "cifar10" else (1,)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, positive: bool = False) -> None:
    """None means "the default"; anything else must be finite and > 0 (positive) or >= 0."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise TrainError(f"{flag(name)} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


ARCH_KWARGS = {"mnist_cnn": ("channels", "hidden", "kernel"), "resnet20": ("width",), "mlp": ("hidden",)}


def check_arch_kwargs(kwargs: dict, arch: str | None = None) -> None:
    """Architecture settings by name and value; with ``arch``, also that it takes them."""
    if not isinstance(kwargs, dict):
        raise TrainError(f"arch_kwargs must be a dict, got {type(kwargs).__name__}")
    known = ARCH_KWARGS.get(arch, sorted({k for v in ARCH_KWARGS.values() for k in v}))
    for key, value in kwargs.items():
        if key not in known:
            takes = ", ".join(flag(k) for k in known)
            raise TrainError(f"{flag(key)} does not apply to {arch} (it takes {takes})" if arch
                             else f"unknown architecture setting {key!r} (known: {takes})")
        if key == "channels":
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
                raise TrainError(f"--channels must be two integers >= 1 (e.g. 32,64), got {value!r}")
        else:
            _check_int(key, value)
            if key == "kernel" and value % 2 == 0:
                # padding kernel // 2 keeps the image size only for odd kernels
                raise TrainError(f"--kernel must be odd (same padding), got {value!r}")
