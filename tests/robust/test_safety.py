"""Issue 8: output paths checked before any work and written atomically, inputs that cannot run code,
resumes that refuse changed settings, and one line + exit 2 for every bad argument or file."""
import importlib
import io
import os
import pickle
import stat
import sys

import numpy as np
import pytest
import torch

from dqa_ext.cli import main

train_mod = importlib.import_module("dqa_ext.robust.train")  # the package re-exports a `train` function
data_mod = importlib.import_module("dqa_ext.robust.data")

TINY = ["--channels", "8,16", "--hidden", "32", "--kernel", "3", "--n-train", "128", "--epochs", "1"]
ROOT = os.geteuid() == 0


@pytest.fixture
def outputs():
    return importlib.import_module("dqa_ext.robust.outputs")


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a command starts loading data (its first piece of work)."""
    def work(*a, **k):
        raise AssertionError("the command started working before rejecting its arguments")

    for mod in ("dqa_ext.robust.train", "dqa_ext.robust.data", "dqa_ext.robust.reproduce"):
        m = importlib.import_module(mod)
        if hasattr(m, "load_dataset"):
            monkeypatch.setattr(m, "load_dataset", work)


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dqa: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".dqa-probe"))


@pytest.fixture
def bad_outputs(tmp_path):
    """Paths that must never be written: name -> path."""
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "afile").write_text("keep me")
    os.symlink("/dev/null", tmp_path / "link-to-null")
    return {"/dev/full": "/dev/full", "/dev/null": "/dev/null", "fifo": str(tmp_path / "fifo"),
            "directory": str(tmp_path / "adir"), "symlink to /dev/null": str(tmp_path / "link-to-null"),
            "under a file": str(tmp_path / "afile" / "x.pt"), "under /proc": "/proc/dqa-test/x.pt"}


BAD_OUT_NAMES = ["/dev/full", "/dev/null", "fifo", "directory", "symlink to /dev/null", "under a file", "under /proc"]


def _assert_untouched(tmp_path):
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    assert (tmp_path / "afile").read_text() == "keep me"
    assert list((tmp_path / "adir").iterdir()) == []
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ outputs.py
@pytest.mark.parametrize("name", BAD_OUT_NAMES)
def test_check_output_file_refuses(outputs, bad_outputs, tmp_path, name):
    with pytest.raises(outputs.OutputError, match="--out") as e:
        outputs.check_output_file(bad_outputs[name])
    assert "\n" not in str(e.value)
    _assert_untouched(tmp_path)


def test_check_output_file_accepts_files_and_creatable_paths(outputs, tmp_path):
    (tmp_path / "old.pt").write_bytes(b"x")
    for p in (tmp_path / "old.pt", tmp_path / "new.pt", tmp_path / "a" / "b" / "new.pt"):
        assert outputs.check_output_file(p) == p
    assert sorted(os.listdir(tmp_path)) == ["old.pt"]  # the check created nothing


@pytest.mark.skipif(ROOT, reason="root ignores permission bits; the /proc cases cover unwritable places")
def test_check_output_file_refuses_a_read_only_directory(outputs, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(outputs.OutputError, match="not writable"):
            outputs.check_output_file(ro / "m.pt")
        with pytest.raises(outputs.OutputError, match="not writable"):
            outputs.check_output_dir(ro / "sub")
    finally:
        ro.chmod(0o755)


def test_check_output_dir(outputs, tmp_path):
    assert outputs.check_output_dir(tmp_path / "new" / "deeper", ["results.json", "models/"])
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("")
    os.mkfifo(tmp_path / "report.md")
    (tmp_path / "results.json").mkdir()
    for path, names, match in [(tmp_path / "f", (), "expected a directory"), ("/dev/null", (), "character device"),
                               (tmp_path, ["report.md"], "FIFO"), (tmp_path, ["results.json"], "a directory"),
                               (tmp_path, ["f/"], "expected a directory"), ("/proc/dqa-test", (), "cannot create"),
                               (tmp_path / "f" / "sub", (), "not a directory")]:
        with pytest.raises(outputs.OutputError, match=match):
            outputs.check_output_dir(path, names)


def test_atomic_writes_replace_regular_files_only(outputs, tmp_path):
    target = tmp_path / "a" / "out.bin"
    outputs.write_bytes_atomic(target, b"one")
    outputs.write_text_atomic(target, "two")
    assert target.read_text() == "two"
    outputs.save_torch_atomic({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.ones(2))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~_umask()  # not mkstemp's 0o600
    with pytest.raises(outputs.OutputError):
        outputs.write_bytes_atomic("/dev/full", b"x")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert _leftovers(tmp_path) == []


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_new_file_mode_reads_the_umask_without_setting_it(outputs, tmp_path, monkeypatch):
    # os.umask(0) then os.umask(old) would change the umask of every thread for a moment.
    expected = 0o666 & ~_umask()

    def no_umask(mask):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", no_umask)
    outputs.write_bytes_atomic(tmp_path / "new.bin", b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "new.bin").st_mode) == expected


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status")
def test_new_file_mode_follows_a_later_umask_change(outputs, tmp_path):
    old = os.umask(0o077)
    try:
        assert outputs._proc_umask() == 0o077
        outputs.write_bytes_atomic(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "private.bin").st_mode) == 0o600


def test_atomic_write_through_a_symlink_replaces_the_file_it_points_to(outputs, tmp_path):
    real = tmp_path / "real" / "data.bin"
    real.parent.mkdir()
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "links" / "out.bin"
    link.parent.mkdir()
    link.symlink_to(real)
    outputs.write_bytes_atomic(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link is kept
    assert real.read_bytes() == b"new" and stat.S_IMODE(os.stat(real).st_mode) == 0o640
    assert _leftovers(real.parent) == [] and _leftovers(link.parent) == []


class _Boom:
    def __init__(self, exc):
        self.exc = exc

    def __reduce__(self):
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_atomic_write_cleans_up_on_any_error(outputs, tmp_path, exc):
    target = tmp_path / "m.pt"
    target.write_bytes(b"previous")
    with pytest.raises(type(exc)):
        outputs.save_torch_atomic({"x": _Boom(exc)}, target)
    assert target.read_bytes() == b"previous" and _leftovers(tmp_path) == []


class _BecomesFifo:
    """Turns the target into a FIFO while the checkpoint is being written."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        os.unlink(self.path)
        os.mkfifo(self.path)
        return (int, ())


