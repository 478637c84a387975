"""Datasets for pretraining and SFT, plus a packed token cache for large corpora.

Every dataset yields ``(X, Y, loss_mask)``: int64 input ids and next-token labels of length
``max_length - 1`` and a float32 mask (1 = learn this label, 0 = ignore), ready for
``MiniLLM(input_ids=X, labels=Y, loss_mask=loss_mask)``.

Input files are JSON lines; blank lines are skipped. Any malformed line raises :class:`DataError`
naming the file, the 1-based line number and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

if TYPE_CHECKING:
    from minillm.tokenizer import Tokenizer

__all__ = [
    "DataError",
    "PretrainDataset",
    "SFTDataset",
    "PackedDataset",
    "prepare_tokens",
    "packed_cache",
    "load_packed_header",
    "index_lines",
    "encode_chat",
    "check_vocab",
    "check_token_ids",
    "example_lengths",
    "group_by_length",
    "trim_padding",
]

_SCAN_CHUNK = 1 << 22  # 4 MiB per numpy pass while indexing
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
_IDX_MAGIC = b"MLIDX001"
_IDX_HEADER = struct.Struct("<8sqqq")  # magic, file size, mtime_ns, number of lines
_PACKED_FORMAT = "minillm-packed-v1"
_TEXT_EXPECTED = 'a "text" string, as in {"text": "..."}'


class DataError(ValueError):
    """Bad training data; the message names the file, the line and what was expected."""


# ---------------------------------------------------------------------------------------------
# Line index: byte offsets of the non-blank lines of a text file.


def _file_key(path: Path) -> tuple[int, int]:
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


def _tmp_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process so concurrent builders never share one."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename over ``path``."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:  # plain open: the file gets the usual umask permissions
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def index_lines(path: str | os.PathLike, cache: bool = True) -> np.ndarray:
    """Byte offsets of the non-blank lines of ``path``, cached beside it as ``<path>.idx``.

    The cache is keyed by the file's size and mtime and rebuilt when either changes; when the folder
    is not writable the index just stays in memory.
    """
    path = Path(path)
    size, mtime_ns = _file_key(path)
    idx_path = Path(str(path) + ".idx")
    if cache:
        offsets = _read_index(idx_path, size, mtime_ns)
        if offsets is not None:
            return offsets
    offsets = _scan_line_offsets(path)
    if cache and _file_key(path) == (size, mtime_ns):  # don't cache an index of a file being written
        header = _IDX_HEADER.pack(_IDX_MAGIC, size, mtime_ns, len(offsets))
        try:
            _write_atomic(idx_path, header + offsets.astype("<i8").tobytes())
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


class _Where:
    """Names file:line in error messages, counting lines only when a message is formatted."""

    def __init__(self, path: Path, offset: int, suffix: str = ""):
        self.path, self.offset, self.suffix = path, offset, suffix

    def __str__(self) -> str:
        return f"{self.path}:{_line_number(self.path, self.offset)}{self.suffix}"

    def sub(self, suffix: str) -> _Where:
        """The same place, narrowed to a part of the line (e.g. ": conversations[2]")."""
        return _Where(self.path, self.offset, self.suffix + suffix)


def _parse_line(raw: bytes, where: str | _Where) -> dict[str, Any]:
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


def _get_str(obj: dict, key: str, where: str | _Where, expected: str, default: str | None = None) -> str:
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


def iter_texts(path: str | os.PathLike, key: str = "text") -> Iterator[str]:
    """The `key` string of every non-blank line of a JSON-lines file; DataError with file:line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    expected = f'a "{key}" string, as in {{"{key}": "..."}}'
    found = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark is not part of the JSON
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            found = True
            yield _get_str(_parse_line(raw, where), key, where, expected)
    if not found:
        raise _empty_file_error(path)


def _empty_file_error(path: Path) -> DataError:
    size = path.stat().st_size
    if size == 0:
        return DataError(f"{path}:1: file is empty; expected JSON lines, one object per line")
    with open(path, "rb") as f:
        n_lines = sum(1 for _ in f)
    return DataError(
        f"{path}:{n_lines}: reached the end after only blank lines; expected at least one JSON object"
    )


