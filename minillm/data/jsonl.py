"""JSON lines: a cached index of line offsets, parsing with errors that name file:line, text iteration.

No torch and no tokenizer here: the datasets, the packed cache, evaluation and tokenizer training all read
their files through this module. Blank lines are skipped and a UTF-8 byte-order mark is ignored; any
malformed line raises DataError naming the file, the 1-based line number and what was expected.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minillm.files import atomic_write

__all__ = ["DataError", "JsonLines", "Where", "empty_file_error", "get_str", "index_lines", "iter_records",
           "iter_texts", "parse_line"]

_SCAN_CHUNK = 1 << 22  # 4 MiB per numpy pass while indexing
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
_IDX_MAGIC = b"MLIDX001"
_IDX_HEADER = struct.Struct("<8sqqq")  # magic, file size, mtime_ns, number of lines
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad training data; the message names the file, the line and what was expected."""


# ---------------------------------------------------------------------------------------------
# Line index: byte offsets of the non-blank lines of a text file.


def file_key(path: Path) -> tuple[int, int]:
    """(size, mtime in ns): what says a file changed."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _scan_line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of every line that holds a non-whitespace byte, in one streaming numpy pass."""
    parts: list[np.ndarray] = []
    base = 0  # file offset of buf[0]
    carry = b""  # an incomplete last line carried into the next chunk
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            data = carry + chunk if carry else chunk
            if not data:
                break
            # Only complete lines are scanned; at EOF the last line need not end in "\n".
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            if cut == 0:
                carry = data
                continue
            block = np.frombuffer(data, dtype=np.uint8, count=cut)
            starts = np.concatenate(([0], np.flatnonzero(block == 10) + 1))
            starts = starts[starts < cut]
            # A line is non-blank iff its [start, next start) span holds a non-whitespace byte. Spans are
            # never empty (each holds at least its "\n" or one byte), as reduceat requires.
            nonblank = np.logical_or.reduceat(~_WHITESPACE[block], starts)
            parts.append(starts[nonblank] + base)
            base += cut
            carry = data[cut:]
            if not chunk:
                break
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _read_index(idx_path: Path, size: int, mtime_ns: int) -> np.ndarray | None:
    """The cached offsets if the cache matches the file's size and mtime and is well formed."""
    try:
        raw = idx_path.read_bytes()
    except OSError:
        return None
    if len(raw) < _IDX_HEADER.size:
        return None
    magic, c_size, c_mtime, n = _IDX_HEADER.unpack_from(raw)
    if magic != _IDX_MAGIC or c_size != size or c_mtime != mtime_ns or n < 0:
        return None
    if len(raw) != _IDX_HEADER.size + 8 * n:
        return None
    offsets = np.frombuffer(raw, dtype="<i8", offset=_IDX_HEADER.size).astype(np.int64)
    if n and (offsets[0] < 0 or offsets[-1] >= size or np.any(np.diff(offsets) <= 0)):
        return None
    return offsets


def index_lines(path: str | os.PathLike, cache: bool = True) -> np.ndarray:
    """Byte offsets of the non-blank lines of ``path``, cached beside it as ``<path>.idx``.

    The cache is keyed by the file's size and mtime and rebuilt when either changes; when the folder
    is not writable the index just stays in memory.
    """
    path = Path(path)
    size, mtime_ns = file_key(path)
    idx_path = Path(str(path) + ".idx")
    if cache:
        offsets = _read_index(idx_path, size, mtime_ns)
        if offsets is not None:
            return offsets
    offsets = _scan_line_offsets(path)
    if cache and file_key(path) == (size, mtime_ns):  # don't cache an index of a file being written
        header = _IDX_HEADER.pack(_IDX_MAGIC, size, mtime_ns, len(offsets))
        try:
            atomic_write(idx_path, header + offsets.astype("<i8").tobytes())
        except OSError:
            pass  # read-only folder: keep the index in memory only
    return offsets


# ---------------------------------------------------------------------------------------------
# Parsing one JSON line with errors that say where and what.


