"""Output paths checked before any work, and files written atomically.

A run that trains for an hour must not find out at the end that ``--out`` is a directory, a device
or an unwritable place, and an atomic rename must never go over something that is not a regular file
(as root, ``os.replace(tmp, "/dev/full")`` replaces the device node). So every command checks its
output paths first (``check_output_file`` / ``check_output_dir``), and every write goes through a
temporary file in the same folder that is removed on any error. A symlink whose target does not
exist is followed only into an existing folder: no folder is ever created at a link's target.
Ctrl-C during a write is held until the write is done or undone (torch.save turns an interrupt
inside its C++ writer into a RuntimeError), then raised.
"""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path

from .errors import UserError


class OutputError(UserError):
    """An output path that cannot or must not be written."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _file_parent(path: Path) -> str:
    """The ancestor of ``path`` that is a file (why stat said "not a directory")."""
    for parent in reversed(path.parents):
        if os.path.exists(parent) and not os.path.isdir(parent):
            return str(parent)
    return "a parent of it"


def _stat(path: Path, what: str):
    """os.stat (following symlinks), or None when nothing (or a dangling symlink) is there."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise OutputError(f"{what} {path}: {_file_parent(path)} is a file, not a directory") from None
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot inspect it ({e.strerror})") from None


def _writable_dir(folder: Path, what: str, target: Path) -> None:
    """``folder`` must be a directory we can create files in. access() is not enough (root passes it
    for /proc and /sys), so a probe file is created and removed at once."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {target}: directory {folder} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dqa-probe.", dir=folder)
    except OSError as e:
        raise OutputError(f"{what} {target}: cannot create files in {folder} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _dangling(path: Path, what: str, target: Path) -> None:
    """A symlink to nothing: refused where we would have to create folders at its target."""
    if os.path.islink(path) and not os.path.exists(path):
        dest = os.path.realpath(path)
        raise OutputError(f"{what} {target}: {path} is a symlink to {dest}, which does not exist")


def _nearest_existing(path: Path, what: str, target: Path) -> Path:
    """The closest ancestor of ``path`` that exists; it must be a directory (we would create the rest)."""
    for parent in path.parents:
        st = _stat(parent, what)
        if st is None:
            _dangling(parent, what, target)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {target}: {parent} is {_kind(st.st_mode)}, not a directory")
        return parent
    return Path(".")


def _check_file(path: Path, what: str, target: Path) -> None:
    st = _stat(path, what)
    if st is None and os.path.islink(path) and not Path(os.path.realpath(path)).parent.is_dir():
        _dangling(path, what, target)  # writing it would need folders at the link's target
    if st is not None and not stat.S_ISREG(st.st_mode):
        link = " (through a symlink)" if path.is_symlink() else ""
        raise OutputError(f"{what} {target}: it is {_kind(st.st_mode)}{link}; expected a regular file "
                          "or a new file in a writable directory")
    parent = _nearest_existing(path, what, target)
    _writable_dir(parent, what, target)


def check_output_file(path, *, what: str = "--out") -> Path:
    """``path`` may be written: an existing regular file, or a new file whose folder exists or can be
    created, in a writable directory. Raises OutputError (one line) otherwise. Creates no folder and
    leaves no file behind (writability is tested with a probe file that is removed at once)."""
    if path is None or str(path) == "":
        raise OutputError(f"{what}: expected a file path, got {path!r}")
    p = Path(path)
    _check_file(p, what, p)
    return p


def check_output_dir(path, names=(), *, what: str = "--out") -> Path:
    """``path`` is (or can be created as) a writable directory, and each of ``names`` inside it is absent
    or a regular file (a name ending in "/" is a subfolder: absent or a directory). Like
    check_output_file, it creates no folder and leaves no file behind."""
    if path is None or str(path) == "":
        raise OutputError(f"{what}: expected a directory path, got {path!r}")
    p = Path(path)
    st = _stat(p, what)
    if st is None:
        _dangling(p, what, p)
        _writable_dir(_nearest_existing(p, what, p), what, p)
    elif not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {p}: it is {_kind(st.st_mode)}, expected a directory")
    else:
        _writable_dir(p, what, p)
    for name in names:
        sub = p / name
        if name.endswith("/"):
            sst = _stat(sub, what)
            if sst is None:
                _dangling(sub, what, p)
            elif not stat.S_ISDIR(sst.st_mode):
                raise OutputError(f"{what} {p}: {sub} is {_kind(sst.st_mode)}, expected a directory")
        else:
            sst = _stat(sub, what)
            if sst is not None and not stat.S_ISREG(sst.st_mode):
                raise OutputError(f"{what} {p}: {sub} is {_kind(sst.st_mode)}; expected a regular file "
                                  "(it will be overwritten)")
    return p


def _proc_umask() -> int | None:
    """The umask from /proc/self/status (Linux 4.7+), or None where it is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    # os.umask can only be read by setting it, which changes it for every thread for a moment:
    # done once, at import, and only where /proc does not say.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_IMPORT_UMASK = _proc_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_by_setting()


def _current_umask() -> int:
    umask = _proc_umask()
    return _IMPORT_UMASK if umask is None else umask


def _default_mode(path: Path) -> int:
    """Keep an existing file's permissions; a new one gets 0o666 minus the umask (mkstemp uses 0o600)."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_current_umask()


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C (SIGINT) waits until the block ends, then is raised; only in the main thread, and
    only when Python's default handler is in place."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _write_atomic(path, write, what: str) -> Path:
    path = check_output_file(path, what=what)
    # os.replace onto a symlink would replace the link, not the file it points to: write next to
    # the real file (checked like the path itself) and replace that.
    real = Path(os.path.realpath(path))
    if real != path.absolute():
        _check_file(real, what, path)
    # The folders of the path as given (through symlinked folders, not at a dangling link's target).
    path.parent.mkdir(parents=True, exist_ok=True)
    with _interrupts_held():
        _replace_with(real, write, what, path)
    return path


def _replace_with(real: Path, write, what: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(real))
        # Re-check just before the rename: the target may have changed while we wrote.
        st = _stat(real, what)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {path}: it became {_kind(st.st_mode)} while writing; not replaced")
        os.replace(tmp, real)
    except BaseException:  # KeyboardInterrupt included: never leave a temporary file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes_atomic(path, data: bytes, *, what: str = "--out") -> Path:
    return _write_atomic(path, lambda f: f.write(data), what)


def write_text_atomic(path, text: str, *, what: str = "--out", encoding: str = "utf-8") -> Path:
    return _write_atomic(path, lambda f: f.write(text.encode(encoding)), what)


def save_torch_atomic(obj, path, *, what: str = "--out") -> Path:
    """torch.save through a temporary file: a crash or Ctrl-C never leaves half a checkpoint."""
    import torch

    return _write_atomic(path, lambda f: torch.save(obj, f), what)
