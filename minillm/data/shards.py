"""A corpus larger than memory: many files, tokenized by several processes into the shards of a packed cache.

`--data_path` may name one file, a directory (every .jsonl, .jsonl.gz and .txt below it, sorted by path)
or a glob. The corpus is cut into shards: a .jsonl or .txt file into line-aligned byte ranges of about
`shard_bytes`, a .jsonl.gz file whole. Worker processes tokenize shards in parallel, streaming a chunk of
documents at a time, so resident memory stays flat in the corpus size. Each shard is written under a
temporary name and renamed, then its small header; index.json, written last, lists the shards in corpus
order. A build that stopped half-way keeps its finished shards, and the next run builds only the rest.
Training reads the shards through memory maps as one token stream (TokenShards).

Documents: a .jsonl line's "text", or a non-blank .txt line; each is followed by <|endoftext|>, exactly as
in the single-file cache (packed.py), so both give the same token stream.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from minillm.data.jsonl import DataError, Where, file_key, get_str, parse_line, text_expected
from minillm.files import atomic_path, atomic_write, read_json, remove_stale_temporaries

if TYPE_CHECKING:
    from minillm.data.tokenizer import Tokenizer

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")
INDEX_NAME = "index.json"
_FORMAT = "minillm-shards-v1"
_BOM = b"\xef\xbb\xbf"


def token_dtype(vocab_size: int) -> np.dtype:
    """The cache's id type: uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype, w) -> int:
    """Append each text's ids and <|endoftext|> to the binary file `w` in one write; the tokens written."""
    flat: list[int] = []
    for ids in tokenizer.encode_batch(texts):
        flat += ids
        flat.append(tokenizer.eos_id)
    np.asarray(flat, dtype=dtype).tofile(w)
    return len(flat)