def _line_number(path: Path, offset: int) -> int:
    """1-based line number of the byte at ``offset`` (only computed on the error path)."""
    count, done = 0, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(_SCAN_CHUNK, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count + 1


class Where:
    """Names file:line in error messages, counting lines only when a message is formatted."""

    def __init__(self, path: Path, offset: int, suffix: str = "") -> None:
        self.path, self.offset, self.suffix = path, offset, suffix

    def __str__(self) -> str:
        return f"{self.path}:{_line_number(self.path, self.offset)}{self.suffix}"

    def sub(self, suffix: str) -> Where:
        """The same place, narrowed to a part of the line (e.g. ": conversations[2]")."""
        return Where(self.path, self.offset, self.suffix + suffix)


def parse_line(raw: bytes, where: str | Where) -> dict[str, Any]:
    """Decode one raw line as a JSON object; ``where`` names file and line in error messages."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: invalid UTF-8 at byte {e.start} of the line; expected UTF-8 text"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    return obj


def get_str(obj: dict, key: str, where: str | Where, expected: str, default: str | None = None) -> str:
    """``obj[key]`` checked to be a string of valid Unicode."""
    if key not in obj:
        if default is not None:
            return default
        raise DataError(f'{where}: missing field "{key}"; expected {expected}')
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" holds {type(value).__name__}; expected {expected}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON "\ud800"-style escapes decode to lone surrogates that no tokenizer can take.
        raise DataError(
            f'{where}: field "{key}" holds an unpaired surrogate escape; expected valid Unicode'
        ) from None
    return value




def iter_records(path: str | os.PathLike, on_line: Callable[[bytes], None] | None = None
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", parsed object) of every non-blank line, in order.

    `on_line` sees every raw line, blank ones included (for hashing or a progress bar). DataError at the
    first malformed line, or when the file holds no record at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    found = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if on_line is not None:
                on_line(raw)
            if lineno == 1:
                raw = raw.removeprefix(_BOM)  # a byte-order mark is not part of the JSON
            if not raw.strip():
                continue
            found = True
            where = f"{path}:{lineno}"
            yield where, parse_line(raw, where)
    if not found:
        raise empty_file_error(path)


def text_expected(key: str) -> str:
    """What a text record looks like, for error messages."""
    return f'a "{key}" string, as in {{"{key}": "..."}}'


def iter_texts(path: str | os.PathLike, key: str = "text") -> Iterator[str]:
    """The `key` string of every non-blank line of a JSON-lines file; DataError with file:line on bad input."""
    for where, obj in iter_records(path):
        yield get_str(obj, key, where, text_expected(key))


def empty_file_error(path: Path) -> DataError:
    """The error for a file with no record: empty, or blank lines only."""
    size = path.stat().st_size
    if size == 0:
        return DataError(f"{path}:1: file is empty; expected JSON lines, one object per line")
    with open(path, "rb") as f:
        n_lines = sum(1 for _ in f)
    return DataError(
        f"{path}:{n_lines}: reached the end after only blank lines; expected at least one JSON object"
    )


class JsonLines:
    """Random access to the non-blank lines of a JSON-lines file without holding them in memory.

    The file handle is opened lazily and per process, so a DataLoader worker (fork or spawn) never
    shares a file position with its parent.
    """

    def __init__(self, path: str | os.PathLike, cache_index: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such data file")
        self.offsets = index_lines(self.path, cache=cache_index)
        if len(self.offsets) == 0:
            raise empty_file_error(self.path)
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, None
        return state

    def _handle(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")  # kept open for the dataset's lifetime
            self._pid = os.getpid()
        return self._fh

    def where(self, i: int) -> Where:
        """The file and line of record `i`, for error messages."""
        return Where(self.path, int(self.offsets[i]))

    def record(self, i: int) -> dict[str, Any]:
        """The parsed JSON object of non-blank line `i`."""
        offset = int(self.offsets[i])
        f = self._handle()
        if offset > 0:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                raise DataError(
                    f"{self.path}: line index is stale (file changed while in use); reopen the dataset"
                )
        else:
            f.seek(0)
        raw = f.readline()
        if offset == 0:
            raw = raw.removeprefix(_BOM)
        return parse_line(raw, self.where(i))
