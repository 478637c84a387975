"""The packed token cache: a corpus tokenized once into one flat binary of ids, and PackedDataset over it.

``<stem>.tokens.bin`` holds every document's ids followed by <|endoftext|> (uint16 when the vocabulary
fits, else uint32); ``<stem>.tokens.bin.json``, written last, is its header: token count, dtype, the
tokenizer's fingerprint and the source file's size, mtime and sha256. A cache is rebuilt when the source
or the tokenizer changes, and a build that did not finish never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from minillm.data.copying import copy_block
from minillm.data.datasets import check_max_length
from minillm.data.jsonl import DataError, file_key, get_str, iter_records, text_expected
from minillm.data.shards import INDEX_NAME, TokenShards, token_dtype, write_documents
from minillm.files import atomic_path, atomic_write, remove_stale_temporaries, sha256_file

if TYPE_CHECKING:
    from minillm.data.tokenizer import Tokenizer

__all__ = ["PackedDataset", "load_packed_header", "packed_cache", "prepare_tokens"]

# v2: special-token strings inside texts are encoded as plain text (v1 turned them into control tokens).
_PACKED_FORMAT = "minillm-packed-v2"


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
    uint32. Special-token strings in a text stay plain text. The binary is written under a temporary
    name and renamed; the JSON header ``<out_path>.json`` is written last, so an interrupted or failed
    build never looks complete.
    """
    src, out = Path(jsonl_path), Path(out_path)
    header_path = _header_path(out)
    dtype = token_dtype(tokenizer.vocab_size)
    size_before, mtime_before = file_key(src)
    hasher = hashlib.sha256()
    n_tokens = n_docs = n_chars = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    header_path.unlink(missing_ok=True)  # the old header must not vouch for the new binary
    bar = tqdm(total=size_before, unit="B", unit_scale=True, desc=f"tokenizing {src.name}", disable=not progress)

    def seen(raw: bytes) -> None:
        hasher.update(raw)
        bar.update(len(raw))

    with bar, atomic_path(out) as tmp, open(tmp, "wb") as w:
        texts: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            n_tokens += write_documents(tokenizer, texts, dtype, w)
            texts.clear()

        for where, obj in iter_records(src, on_line=seen):
            text = get_str(obj, "text", where, text_expected("text"))
            texts.append(text)
            n_docs += 1
            n_chars += len(text)
            if len(texts) >= chunk_size:
                flush()
        flush()
        if file_key(src) != (size_before, mtime_before):
            raise DataError(f"{src}: file changed while it was being tokenized; run again")
    header = {
        "format": _PACKED_FORMAT,
        "n_tokens": n_tokens,
        "n_documents": n_docs,
        "n_chars": n_chars,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "source": {
            "path": str(src),
            "size": size_before,
            "mtime_ns": mtime_before,
            "sha256": hasher.hexdigest(),
        },
    }
    atomic_write(header_path, json.dumps(header, indent=2))
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
    size, mtime_ns = file_key(src)
    if source.get("size") != size:
        return False
    # Same size and mtime: unchanged. Same size, new mtime (e.g. touched or copied): compare contents.
    return source.get("mtime_ns") == mtime_ns or source.get("sha256") == sha256_file(src)


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
    remove_stale_temporaries(folder)  # what builds killed with -9 left behind
    if not _cache_is_fresh(bin_path, src, tokenizer):
        prepare_tokens(src, tokenizer, bin_path, chunk_size=chunk_size, progress=progress)
    return bin_path


class PackedDataset(Dataset):
    """Contiguous, non-overlapping blocks of a packed token cache; every position is learned.

    Block i covers tokens [i*(L-1), i*(L-1) + L) with L = max_length: X is its first L-1 tokens and Y
    the last L-1, so the X blocks tile the token stream and each Y continues it by one token. With
    copy_share > 0, copy blocks (copying.py) follow the corpus's blocks, so that they make that share of
    the examples; copy block k is built from corpus block k mod (corpus blocks).
    """

    all_learned = True  # every corpus position is a label, and every copy block has some: nothing to count

    def __init__(self, bin_path: str | os.PathLike, max_length: int = 512, copy_share: float = 0.0):
        check_max_length(max_length)
        if not 0.0 <= copy_share < 1.0:
            raise ValueError(f"copy_share must be in [0, 1), got {copy_share}")
        self.bin_path = Path(bin_path)
        # A shard index (shards.py) or a single-file cache: one token stream either way.
        self.shards = TokenShards(self.bin_path) if self.bin_path.name == INDEX_NAME else None
        self.header = self.shards.header if self.shards else load_packed_header(self.bin_path)
        self.max_length = max_length
        self.n_tokens = int(self.header["n_tokens"])
        self.dtype = self.shards.dtype if self.shards else np.dtype(self.header["dtype"])
        self.blocks = (self.n_tokens - 1) // (max_length - 1)
        if self.blocks <= 0:
            raise DataError(f"{self.bin_path}: {self.n_tokens} tokens are too few for one block of "
                            f"max_length={max_length}: nothing to learn (are the data files empty?)")
        self.copy_share = copy_share
        self.copy_blocks = round(self.blocks * copy_share / (1.0 - copy_share))
        self._len = self.blocks + self.copy_blocks
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
        a = (i % self.blocks) * step
        block = self.shards.slice(a, a + self.max_length) if self.shards else self.tokens[a:a + self.max_length]
        if i >= self.blocks:
            ids, mask = copy_block(block, i - self.blocks)
            block_T = torch.from_numpy(ids.astype(np.int64))
            return block_T[:-1], block_T[1:], torch.from_numpy(mask[1:])
        block_T = torch.from_numpy(block.astype(np.int64))
        return block_T[:-1], block_T[1:], torch.ones(step, dtype=torch.float32)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must train on again: the same token stream, cut into the same blocks."""
        sha = self.header["sha256"] if self.shards else self.header["source"]["sha256"]
        identity = {"kind": type(self).__name__, "examples": len(self), "max_length": self.max_length,
                    "sha256": sha, "tokens": self.n_tokens}
        return {**identity, "copy_share": self.copy_share} if self.copy_share else identity

    def max_token_id(self) -> int:
        """Largest token id in the cache (a full scan of the memory maps)."""
        return self.shards.max_id() if self.shards else int(self.tokens.max())


