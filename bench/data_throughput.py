"""Throughput of the data pipeline on the shipped corpus.

Measures characters/s for building the packed token cache and examples/s for PretrainDataset,
SFTDataset and PackedDataset (random access, as a shuffled DataLoader would read them), and prints a
Markdown table. Each stage runs --repeats times and the fastest run is reported, since other work on
the machine only ever slows a run down. The cache is built in a temporary folder; the only file
written beside the data is the line index ``sft.jsonl.idx``.

    python bench/data_throughput.py
    python bench/data_throughput.py --examples 2000 --max_length 256
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import add_json_flag, write_json

from minillm.data.datasets import PretrainDataset, SFTDataset
from minillm.data.jsonl import index_lines
from minillm.data.packed import PackedDataset, prepare_tokens
from minillm.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def time_examples(dataset, n: int, seed: int = 0) -> tuple[int, float]:
    """Read ``n`` examples at random indices; return (count, seconds)."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:n]
    start = time.perf_counter()
    for i in order:
        dataset[int(i)]
    return len(order), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    parser.add_argument("--pretrain", default=str(ROOT / "dataset/pretrain.jsonl"), help="pretraining jsonl")
    parser.add_argument("--sft", default=str(ROOT / "dataset/sft.jsonl"), help="SFT jsonl")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the shipped one)")
    parser.add_argument("--max_length", type=int, default=512, help="sequence length of every example")
    parser.add_argument("--examples", type=int, default=5000, help="examples read per dataset")
    parser.add_argument("--chunk_size", type=int, default=1024, help="documents per encode_batch call")
    parser.add_argument("--repeats", type=int, default=3, help="runs per stage; the fastest is reported")
    args = parser.parse_args(argv)

    tok = load_tokenizer(args.tokenizer)
    rows: list[tuple[str, str, float, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        # Index a private copy without the .idx cache, so the timing is of a real scan (from the page
        # cache: the copy has just been written).
        pretrain = Path(tmp) / "pretrain.jsonl"
        pretrain.write_bytes(Path(args.pretrain).read_bytes())
        size_mb = pretrain.stat().st_size / 1e6

        sec = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            n_lines = len(index_lines(pretrain, cache=False))
            sec = min(sec, time.perf_counter() - start)
        rows.append(
            ("index pretrain lines", f"{n_lines} lines, {size_mb:.1f} MB", sec, f"{size_mb / sec:,.0f} MB/s")
        )

        out = Path(tmp) / "pretrain.tokens.bin"
        sec = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            header = prepare_tokens(pretrain, tok, out, chunk_size=args.chunk_size, progress=False)
            sec = min(sec, time.perf_counter() - start)
        rows.append(
            (
                "prepare_tokens (packed cache)",
                f"{header['n_chars']:,} chars -> {header['n_tokens']:,} tokens",
                sec,
                f"{header['n_chars'] / sec:,.0f} chars/s ({header['n_tokens'] / sec:,.0f} tokens/s)",
            )
        )

        datasets = [
            ("PretrainDataset", lambda: PretrainDataset(pretrain, tok, args.max_length)),
            ("SFTDataset", lambda: SFTDataset(args.sft, tok, args.max_length)),
            ("PackedDataset", lambda: PackedDataset(out, args.max_length)),
        ]
        for name, make in datasets:
            ds = make()
            runs = [time_examples(ds, args.examples, seed) for seed in range(args.repeats)]
            n, sec = min(runs, key=lambda r: r[1])
            rows.append(
                (f"{name}[i], random i", f"{n} of {len(ds)} examples", sec, f"{n / sec:,.0f} examples/s")
            )

    print(
        f"# data throughput: max_length={args.max_length}, tokenizer vocab={tok.vocab_size}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    )
    print()
    print("| stage | work | seconds | throughput |")
    print("|---|---|---:|---|")
    for stage, work, sec, rate in rows:
        print(f"| {stage} | {work} | {sec:.2f} | {rate} |")
    write_json(args.json, rows=[dict(zip(("stage", "work", "seconds", "throughput"), r)) for r in rows])


if __name__ == "__main__":
    main()
