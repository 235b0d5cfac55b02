"""Loaders on files written in the real formats (IDX, CIFAR-10 pickles) and the embedded subset."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from dqa_ext.robust.data import DataError, load_cifar10, load_dataset, load_mnist5k, load_mnist_idx, read_idx


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_mnist(folder, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, arr in arrays.items():
        data = _idx(arr)
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    return arrays


def test_mnist5k_split_is_stratified_deterministic_and_disjoint():
    d = load_mnist5k()
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert torch.equal(d.y_train.bincount(), torch.full((10,), 400))
    assert torch.equal(d.y_test.bincount(), torch.full((10,), 100))
    assert len(set(d.y_train[:100].tolist())) == 10  # shuffled: a prefix holds every class
    again = load_mnist5k()
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.y_train, again.y_train)
    train_rows = {r.numpy().tobytes() for r in d.x_train.flatten(1)}
    assert not any(r.numpy().tobytes() in train_rows for r in d.x_test.flatten(1)[:200])


@pytest.mark.parametrize("layout,gz", [("plain", False), ("torchvision", True)])
def test_mnist_idx_loader(tmp_path, layout, gz):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _write_mnist(folder, gz=gz)
    d = load_dataset("mnist", tmp_path)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(d.x_train[:, 0].numpy() * 255, arrays["train-images-idx3-ubyte"], atol=1e-3)
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*MNIST/raw"):
        load_mnist_idx(tmp_path)
    _write_mnist(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*corrupt"):
        load_mnist_idx(tmp_path)
    bad.write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist", None)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)


def test_idx_header_whose_size_overflows_int64_is_a_data_error(tmp_path):
    # 2**31 * 2**31 * 4 = 2**64: in int64 that wraps to 0, which an empty body would match.
    bad = tmp_path / "crafted-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2**31, 2**31, 4)))
    with pytest.raises(DataError, match=f"{bad.name} is corrupt: header says .*{2**64} bytes.*holds 0"):
        read_idx(bad)


def _write_cifar(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    return batches


def test_cifar10_loader(tmp_path):
    batches = _write_cifar(tmp_path)
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    row = batches["data_batch_1"][b"data"][0]  # 1024 red, then green, then blue, row-major
    assert d.x_train[0, 1, 0, 5].item() == pytest.approx(row[1024 + 5] / 255)
    assert d.y_test.tolist() == batches["test_batch"][b"labels"]
    assert torch.equal(load_cifar10(tmp_path / "cifar-10-batches-py").x_test, d.x_test)


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}, f)
    with pytest.raises(DataError, match="data_batch_3 has labels outside 0..9"):
        load_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 file .*data_batch_3"):
        load_cifar10(tmp_path)
