"""Perplexity and bits per byte of a causal LM on held-out documents, with strided sliding windows.

Each document is scored on its own as the stream ``[eos] + doc + [eos]``: the first token is predicted
from ``<|endoftext|>`` and the closing ``<|endoftext|>`` is scored too, so a document of n tokens has
n + 1 targets, each scored exactly once. Documents longer than ``max_length`` are cut into windows as
in the transformers guide "Perplexity of fixed-length models": window k reads input positions
``[k * stride, k * stride + max_length)`` and scores only the positions no earlier window scored, so it
re-reads up to ``max_length - stride`` tokens of context. Sums are over tokens, never over windows.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from minillm.data.jsonl import DataError, iter_texts

__all__ = ["PerplexityResult", "read_documents", "evaluate_perplexity", "window_batch", "window_jobs",
           "windows"]


@dataclass
class PerplexityResult:
    """Token-level sums of one evaluation; the derived metrics are properties."""

    nll_sum: float
    """Sum of the negative log-likelihoods of all scored tokens, in nats."""
    tokens: int
    """Number of scored tokens (every document token plus one closing eos per document)."""
    documents: int
    """Number of documents scored."""
    bytes: int
    """UTF-8 bytes of the documents' text (0 if the caller did not give it)."""
    seconds: float
    """Wall-clock time of the scoring (tokenization excluded)."""

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.mean_nll) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        """Sum NLL / (bytes * ln 2): comparable across tokenizers."""
        return bits_per_byte(self.mean_nll, self.tokens, self.bytes) if self.bytes and self.tokens else math.nan

    @property
    def tokens_per_second(self) -> float:
        """Scored tokens per second of wall-clock time."""
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, float | int]:
        """The sums and the derived metrics as a flat dict (JSON-ready)."""
        return {**asdict(self), "mean_nll": self.mean_nll, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "tokens_per_second": self.tokens_per_second}


def bits_per_byte(mean_nll: float, tokens: int, n_bytes: int) -> float:
    """Mean NLL per scored token (nats) over `tokens` scored tokens -> bits per UTF-8 byte of the text."""
    return mean_nll * tokens / (n_bytes * math.log(2))


def scored_size(texts: list[str], documents: list[list[int]]) -> tuple[int, int]:
    """(scored tokens, UTF-8 bytes) of held-out documents: every token plus one closing eos per document."""
    return sum(len(d) + 1 for d in documents), sum(len(t.encode("utf-8")) for t in texts)


def read_documents(path: str | os.PathLike) -> list[str]:
    """The "text" of every non-blank line of a JSON-lines file, or a whole .txt file as one document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".txt":
        raw = path.read_bytes()
        if not raw.strip():
            raise DataError(f"{path}:1: file is empty; expected the text of one document")
        try:
            return [raw.decode("utf-8-sig")]
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: invalid UTF-8; expected UTF-8 text") from None
    return list(iter_texts(path))


def windows(n_targets: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over n_targets (input, label) pairs.

    Window inputs are positions [begin, end); labels [first_scored, end) are scored; the scored
    ranges tile [0, n_targets) exactly (the transformers guide's loop on pre-shifted labels).
    """
    out = []
    prev_end = 0
    for begin in range(0, n_targets, stride):
        end = min(begin + max_length, n_targets)
        out.append((begin, end, prev_end))
        prev_end = end
        if end == n_targets:
            break
    return out


def window_jobs(documents: list[list[int]], max_length: int, stride: int) -> list[tuple[int, int, int, int, int]]:
    """(length, document, begin, end, first_scored) of every window of every document, longest first.

    Longest first: equal lengths share a batch (little padding), and an out-of-memory shows at once.
    """
    jobs = [(end - begin, d, begin, end, first) for d, doc in enumerate(documents)
            for begin, end, first in windows(len(doc) + 1, max_length, stride)]
    jobs.sort(key=lambda job: -job[0])
    return jobs


