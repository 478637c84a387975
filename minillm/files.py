"""Writing files so that a crash, a kill or a full disk never leaves a half-written one under the real name.

Everything minillm writes (weights, tokenizer, checkpoints, caches, indexes) goes through `atomic_path`:
write under a temporary name beside the target, flush it to the disk, rename it over the target, then
flush the folder, so that after a power loss the name points either at the old content or the new.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tmp_name(path: Path) -> Path:
    """A temporary name beside `path`, unique per process so that concurrent writers never share one."""
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync(path: Path, folder: bool) -> None:
    """fsync one file, or one folder's own entries (not the files in it)."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder and everything below it (what atomic_path just wrote), to the disk."""
    if path.is_dir():
        for child in path.iterdir():
            fsync_path(child)
        _fsync(path, folder=True)
    elif path.is_file():
        _fsync(path, folder=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """Give a file (or a folder and its files) the permissions a plain open() would: 0644 under umask 022.

    Some writers (safetensors) create their files 0600; what minillm writes is meant to be shared.
    """
    mask = _umask()
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                os.chmod(child, 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """Delete the `<name>.<pid>.tmp` files and folders of processes that no longer run; returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f"{glob.escape(name) if name != '*' else name}.*{TMP_SUFFIX}"):
        pid = path.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            remove(path)
            removed.append(path)
    return removed


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file (or a whole folder) to; on success it replaces `path`.

    On any exception the temporary is deleted and `path` is left as it was.
    """
    path = Path(path)
    tmp = tmp_name(path)
    remove(tmp)
    try:
        yield tmp
        set_default_mode(tmp)
        fsync_path(tmp)
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    # The rename itself: only the folder's entries. Its other files may belong to concurrent writers
    # (other ranks, tokenizer workers) and may vanish at any moment.
    _fsync(path.parent, folder=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically, with the usual umask permissions."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)


def read_json(path: str | os.PathLike) -> object:
    """Parse a JSON file; ValueError naming the file (and where) when it is not valid JSON or UTF-8."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as indented JSON (non-ASCII kept as is), atomically."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def check_writable(folder: Path, what: str) -> None:
    """OSError naming `what` unless `folder` could be created and written; creates nothing.

    The probe file goes into `folder`, or into its nearest existing ancestor when it does not exist yet.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f": {existing}"
        raise NotADirectoryError(f"{what} {folder}{where} is a file, not a folder")
    try:
        probe = tmp_name(existing / ".write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to {what} {folder}: {e.strerror or e}") from None


class DirLock:
    """An exclusive lock on a folder for one process (flock on <folder>/.lock, holding the owner's pid).

    The kernel releases it when the process ends in any way, kill -9 included, so a stale lock never
    blocks the next run; a second live holder is refused with the first one's pid.
    """

    NAME = ".lock"

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def __enter__(self) -> DirLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"{self.path.parent} is in use by another run (pid {holder}); wait for it to "
                               "finish, or give this run another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