class _JsonlLines:
    """Random access to the non-blank lines of a JSON-lines file without holding them in memory.

    The file handle is opened lazily and per process, so a DataLoader worker (fork or spawn) never
    shares a file position with its parent.
    """

    def __init__(self, path: str | os.PathLike, cache_index: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such data file")
        self.offsets = index_lines(self.path, cache=cache_index)
        if len(self.offsets) == 0:
            raise _empty_file_error(self.path)
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

    def where(self, i: int) -> _Where:
        return _Where(self.path, int(self.offsets[i]))

    def record(self, i: int) -> dict[str, Any]:
        """The parsed JSON object of non-blank line ``i``."""
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
        if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark is not part of the JSON
        return _parse_line(raw, self.where(i))


# ---------------------------------------------------------------------------------------------
# (X, Y, loss_mask) from token ids and a per-token learn mask.


def _make_example(
    ids: Sequence[int], learn: Sequence[int] | None, max_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncate/pad ``ids`` to max_length and shift; ``learn[j]`` says whether token j is a target.

    ``learn=None`` means every real token is learned. Padding is never learned; the mask comes from
    the true length, not from comparing with pad_id (pad_id may equal the end-of-text id).
    """
    n = min(len(ids), max_length)
    ids_T = torch.full((max_length,), pad_id, dtype=torch.long)
    ids_T[:n] = torch.as_tensor(ids[:n], dtype=torch.long)
    learn_T = torch.zeros(max_length, dtype=torch.float32)
    if learn is None:
        learn_T[:n] = 1.0
    else:
        learn_T[:n] = torch.as_tensor(learn[:n], dtype=torch.float32)
    return ids_T[:-1].clone(), ids_T[1:].clone(), learn_T[1:].clone()


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (one input and one label), got {max_length!r}")


class PretrainDataset(Dataset):
    """JSON lines with a "text" field -> (X, Y, loss_mask) of the text followed by <|endoftext|>.

    Construction only indexes line offsets (cached as ``<path>.idx``); each line is read, parsed and
    validated when accessed. Call :meth:`validate` to check the whole file up front.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, max_length: int = 512):
        _check_max_length(max_length)
        self.lines = _JsonlLines(path)
        self.path = self.lines.path
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def text(self, i: int) -> str:
        """The raw text of example ``i``."""
        obj = self.lines.record(i)
        return _get_str(obj, "text", self.lines.where(i), _TEXT_EXPECTED)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.tokenizer.encode(self.text(i))
        ids.append(self.tokenizer.eos_id)  # the closing end-of-text is a real, learned token
        return _make_example(ids, None, self.max_length, self.tokenizer.pad_id)

    def validate(self) -> int:
        """Parse every line (without tokenizing); raise DataError at the first bad one; return the count."""
        for i in range(len(self)):
            self.text(i)
        return len(self)


# ---------------------------------------------------------------------------------------------
# SFT: ChatML conversations with loss on the assistant replies only.

_ROLES = ("system", "user", "assistant")
_CONV_EXPECTED = (
    '{"conversations": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
)


def _messages_from_record(obj: dict, where: str | _Where, system_prompt: str | None) -> list[dict[str, str]]:
    """Normalise any accepted SFT line format to a list of {"role", "content"} messages."""
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        turns = obj[key]
        if not isinstance(turns, list) or not turns:
            raise DataError(
                f'{where}: field "{key}" must be a non-empty list of messages; expected {_CONV_EXPECTED}'
            )
        messages = []
        for k, turn in enumerate(turns):
            at = where.sub(f": {key}[{k}]") if isinstance(where, _Where) else f"{where}: {key}[{k}]"
            if not isinstance(turn, dict):
                raise DataError(
                    f'{at}: expected an object {{"role": ..., "content": ...}}, got {type(turn).__name__}'
                )
            role = _get_str(turn, "role", at, 'a "role" string')
            if role not in _ROLES:
                raise DataError(f"{at}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
            messages.append({"role": role, "content": _get_str(turn, "content", at, 'a "content" string')})
    elif "instruct" in obj or "instruction" in obj:
        prompt_key, answer_key = ("instruct", "label") if "instruct" in obj else ("instruction", "output")
        expected = f'{{"{prompt_key}": "...", "input": "...", "{answer_key}": "..."}}'
        prompt = _get_str(obj, prompt_key, where, expected)
        extra = _get_str(obj, "input", where, expected, default="")
        answer = _get_str(obj, answer_key, where, expected)
        # Instruction and input are separate paragraphs of one user turn.
        user = f"{prompt}\n{extra}" if prompt and extra else prompt + extra
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": _get_str(obj, "system", where, "a string")})
    else:
        raise DataError(
            f'{where}: no "conversations", "messages", "instruct" or "instruction" field; expected '
            f'{_CONV_EXPECTED} or {{"instruct": "...", "input": "...", "label": "..."}}'
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message; expected at least one reply to learn from")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, str]], cache: dict[str, list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """ChatML token ids of ``messages`` and a 0/1 mask that is 1 on assistant content and its <|im_end|>.

    Special tokens are split out before BPE, so encoding the text between them piece by piece gives
    ``tokenizer.encode(tokenizer.apply_chat_template(messages))``. System and user turns are encoded
    as one piece "{role}\\n{content}". An assistant turn is encoded as "assistant\\n" then its
    content, so the mask boundary is exact and the prompt tokens equal those of
    ``apply_chat_template(..., add_generation_prompt=True)`` used at generation. The one divergence
    from whole-string encoding: a reply starting with two or more whitespace characters, which BPE
    could merge with the header's "\\n"; the split used here is the one the model sees when it
    generates. ``cache`` memoises the repeated pieces ("assistant\\n", "\\n").
    """
    cache = {} if cache is None else cache

    def piece(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer.encode(text)
        return cache[text]

    start, end, newline = tokenizer.im_start_id, tokenizer.im_end_id, piece("\n")
    ids: list[int] = []
    learn: list[int] = []
    for m in messages:
        if m["role"] == "assistant":
            header, reply = piece("assistant\n"), tokenizer.encode(m["content"])
            ids += [start, *header, *reply, end, *newline]
            learn += [0] * (1 + len(header)) + [1] * (len(reply) + 1) + [0] * len(newline)
        else:
            turn = tokenizer.encode(f"{m['role']}\n{m['content']}")
            ids += [start, *turn, end, *newline]
            learn += [0] * (len(turn) + 2 + len(newline))
    return ids, learn


class SFTDataset(Dataset):
    """Chat/instruction JSON lines -> (X, Y, loss_mask) with loss only on what the assistant says.

    Accepted lines: {"conversations"|"messages": [{"role", "content"}, ...]},
    {"instruct", "input", "label"} and {"instruction", "input", "output"} (optional "system" field;
    user turn = instruction + "\\n" + input when both are non-empty). ``system_prompt`` is prepended
    to examples that have no system turn. Lines are validated when accessed; see :meth:`validate`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Tokenizer,
        max_length: int = 512,
        system_prompt: str | None = None,
    ):
        _check_max_length(max_length)
        self.lines = _JsonlLines(path)
        self.path = self.lines.path
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt
        self._pieces: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def messages(self, i: int) -> list[dict[str, str]]:
        """Example ``i`` as a list of {"role", "content"} messages."""
        return _messages_from_record(self.lines.record(i), self.lines.where(i), self.system_prompt)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, learn = encode_chat(self.tokenizer, self.messages(i), self._pieces)
        # Truncating ids and mask together keeps them aligned; a reply cut off entirely leaves an
        # all-zero mask, so the example adds no loss instead of a wrong one.
        return _make_example(ids, learn, self.max_length, self.tokenizer.pad_id)

    def validate(self) -> int:
        """Parse every line (without tokenizing); raise DataError at the first bad one; return the count."""
        for i in range(len(self)):
            self.messages(i)
        return len(self)


# ---------------------------------------------------------------------------------------------
# Packed token cache: one flat binary of token ids with a JSON header written last.


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _header_path(bin_path: Path) -> Path:
    return Path(str(bin_path) + ".json")


def prepare_tokens(
    jsonl_path: str | os.PathLike,
    tokenizer: Tokenizer,
    out_path: str | os.PathLike,
    chunk_size: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every "text" of ``jsonl_path`` into a flat binary ``out_path``; return its header.

    Each document is followed by <|endoftext|>. Token ids are uint16 when the vocabulary fits, else
    uint32. The binary is written as ``<out_path>.<pid>.tmp`` and renamed; the JSON header
    ``<out_path>.json`` is written last, so an interrupted or failed build never looks complete.
    """
    src, out = Path(jsonl_path), Path(out_path)
    header_path = _header_path(out)
    dtype = _token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    size_before, mtime_before = _file_key(src)
    hasher = hashlib.sha256()
    n_tokens = n_docs = n_chars = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    header_path.unlink(missing_ok=True)  # the old header must not vouch for the new binary
    tmp = _tmp_name(out)
    try:
        with (
            open(src, "rb") as f,
            open(tmp, "wb") as w,
            tqdm(
                total=size_before,
                unit="B",
                unit_scale=True,
                desc=f"tokenizing {src.name}",
                disable=not progress,
            ) as bar,
        ):
            texts: list[str] = []

            def flush() -> None:
                nonlocal n_tokens
                flat: list[int] = []
                for ids in tokenizer.encode_batch(texts):
                    flat += ids
                    flat.append(eos)
                np.asarray(flat, dtype=dtype).tofile(w)  # one write per chunk
                n_tokens += len(flat)
                texts.clear()

            for lineno, raw in enumerate(f, start=1):
                hasher.update(raw)
                bar.update(len(raw))
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                where = f"{src}:{lineno}"
                text = _get_str(_parse_line(raw, where), "text", where, _TEXT_EXPECTED)
                texts.append(text)
                n_docs += 1
                n_chars += len(text)
                if len(texts) >= chunk_size:
                    flush()
            flush()
        if n_docs == 0:
            raise _empty_file_error(src)
        if _file_key(src) != (size_before, mtime_before):
            raise DataError(f"{src}: file changed while it was being tokenized; run again")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    header = {
        "format": _PACKED_FORMAT,
        "n_tokens": n_tokens,
        "n_documents": n_docs,
        "n_chars": n_chars,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": eos,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "source": {
            "path": str(src),
            "size": size_before,
            "mtime_ns": mtime_before,
            "sha256": hasher.hexdigest(),
        },
    }
    _write_atomic(header_path, json.dumps(header, indent=2).encode("utf-8"))
    return header


def load_packed_header(bin_path: str | os.PathLike) -> dict[str, Any]:
    """The header of a complete packed cache; DataError if it is missing, damaged or mismatched."""
    bin_path = Path(bin_path)
    header_path = _header_path(bin_path)
    if not header_path.is_file():
        raise DataError(
            f"{bin_path}: no header {header_path.name}; the cache is incomplete, rebuild it with prepare_tokens"
        )
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{header_path}: damaged header ({e}); rebuild it with prepare_tokens") from None
    if not isinstance(header, dict) or header.get("format") != _PACKED_FORMAT:
        raise DataError(f"{header_path}: expected a {_PACKED_FORMAT} header; rebuild it with prepare_tokens")
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: missing token file for header {header_path.name}")
    expected = header["n_tokens"] * np.dtype(header["dtype"]).itemsize
    if bin_path.stat().st_size != expected:
        raise DataError(
            f"{bin_path}: holds {bin_path.stat().st_size} bytes but the header promises {expected}; rebuild it"
        )
    return header


def _cache_is_fresh(bin_path: Path, src: Path, tokenizer: Tokenizer) -> bool:
    try:
        header = load_packed_header(bin_path)
    except DataError:
        return False
    if header.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        return False
    source = header.get("source", {})
    size, mtime_ns = _file_key(src)
    if source.get("size") != size:
        return False
    # Same size and mtime: unchanged. Same size, new mtime (e.g. touched or copied): compare contents.
    return source.get("mtime_ns") == mtime_ns or source.get("sha256") == _sha256(src)


def packed_cache(
    jsonl_path: str | os.PathLike,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
    chunk_size: int = 1024,
    progress: bool = True,
) -> Path:
    """Path of an up-to-date packed cache of ``jsonl_path``, rebuilt only if source or tokenizer changed.

    The cache is ``<cache_dir>/<stem>.tokens.bin`` (+ ``.json`` header); cache_dir defaults to the
    source file's folder.
    """
    src = Path(jsonl_path)
    folder = Path(cache_dir) if cache_dir is not None else src.parent
    bin_path = folder / f"{src.stem}.tokens.bin"
    if not _cache_is_fresh(bin_path, src, tokenizer):
        prepare_tokens(src, tokenizer, bin_path, chunk_size=chunk_size, progress=progress)
    return bin_path


class PackedDataset(Dataset):
    """Contiguous, non-overlapping blocks of a packed token cache; every position is learned.

    Block i covers tokens [i*(L-1), i*(L-1) + L) with L = max_length: X is its first L-1 tokens and Y
    the last L-1, so the X blocks tile the token stream and each Y continues it by one token.
    """

    def __init__(self, bin_path: str | os.PathLike, max_length: int = 512):
        _check_max_length(max_length)
        self.bin_path = Path(bin_path)
        self.header = load_packed_header(self.bin_path)
        self.max_length = max_length
        self.n_tokens = int(self.header["n_tokens"])
        self.dtype = np.dtype(self.header["dtype"])
        self._len = (self.n_tokens - 1) // (max_length - 1)
        if self._len == 0:
            raise DataError(
                f"{self.bin_path}: {self.n_tokens} tokens are too few for one block of max_length={max_length}"
            )
        self._tokens = None
        self._pid = None

    def __len__(self) -> int:
        return self._len

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokens"], state["_pid"] = None, None  # workers map the file themselves
        return state

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream, memory-mapped read-only."""
        if self._tokens is None or self._pid != os.getpid():
            self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
            self._pid = os.getpid()
        return self._tokens

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"block {i} out of range for {self._len} blocks")
        step = self.max_length - 1
        block_T = torch.from_numpy(self.tokens[i * step : i * step + self.max_length].astype(np.int64))
        return block_T[:-1], block_T[1:], torch.ones(step, dtype=torch.float32)

    def max_token_id(self) -> int:
        """Largest token id in the cache (a full scan of the memory map)."""
        return int(self.tokens.max())


# ---------------------------------------------------------------------------------------------
# Batching helpers: spend less compute on padding, exactly.


def example_lengths(dataset: Dataset) -> list[int]:
    """Per example, the number of positions up to and including its last learned label (one full pass)."""
    lengths = []
    for i in range(len(dataset)):
        learned = dataset[i][2].nonzero()
        lengths.append(int(learned[-1]) + 1 if len(learned) else 1)
    return lengths


def group_by_length(order: Sequence[int], lengths: Sequence[int], batch_size: int, window_batches: int = 64,
                    seed: int = 0) -> list[int]:
    """Reorder `order` so each batch holds examples of similar length, keeping the shuffle's randomness.

    Windows of `window_batches` batches are sorted by length and cut into batches; the batches of a window
    are then shuffled (seeded), so consecutive steps don't go from short to long. Deterministic for a seed.
    """
    g = torch.Generator().manual_seed(seed)
    window = batch_size * window_batches
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches = [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        for k in torch.randperm(len(full), generator=g).tolist():
            out.extend(full[k])
        out.extend(i for b in batches if len(b) < batch_size for i in b)
    return out


def trim_padding(x_BT: torch.Tensor, y_BT: torch.Tensor, mask_BT: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop trailing columns that no row learns from; exact, as causal attention never looks ahead."""
    learned = mask_BT.any(dim=0).nonzero()
    n = int(learned[-1]) + 1 if len(learned) else 1
    return x_BT[:, :n], y_BT[:, :n], mask_BT[:, :n]


# ---------------------------------------------------------------------------------------------
# Vocabulary guards: catch ids the embedding table cannot hold before the forward pass.


def check_vocab(source: Any, model_vocab_size: int) -> None:
    """Raise ValueError if ``source`` (a tokenizer, a dataset or an int) has more tokens than the model."""
    n = source if isinstance(source, int) else int(source.vocab_size)
    if n > model_vocab_size:
        what = type(source).__name__ if isinstance(source, Dataset) else "tokenizer"
        raise ValueError(
            f"{what} has {n} tokens but the model's vocab_size is {model_vocab_size}; "
            f"ids >= {model_vocab_size} would index past the embedding table. "
            f"Build the model with vocab_size >= {n}."
        )


def check_token_ids(ids: torch.Tensor | np.ndarray, vocab_size: int, name: str = "input_ids") -> None:
    """Raise ValueError naming the first token id outside [0, vocab_size)."""
    t = torch.from_numpy(ids.astype(np.int64)) if isinstance(ids, np.ndarray) else ids.long()
    if t.numel() == 0:
        return
    bad = (t < 0) | (t >= vocab_size)
    if bool(bad.any()):
        pos = tuple(int(p) for p in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} holds token id {int(t[pos])} at position {pos}, outside the model's vocabulary "
            f"[0, {vocab_size}); the data was tokenized with a different or larger tokenizer"
        )