def test_atomic_write_rechecks_the_target_before_renaming(outputs, tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")
    with pytest.raises(outputs.OutputError, match="FIFO"):
        outputs.save_torch_atomic({"x": _BecomesFifo(target)}, target)
    assert stat.S_ISFIFO(os.stat(target).st_mode) and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ --out on the command line
@pytest.mark.parametrize("name", BAD_OUT_NAMES)
def test_train_out_is_checked_before_any_work(capsys, no_work, bad_outputs, tmp_path, name):
    assert "--out" in _err(capsys, ["train", "--out", bad_outputs[name]] + TINY)
    _assert_untouched(tmp_path)


@pytest.mark.parametrize("name", ["/dev/null", "fifo", "under a file", "under /proc"])
@pytest.mark.parametrize("command", [["attack", "x.pt"], ["reproduce", "--preset", "smoke"]])
def test_report_folders_are_checked_before_any_work(capsys, no_work, bad_outputs, tmp_path, name, command):
    assert "--out" in _err(capsys, command + ["--out", bad_outputs[name]])
    _assert_untouched(tmp_path)


def test_report_folder_with_a_fifo_for_a_file(capsys, tmp_path):
    os.mkfifo(tmp_path / "report.md")
    (tmp_path / "results.json").write_text("{}")
    assert "report.md is a FIFO" in _err(capsys, ["attack", "x.pt", "--out", str(tmp_path)])
    assert "report.md is a FIFO" in _err(capsys, ["reproduce", "--preset", "smoke", "--out", str(tmp_path)])


def test_report_out_is_checked(capsys, monkeypatch, tmp_path):
    def no_rendering(*a, **k):
        raise AssertionError("the report was rendered before its --out was checked")

    report = importlib.import_module("dqa_ext.robust.report")
    monkeypatch.setattr(report, "load_results", lambda path: {"settings": {}, "models": []})  # its format is not tested here
    monkeypatch.setattr(report, "write_report", no_rendering)
    os.mkfifo(tmp_path / "fifo")
    assert "FIFO" in _err(capsys, ["report", str(tmp_path), "--out", str(tmp_path / "fifo")])
    assert "a character device" in _err(capsys, ["report", str(tmp_path), "--out", "/dev/null"])


def test_reproduce_refuses_existing_checkpoints_without_resume_or_force(capsys, no_work, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "relu-standard.pt").write_bytes(b"x")
    err = _err(capsys, ["reproduce", "--preset", "smoke", "--out", str(tmp_path)])
    assert "--resume" in err and "--force" in err


# ------------------------------------------------------------------ one line, exit 2
BAD_TRAIN = [
    (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--device", "tpu"], "--device 'tpu'"), (["--device", "cuda:99"], "--device 'cuda:99'"),
    (["--channels", "8"], "--channels"), (["--channels", "8,16,32"], "--channels"), (["--channels", "0,4"], "--channels"),
    (["--hidden", "0"], "--hidden"), (["--kernel", "0"], "--kernel"), (["--kernel", "4"], "--kernel must be odd"),
    (["--batch-size", "0"], "--batch-size"), (["--epochs", "0"], "--epochs"), (["--eps", "-1"], "--eps"),
    (["--eps", "nan"], "--eps"), (["--pgd-steps", "0"], "--pgd-steps"), (["--pgd-step-size", "0"], "--pgd-step-size"),
    (["--eps-warmup", "-1"], "--eps-warmup"), (["--n-train", "0"], "--n-train"),
    (["--width", "8"], "--width does not apply to mnist_cnn"),
    (["--arch", "resnet20", "--channels", "8,16"], "--channels does not apply to resnet20"),
]
if not torch.cuda.is_available():
    BAD_TRAIN.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("args,match", BAD_TRAIN)
def test_bad_train_arguments(capsys, no_work, tmp_path, args, match):
    assert match in _err(capsys, ["train", "--out", str(tmp_path / "m.pt")] + args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,match", [
    (["--eps", "-1"], "--eps"), (["--eps", "0"], "--eps"), (["--eps", "nan"], "--eps"), (["--eps", "inf"], "--eps"),
    (["--n", "0"], "--n must be"), (["--sweep-eps", "0,-0.1"], "--sweep-eps"), (["--device", "tpu"], "--device"),
])
def test_bad_attack_arguments(capsys, no_work, tmp_path, args, match):
    assert match in _err(capsys, ["attack", "x.pt", "--out", str(tmp_path / "rep")] + args)
    assert list(tmp_path.iterdir()) == []


def _meta(**over):
    meta = {"arch": "mnist_cnn", "arch_kwargs": {"channels": [8, 16], "hidden": 32, "kernel": 3},
            "activation": "relu", "training": "standard", "dataset": "mnist5k", "input_shape": [1, 28, 28],
            "num_classes": 10, "config": {}}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def _ckpt(**over):
    ckpt = {"format": "dqa_ext.robust/1", "meta": _meta(), "epoch": 1, "history": [], "model": {},
            "optimizer": {}, "scheduler": None}
    ckpt.update(over)
    return {k: v for k, v in ckpt.items() if v is not None}


BAD_CHECKPOINTS = {
    "text file": (b"hello world\n" * 4, "cannot read checkpoint"),
    "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "cannot read checkpoint"),
    "empty file": (b"", "cannot read checkpoint"),
    "a plain state dict": ({"w": torch.ones(1)}, "not a dqa_ext.robust checkpoint"),
    "no meta": (_ckpt(meta=None), "missing 'meta'"),
    "no model": (_ckpt(model=None), "missing 'model'"),
    "meta without arch": (_ckpt(meta=_meta(arch=None)), "missing meta 'arch'"),
    "meta without config": (_ckpt(meta=_meta(config=None)), "missing meta 'config'"),
    "bad input_shape": (_ckpt(meta=_meta(input_shape=[1, 28])), "bad meta 'input_shape'"),
    "bad arch": (_ckpt(meta=_meta(arch="vgg")), "bad meta 'arch'"),
    "bad epoch": (_ckpt(epoch="3"), "bad 'epoch'"),
    "one channel": (_ckpt(meta=_meta(arch_kwargs={"channels": [8]})), "--channels"),
    "weights of another model": (_ckpt(model={"1.weight": torch.ones(3, 1, 3, 3)}), "weights do not fit"),
}


def _write_checkpoint(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_one_line(capsys, no_work, tmp_path, name):
    content, match = BAD_CHECKPOINTS[name]
    path = tmp_path / "bad.pt"
    _write_checkpoint(path, content)
    assert match in _err(capsys, ["attack", str(path), "--out", str(tmp_path / "rep")])
    with pytest.raises(train_mod.TrainError, match=match):
        train_mod.load_model(path)


def test_bad_checkpoint_to_resume_is_one_line(capsys, no_work, tmp_path):
    path = tmp_path / "m.pt"
    _write_checkpoint(path, _ckpt(meta=_meta(arch=None)))
    assert "missing meta 'arch'" in _err(capsys, ["train", "--out", str(path), "--resume"] + TINY)


@pytest.mark.parametrize("module,argv", [
    ("tqdm", ["train"]), ("art", ["attack", "x.pt"]), ("matplotlib", ["attack", "x.pt"]),
    ("art", ["reproduce", "--preset", "smoke"]),
])
def test_missing_robust_extra_is_one_line(capsys, monkeypatch, no_work, tmp_path, module, argv):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    out = ["--out", str(tmp_path / ("m.pt" if argv[0] == "train" else "rep"))]
    err = _err(capsys, argv + out)
    assert "robustness extras" in err and 'pip install "dqa_ext[robust]"' in err


# ------------------------------------------------------------------ CIFAR-10 pickles cannot run code
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
    with pytest.raises(data_mod.DataError, match="data_batch_1.*refused") as e:
        data_mod.load_cifar10(tmp_path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_cifar10_pickle_via_the_cli_is_one_line(capsys, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil("os.system", marker), b"labels": [0]}, f)
    err = _err(capsys, ["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m.pt")])
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
    ds = data_mod.load_cifar10(tmp_path)
    assert ds.x_train.shape == (15, 3, 32, 32)
    assert ds.y_test.tolist() == want["test_batch"][b"labels"]
    assert ds.x_train[3].flatten()[7].item() == pytest.approx(want["data_batch_2"][b"data"][0, 7] / 255)


# ------------------------------------------------------------------ resume and overwrite
@pytest.fixture(scope="module")
def mnist():
    return data_mod.load_mnist5k()


BASE = dict(activation="dqa2", arch_kwargs={"channels": [8, 16], "hidden": 32, "kernel": 3}, epochs=2, n_train=128,
            batch_size=64, progress=False)


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """A finished 2-epoch checkpoint (Adam)."""
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    train_mod.train(train_mod.TrainConfig(**BASE, out=str(path)), dataset=mnist, log=lambda *_: None)
    return path


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("change,names", [
    ({"lr": 0.01}, ["lr"]), ({"optimizer": "sgd"}, ["optimizer"]), ({"batch_size": 32}, ["batch_size"]),
    ({"seed": 1}, ["seed"]), ({"n_train": 64}, ["n_train"]), ({"adv": True, "pgd_steps": 3}, ["adv", "pgd_steps"]),
    ({"arch_kwargs": {"channels": [4, 16], "hidden": 32, "kernel": 3}}, ["arch_kwargs"]),
])
def test_resume_refuses_changed_settings(mnist, trained, tmp_path, change, names):
    path = _copy(trained, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(train_mod.TrainError, match="--resume") as e:
        train_mod.train(train_mod.TrainConfig(**{**BASE, **change}, out=str(path), resume=True), dataset=mnist,
                        log=lambda *_: None)
    assert all(n in str(e.value) for n in names) and "\n" not in str(e.value)
    assert path.read_bytes() == before


def test_resume_with_changed_channels_on_the_command_line(capsys, trained, tmp_path):
    path = _copy(trained, tmp_path / "m.pt")
    args = ["train", "--act", "dqa2", "--hidden", "32", "--kernel", "3", "--n-train", "128", "--epochs", "2",
            "--out", str(path), "--resume"]
    err = _err(capsys, args + ["--channels", "4,16"])
    assert "arch_kwargs" in err and "size mismatch" not in err
    assert "lr 0.001 -> 0.01" in _err(capsys, args + ["--channels", "8,16", "--lr", "0.01"])
    before = path.read_bytes()
    assert main(args + ["--channels", "8,16"]) == 0  # the same settings: already finished, nothing to do
    out = capsys.readouterr().out
    assert "already trained for 2 epochs" in out and "wrote" not in out and path.read_bytes() == before


def test_resume_epochs(mnist, trained, tmp_path):
    path = _copy(trained, tmp_path / "m.pt")
    cfg = dict(BASE, out=str(path), resume=True)
    with pytest.raises(train_mod.TrainError, match="already trained for 2 epochs, more than --epochs 1"):
        train_mod.train(train_mod.TrainConfig(**{**cfg, "epochs": 1}), dataset=mnist, log=lambda *_: None)
    logs = []
    done = train_mod.train(train_mod.TrainConfig(**cfg), dataset=mnist, log=logs.append)
    assert "nothing to do" in logs[-1] and len(done.dqa_meta["history"]) == 2 and done.dqa_meta["epochs_run"] == 0
    more = train_mod.train(train_mod.TrainConfig(**{**cfg, "epochs": 3}), dataset=mnist, log=logs.append)
    assert [h["epoch"] for h in more.dqa_meta["history"]] == [1, 2, 3]
    ckpt = train_mod.read_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["meta"]["config"]["epochs"] == 3


def test_resume_cannot_stretch_an_sgd_schedule(mnist, tmp_path):
    path = tmp_path / "sgd.pt"
    cfg = dict(BASE, epochs=1, optimizer="sgd", out=str(path))
    train_mod.train(train_mod.TrainConfig(**cfg), dataset=mnist, log=lambda *_: None)
    with pytest.raises(train_mod.TrainError, match="cosine schedule over 1 epochs"):
        train_mod.train(train_mod.TrainConfig(**{**cfg, "epochs": 2}, resume=True), dataset=mnist, log=lambda *_: None)


def test_existing_checkpoint_needs_resume_or_force(capsys, mnist, trained, tmp_path):
    path = _copy(trained, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(train_mod.TrainError, match="already exists .*trained for 2 epoch.*--resume.*--force"):
        train_mod.train(train_mod.TrainConfig(**BASE, out=str(path)), dataset=mnist, log=lambda *_: None)
    assert "--force" in _err(capsys, ["train", "--out", str(path)] + TINY)
    assert path.read_bytes() == before
    model = train_mod.train(train_mod.TrainConfig(**{**BASE, "epochs": 1}, out=str(path), force=True), dataset=mnist,
                            log=lambda *_: None)
    assert len(model.dqa_meta["history"]) == 1 and train_mod.read_checkpoint(path)["epoch"] == 1


def test_checkpoints_are_saved_through_the_checked_atomic_writer():
    assert train_mod.save_atomic is importlib.import_module("dqa_ext.robust.outputs").save_torch_atomic


def test_a_dangling_symlink_never_creates_folders_at_its_target(outputs, capsys, tmp_path):
    """--out pointing (through a link) into a folder that does not exist is refused; nothing is created."""
    target = tmp_path / "nowhere" / "deeper"
    (tmp_path / "m.pt").symlink_to(target / "m.pt")
    (tmp_path / "via").symlink_to(target)
    for path in (tmp_path / "m.pt", tmp_path / "via" / "m.pt"):
        with pytest.raises(outputs.OutputError, match="symlink to .*does not exist"):
            outputs.write_bytes_atomic(path, b"x")
    assert "symlink to" in _err(capsys, ["train", "--out", str(tmp_path / "m.pt")] + TINY)
    assert not (tmp_path / "nowhere").exists()
    # A link to a new file in an existing folder is written through, like a shell's `>` does.
    (tmp_path / "real").mkdir()
    (tmp_path / "fresh.pt").symlink_to(tmp_path / "real" / "fresh.pt")
    outputs.write_bytes_atomic(tmp_path / "fresh.pt", b"new")
    assert (tmp_path / "real" / "fresh.pt").read_bytes() == b"new" and (tmp_path / "fresh.pt").is_symlink()


def test_ctrl_c_while_torch_writes_a_checkpoint_is_an_interrupt(outputs, tmp_path):
    """SIGINT arriving inside torch.save's C++ writer became a RuntimeError ("unexpected pos"), a
    traceback at the command line; it must end as KeyboardInterrupt with a whole checkpoint in place."""
    import signal
    import threading

    target = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1)}, target)
    big = {"w": torch.ones(40_000_000)}  # 160 MB: the write takes a while
    started = threading.Event()

    def writing():
        for p in tmp_path.iterdir():
            try:
                if p.name.endswith(".tmp") and p.stat().st_size > 1 << 20:
                    return True
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return False

    def interrupt_once_writing():
        while not started.is_set():
            if writing():
                started.set()
                os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_once_writing, daemon=True)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            outputs.save_torch_atomic(big, target)
    finally:
        started.set()
        watcher.join()
    saved = torch.load(target, weights_only=True)["w"]
    assert saved.shape in ((1,), (40_000_000,)) and _leftovers(tmp_path) == []
