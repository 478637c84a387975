"""Writing files so that a crash, a kill or a full disk never leaves a half-written one under the real name.

Everything minillm writes (weights, tokenizer, checkpoints, caches, indexes) goes through `atomic_path`:
write under a temporary name beside the target, flush it to the disk, rename it over the target, then
flush the folder, so that after a power loss the name points either at the old content or the new.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_name(path: Path) -> Path:
    """A temporary name beside `path`, unique per process so that concurrent writers never share one."""
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder and every file in it, to the disk."""
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                fsync_path(child)
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


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
        fsync_path(tmp)
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_path(path.parent)


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
