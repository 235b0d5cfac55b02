"""Loaders on files written in the real formats (IDX, CIFAR-10 pickles) and the embedded subset;
a CIFAR-10 file cannot run code."""
import io
import os
import pickle

import numpy as np
import pytest
import torch

from dqa_ext.robust.data import DataError, load_cifar10, load_dataset, load_mnist5k, load_mnist_idx, read_idx
from support.robust import one_line_error, write_cifar, write_mnist


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
    arrays = write_mnist(folder, gz=gz)
    d = load_dataset("mnist", tmp_path)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(d.x_train[:, 0].numpy() * 255, arrays["train-images-idx3-ubyte"], atol=1e-3)
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*MNIST/raw"):
        load_mnist_idx(tmp_path)
    write_mnist(tmp_path)
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


def test_cifar10_loader(tmp_path):
    batches = write_cifar(tmp_path)
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    row = batches["data_batch_1"][b"data"][0]  # 1024 red, then green, then blue, row-major
    assert d.x_train[0, 1, 0, 5].item() == pytest.approx(row[1024 + 5] / 255)
    assert d.y_test.tolist() == batches["test_batch"][b"labels"]
    assert torch.equal(load_cifar10(tmp_path / "cifar-10-batches-py").x_test, d.x_test)


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path)
    write_cifar(tmp_path)
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


class _Evil:
    def __init__(self, how, marker):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return getattr, ("text", "upper")  # a harmless-looking global is refused as well


@pytest.mark.parametrize("how", ["os.system", "exec", "getattr"])
def test_cifar10_pickle_cannot_run_code(tmp_path, how):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(how, marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match="data_batch_1.*refused") as e:
        load_cifar10(tmp_path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_cifar10_pickle_via_the_cli_is_one_line(capsys, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil("os.system", marker), b"labels": [0]}, f)
    err = one_line_error(capsys, ["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", tmp_path / "m.pt"])
    assert "data_batch_1" in err and not marker.exists() and not (tmp_path / "m.pt").exists()


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the real cifar-10-batches-py files (cPickle) do."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar10_real_format_batches_load(tmp_path, numpy_module):
    """Real batches: a dict of bytes keys, data a uint8 numpy array, labels a list (numpy 1.x files
    name numpy.core.multiarray, numpy 2.x ones numpy._core.multiarray)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    want = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, 3).tolist(),
             b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), b"filenames": [b"a.png", b"b.png", b"c.png"]}
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(d)
        raw = buf.getvalue()
        for mod in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
            raw = raw.replace(b"c" + mod + b"\n", b"c" + numpy_module.encode() + b"\n")
        assert numpy_module.encode() in raw and b"_codecs" not in raw
        (folder / name).write_bytes(raw)
        want[name] = d
    ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (15, 3, 32, 32)
    assert ds.y_test.tolist() == want["test_batch"][b"labels"]
    assert ds.x_train[3].flatten()[7].item() == pytest.approx(want["data_batch_2"][b"data"][0, 7] / 255)