def window_batch(documents: list[list[int]], jobs: list[tuple[int, int, int, int, int]],
                 eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], labels [B, T]) of some window_jobs, right-padded to the first (longest) one.

    Padding is eos: causal attention keeps it out of the real positions, and its labels are -100 so it
    is never scored; neither are the labels of re-read context.
    """
    T = jobs[0][0]
    x_rows, y_rows = [], []
    for length, d, begin, end, first in jobs:
        # Stream [eos] + doc + [eos]: input j is stream[j], its label stream[j + 1].
        doc = documents[d]
        x = doc[begin - 1:end - 1] if begin > 0 else [eos_id, *doc[:end - 1]]
        y = doc[first:end] if end <= len(doc) else [*doc[first:], eos_id]
        pad = T - length
        x_rows.append([*x, *[eos_id] * pad])
        y_rows.append([*[-100] * (first - begin), *y, *[-100] * pad])
    return torch.tensor(x_rows, dtype=torch.long), torch.tensor(y_rows, dtype=torch.long)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's forward may broadcast buffers, a collective that would hang when ranks run different
    # numbers of windows; evaluation needs only the plain module.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def evaluate_perplexity(
    model: torch.nn.Module,
    documents: list[list[int]],
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    eos_id: int = 0,
    n_bytes: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    lockstep: bool = False,
) -> PerplexityResult:
    """Score tokenized documents (without eos) with strided windows; see the module docstring.

    ``n_bytes`` is the UTF-8 byte count of all ``documents`` (for bits per byte). ``device`` is where
    the inputs go (default: the model's device). ``dtype`` bfloat16/float16 runs under autocast.
    Under torch.distributed each rank scores ``documents[rank::world_size]`` and every rank returns
    the totals over all documents. ``lockstep`` (an FSDP-sharded model, whose every forward is a
    collective) makes every rank run as many forward passes as the busiest one.
    """
    stride = max_length if stride is None else stride
    model = _unwrap(model)
    limit = model.config.max_position_embeddings
    if not 1 <= max_length <= limit:
        raise ValueError(f"max_length must be in [1, {limit}] (the model's max_position_embeddings), "
                         f"got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    mine = documents[rank::world]
    jobs = window_jobs(mine, max_length, stride)
    n_scored = sum(end - first for _, _, _, end, first in jobs)

    autocast = dtype in (torch.bfloat16, torch.float16)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with (torch.inference_mode(),
              torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=autocast),
              tqdm(total=n_scored, unit="tok", unit_scale=True, desc="scoring",
                   disable=not progress or rank != 0) as bar):
            n_batches = -(-len(jobs) // batch_size)
            if lockstep and distributed:  # a sharded model gathers weights in every forward: all ranks run as many
                most = torch.tensor([n_batches], device=device)
                dist.all_reduce(most, op=dist.ReduceOp.MAX)
                for _ in range(int(most) - n_batches):
                    model(torch.full((1, 1), eos_id, device=device))
            for i in range(0, len(jobs), batch_size):
                batch = jobs[i:i + batch_size]
                x_BT, y_BT = window_batch(mine, batch, eos_id)
                x_BT = x_BT.to(device, non_blocking=True)
                y_BT = y_BT.to(device, non_blocking=True)
                logits_BTV = model(x_BT).logits
                # float() is a no-op for float32 logits; half-precision logits are upcast once.
                nll = F.cross_entropy(logits_BTV.flatten(0, 1).float(), y_BT.flatten(),
                                      ignore_index=-100, reduction="none")
                nll_sum += nll.sum(dtype=torch.float64)  # stays on the device: no sync per batch
                bar.update(sum(end - first for _, _, _, end, first in batch))
    finally:
        model.train(was_training)
    sums = torch.tensor([0.0, float(n_scored)], dtype=torch.float64, device=device)
    sums[0] = nll_sum
    if distributed:
        dist.all_reduce(sums)
    total_nll, total_tokens = sums.tolist()  # the one host sync
    return PerplexityResult(nll_sum=total_nll, tokens=int(total_tokens), documents=len(documents),
                            bytes=n_bytes, seconds=time.perf_counter() - start)
