"""Output paths are checked before any work and written atomically: never over anything but a regular
file, never creating folders at a dangling symlink's target, no temporary file left behind, and
Ctrl-C during a checkpoint write ends as an interrupt (the old checkpoint or the new one, whole)."""
import collections
import os
import signal
import stat

import pytest
import torch

from dqa_ext.robust import outputs
from support.robust import forbid_work, one_line_error

TINY = ["--channels", "8,16", "--hidden", "32", "--kernel", "3", "--n-train", "128", "--epochs", "1"]
ROOT = os.geteuid() == 0


@pytest.fixture
def no_work(monkeypatch):
    forbid_work(monkeypatch)


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


@pytest.mark.parametrize("name", BAD_OUT_NAMES)
def test_check_output_file_refuses(bad_outputs, tmp_path, name):
    with pytest.raises(outputs.OutputError, match="--out") as e:
        outputs.check_output_file(bad_outputs[name])
    assert "\n" not in str(e.value)
    _assert_untouched(tmp_path)


def test_check_output_file_accepts_files_and_creatable_paths(tmp_path):
    (tmp_path / "old.pt").write_bytes(b"x")
    for p in (tmp_path / "old.pt", tmp_path / "new.pt", tmp_path / "a" / "b" / "new.pt"):
        assert outputs.check_output_file(p) == p
    assert sorted(os.listdir(tmp_path)) == ["old.pt"]  # the check created nothing


@pytest.mark.skipif(ROOT, reason="root ignores permission bits; the /proc cases cover unwritable places")
def test_check_output_file_refuses_a_read_only_directory(tmp_path):
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


def test_check_output_dir(tmp_path):
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


def test_a_dangling_symlink_never_creates_folders_at_its_target(tmp_path, capsys):
    """--out pointing (through a link) into a folder that does not exist is refused; nothing is created."""
    target = tmp_path / "nowhere" / "deeper"
    (tmp_path / "m.pt").symlink_to(target / "m.pt")
    (tmp_path / "rep").symlink_to(target / "rep")
    (tmp_path / "via").symlink_to(target)
    for path in (tmp_path / "m.pt", tmp_path / "via" / "m.pt"):
        with pytest.raises(outputs.OutputError, match="symlink to .*does not exist"):
            outputs.write_bytes_atomic(path, b"x")
    assert "symlink to" in one_line_error(capsys, ["train", "--out", tmp_path / "m.pt"] + TINY)
    assert "symlink to" in one_line_error(capsys, ["attack", "x.pt", "--out", tmp_path / "rep"])
    assert "symlink to" in one_line_error(capsys, ["reproduce", "--out", tmp_path / "via" / "rep"])
    assert not (tmp_path / "nowhere").exists()
    # A link to a new file in an existing folder is written through, like a shell's `>` does.
    (tmp_path / "real").mkdir()
    (tmp_path / "fresh.pt").symlink_to(tmp_path / "real" / "fresh.pt")
    outputs.write_bytes_atomic(tmp_path / "fresh.pt", b"new")
    assert (tmp_path / "real" / "fresh.pt").read_bytes() == b"new" and (tmp_path / "fresh.pt").is_symlink()


def test_atomic_writes_replace_regular_files_only(tmp_path):
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


def test_new_file_mode_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    # os.umask(0) then os.umask(old) would change the umask of every thread for a moment.
    expected = 0o666 & ~_umask()

    def no_umask(mask):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", no_umask)
    outputs.write_bytes_atomic(tmp_path / "new.bin", b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "new.bin").st_mode) == expected


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status")
def test_new_file_mode_follows_a_later_umask_change(tmp_path):
    old = os.umask(0o077)
    try:
        outputs.write_bytes_atomic(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "private.bin").st_mode) == 0o600


def test_atomic_write_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
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
def test_atomic_write_cleans_up_on_any_error(tmp_path, exc):
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


def test_atomic_write_rechecks_the_target_before_renaming(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")
    with pytest.raises(outputs.OutputError, match="FIFO"):
        outputs.save_torch_atomic({"x": _BecomesFifo(target)}, target)
    assert stat.S_ISFIFO(os.stat(target).st_mode) and _leftovers(tmp_path) == []


def test_ctrl_c_while_torch_writes_a_checkpoint_is_an_interrupt(tmp_path):
    """A SIGINT inside torch.save (whose C++ writer would turn it into a RuntimeError, a traceback at
    the command line) is held: the write finishes, the new checkpoint is whole and in place, and the
    call ends as KeyboardInterrupt. The signal is sent from inside the save (while it pickles), so
    the test does not race the write."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited, e.g. by a shell's background job
        pytest.skip("SIGINT is ignored in this process: no Ctrl-C can arrive")

    class CtrlC:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGINT)
            return (collections.OrderedDict, ())  # loadable with weights_only

    target = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1)}, target)
    with pytest.raises(KeyboardInterrupt):
        outputs.save_torch_atomic({"w": torch.ones(1000), "ctrl_c": CtrlC()}, target)
    saved = torch.load(target, weights_only=True)
    assert saved["w"].shape == (1000,) and saved["ctrl_c"] == {} and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ --out on the command line
@pytest.mark.parametrize("name", BAD_OUT_NAMES)
def test_train_out_is_checked_before_any_work(capsys, no_work, bad_outputs, tmp_path, name):
    assert "--out" in one_line_error(capsys, ["train", "--out", bad_outputs[name]] + TINY)
    _assert_untouched(tmp_path)


@pytest.mark.parametrize("name", ["/dev/null", "fifo", "under a file", "under /proc"])
@pytest.mark.parametrize("command", [["attack", "x.pt"], ["reproduce", "--preset", "smoke"]])
def test_report_folders_are_checked_before_any_work(capsys, no_work, bad_outputs, tmp_path, name, command):
    assert "--out" in one_line_error(capsys, command + ["--out", bad_outputs[name]])
    _assert_untouched(tmp_path)


def test_report_folder_with_a_fifo_for_a_file(capsys, tmp_path):
    os.mkfifo(tmp_path / "report.md")
    (tmp_path / "results.json").write_text("{}")
    assert "report.md is a FIFO" in one_line_error(capsys, ["attack", "x.pt", "--out", tmp_path])
    assert "report.md is a FIFO" in one_line_error(capsys, ["reproduce", "--preset", "smoke", "--out", tmp_path])


def test_report_out_is_checked_before_rendering(capsys, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert "FIFO" in one_line_error(capsys, ["report", tmp_path, "--out", tmp_path / "fifo"])
    assert "a character device" in one_line_error(capsys, ["report", tmp_path, "--out", "/dev/null"])


def test_reproduce_refuses_existing_checkpoints_without_resume_or_force(capsys, no_work, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "relu-standard.pt").write_bytes(b"x")
    err = one_line_error(capsys, ["reproduce", "--preset", "smoke", "--out", tmp_path])
    assert "--resume" in err and "--force" in err