def resolve_sources(spec: str | os.PathLike) -> list[Path]:
    """The data files `spec` names: itself, every data file below a directory, or a glob's matches; sorted."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES)]
    else:
        files = [Path(f) for f in glob.glob(str(spec), recursive=True) if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"--data_path {spec}: no such file, and no {', '.join(SUFFIXES)} files there")
    return sorted(files)


@dataclass(frozen=True)
class Shard:
    """One unit of tokenization work: a byte range of a source file (end -1: the whole file)."""

    source: str
    start: int
    end: int
    size: int
    mtime_ns: int
    crc32: int
    """CRC-32 of the bytes the range covers: a shard is identified by its content, not by size and mtime."""


def crc32_of(path: Path, start: int = 0, end: int = -1) -> int:
    """CRC-32 of bytes [start, end) of a file (end -1: to its end), read in 16 MB chunks (about 1 GB/s)."""
    crc, left = 0, (end if end >= 0 else path.stat().st_size) - start
    with open(path, "rb") as f:
        f.seek(start)
        while left > 0:
            chunk = f.read(min(left, 16 << 20))
            if not chunk:
                break
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    return crc


def plan_shards(files: list[Path], shard_bytes: int) -> list[Shard]:
    """Cut every file into line-aligned ranges of about `shard_bytes` (compressed files stay whole)."""
    shards = []
    for f in files:
        size, mtime = file_key(f)
        if f.name.endswith(".gz"):
            shards.append(Shard(str(f), 0, -1, size, mtime, crc32_of(f)))
            continue
        cuts = [0]
        with open(f, "rb") as fh:
            while cuts[-1] + shard_bytes < size:
                fh.seek(cuts[-1] + shard_bytes)
                fh.readline()  # move to the start of the next line
                if fh.tell() >= size:
                    break
                cuts.append(fh.tell())
        shards += [Shard(str(f), a, b, size, mtime, crc32_of(f, a, b)) for a, b in zip(cuts, [*cuts[1:], size])]
    return shards


def _length(shard: Shard) -> int:
    """Bytes of the source a shard covers."""
    return (shard.end if shard.end >= 0 else shard.size) - shard.start


def _documents(shard: Shard, hasher) -> Iterator[str]:
    """The documents of one shard, in order; `hasher` sees every raw byte read."""
    path = Path(shard.source)
    if path.name.endswith(".gz"):
        lineno = 0
        try:
            with gzip.open(path, "rb") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    hasher.update(raw)
                    yield from _document(path, raw.removeprefix(_BOM) if lineno == 1 else raw, f"{path}:{lineno}")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, or not gzip at all
            raise DataError(f"{path}: not a complete gzip file after {lineno} lines ({e})") from None
        return
    with open(path, "rb") as fh:
        fh.seek(shard.start)
        pos = shard.start
        while pos < shard.end:
            raw = fh.readline()
            if not raw:
                break
            hasher.update(raw)
            yield from _document(path, raw.removeprefix(_BOM) if pos == 0 else raw, Where(path, pos))
            pos += len(raw)


def _document(path: Path, raw: bytes, where) -> Iterator[str]:
    """The document of one raw line (none for a blank one)."""
    if not raw.strip():
        return
    if path.name.endswith(".txt"):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line; expected UTF-8 text") from None
        return
    yield get_str(parse_line(raw, where), "text", where, text_expected("text"))


_worker_tokenizer = None


def _init_worker(tokenizer_json: str, threads: int) -> None:
    global _worker_tokenizer
    os.environ["RAYON_RS_NUM_CPUS"] = str(threads)  # the tokenizer's own threads, before its first use
    from tokenizers import Tokenizer as Backend

    from minillm.data.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer(Backend.from_str(tokenizer_json))


def _build(job: tuple[Shard, str, int]) -> dict[str, Any]:
    """Tokenize one shard into its .bin (atomically), then its header; the header."""
    shard, out, chunk = job
    tok, out = _worker_tokenizer, Path(out)
    dtype = token_dtype(tok.vocab_size)
    hasher, texts = hashlib.sha256(), []
    counts = {"n_tokens": 0, "n_documents": 0, "n_chars": 0}
    with atomic_path(out) as tmp, open(tmp, "wb") as w:
        for text in _documents(shard, hasher):
            texts.append(text)
            counts["n_documents"] += 1
            counts["n_chars"] += len(text)
            if len(texts) >= chunk:
                counts["n_tokens"] += write_documents(tok, texts, dtype, w)
                texts.clear()
        counts["n_tokens"] += write_documents(tok, texts, dtype, w)
    if file_key(Path(shard.source)) != (shard.size, shard.mtime_ns):
        out.unlink()
        raise DataError(f"{shard.source}: file changed while it was being tokenized; run again")
    header = {"shard": asdict(shard), "file": out.name, "dtype": dtype.name, "sha256": hasher.hexdigest(),
              "tokenizer_fingerprint": tok.fingerprint(), "bin_crc32": crc32_of(out), **counts}
    atomic_write(Path(str(out) + ".json"), json.dumps(header))
    return header


def _same_content(a: dict, b: dict) -> bool:
    """Two shard descriptions cover the same bytes (the modification time aside)."""
    return {k: v for k, v in a.items() if k != "mtime_ns"} == {k: v for k, v in b.items() if k != "mtime_ns"}


def _done(out: Path, shard: Shard, fingerprint: str) -> dict[str, Any] | None:
    """The header of a finished, intact shard built from these very bytes with this tokenizer, else None.

    The .bin is checked against the CRC-32 written when it was built (one read of the cache per run), so a
    shard damaged or overwritten since is rebuilt rather than trained on.
    """
    try:
        header = read_json(Path(str(out) + ".json"))
        ok = (_same_content(header["shard"], asdict(shard)) and header["tokenizer_fingerprint"] == fingerprint
              and out.stat().st_size == header["n_tokens"] * np.dtype(header["dtype"]).itemsize)
        if ok and crc32_of(out) != header["bin_crc32"]:
            print(f"note: {out} does not match the checksum written when it was built; rebuilding it",
                  file=sys.stderr)
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return header if ok else None


def cache_dir_for(spec: str | os.PathLike, files: list[Path]) -> Path:
    """Where the shards of these files live: a folder named by a hash of their paths, beside the data."""
    key = hashlib.sha256("\n".join(str(f.resolve()) for f in files).encode()).hexdigest()[:16]
    root = Path(spec) if Path(spec).is_dir() else files[0].parent
    return root / f".minillm-tokens-{key}"


def shard_index_path(spec: str | os.PathLike) -> Path:
    """Where build_shards writes the index of the corpus `spec` names."""
    return cache_dir_for(spec, resolve_sources(spec)) / INDEX_NAME


def build_shards(spec: str | os.PathLike, tokenizer: Tokenizer, num_proc: int = 1, shard_bytes: int = 64 << 20,
                 chunk_size: int = 1024, progress: bool = True) -> Path:
    """Tokenize the corpus `spec` names into shards with `num_proc` processes; the path of its index.json.

    Shards already built from the same byte range and tokenizer are kept; the index is rewritten last.
    """
    files = resolve_sources(spec)
    folder = cache_dir_for(spec, files)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    shards = plan_shards(files, shard_bytes)
    fingerprint = tokenizer.fingerprint()
    outs = [folder / f"shard_{i:05d}.bin" for i in range(len(shards))]
    headers: list[dict | None] = [_done(o, s, fingerprint) for o, s in zip(outs, shards)]
    positions = [i for i, h in enumerate(headers) if h is None]
    todo = [(shards[i], str(outs[i]), chunk_size) for i in positions]
    total = sum(_length(s) for s, _, _ in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {len(todo)} of {len(shards)} shards",
              disable=not progress or not todo) as bar:
        init = (tokenizer.backend.to_str(), max(1, (os.cpu_count() or 1) // max(1, num_proc)))
        pool = None
        if num_proc <= 1 or len(todo) <= 1:
            _init_worker(*init)
            built = map(_build, todo)
        else:
            pool = mp.get_context("spawn").Pool(min(num_proc, len(todo)), initializer=_init_worker, initargs=init)
            built = pool.imap(_build, todo)
        try:
            for i, header in zip(positions, built):
                headers[i] = header
                bar.update(_length(shards[i]))
        finally:
            if pool is not None:
                pool.terminate()
    index = {"format": _FORMAT, "tokenizer_fingerprint": fingerprint, "vocab_size": tokenizer.vocab_size,
             "eos_id": tokenizer.eos_id, "shards": headers,
             "n_tokens": sum(h["n_tokens"] for h in headers),
             "sha256": hashlib.sha256("".join(h["sha256"] for h in headers).encode()).hexdigest()}
    atomic_write(folder / INDEX_NAME, json.dumps(index, indent=1))
    return folder / INDEX_NAME


class TokenShards:
    """The token stream of a shard index, memory-mapped shard by shard (re-mapped in each worker process)."""

    def __init__(self, index_path: str | os.PathLike) -> None:
        self.index_path = Path(index_path)
        index = read_json(self.index_path)
        if not isinstance(index, dict) or index.get("format") != _FORMAT:
            raise DataError(f"{self.index_path}: not a {_FORMAT} index; rebuild the cache")
        self.header = index
        self.dtype = np.dtype(index["shards"][0]["dtype"]) if index["shards"] else np.dtype(np.uint16)
        self.sizes = [h["n_tokens"] for h in index["shards"]]
        self.starts = np.cumsum([0, *self.sizes])
        self.n_tokens = int(self.starts[-1])
        self._maps: list | None = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_pid": None}

    def _mapped(self) -> list:
        if self._maps is None or self._pid != os.getpid():
            folder = self.index_path.parent
            self._maps = [np.memmap(folder / h["file"], dtype=self.dtype, mode="r", shape=(h["n_tokens"],))
                          if h["n_tokens"] else np.zeros(0, self.dtype) for h in self.header["shards"]]
            self._pid = os.getpid()
        return self._maps

    def slice(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream, across shard boundaries."""
        maps, parts = self._mapped(), []
        i = int(np.searchsorted(self.starts, a, side="right")) - 1  # the shard holding token a
        while a < b:
            end = min(b, int(self.starts[i + 1]))
            parts.append(maps[i][a - self.starts[i]:end - self.starts[i]])
            a, i = end, i + 1
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

    def max_id(self) -> int:
        """Largest token id in the stream (a full scan of the memory maps)."""
        return max(int(m.max()) for m in self._mapped() if len(m))
