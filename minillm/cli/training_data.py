"""The training data a stage's flags name: the packed token cache (or its shards) for pretraining, chats for
SFT, pairs for DPO, prompts for GRPO; every line checked before the run starts."""

from __future__ import annotations

import argparse
import json

from torch.utils.data import Dataset

from minillm.cli.loading import CliError, resolve_path
from minillm.data.datasets import PretrainDataset, SFTDataset
from minillm.data.packed import PackedDataset, packed_cache
from minillm.data.preference import PreferenceDataset
from minillm.data.prompts import PromptDataset
from minillm.data.shards import build_shards, shard_index_path
from minillm.data.tokenizer import Tokenizer
from minillm.infer.poem_tools import select_tools
from minillm.train.distributed import barrier


def data_kind(kind: str, args: argparse.Namespace) -> str:
    """The data a stage reads: its own, or for distillation documents ("pretrain") or chats ("sft"), by the first
    record of --data_path (a directory or glob of documents is documents)."""
    if kind != "distill":
        return kind
    path = resolve_path(args.data_path)
    if path is None or not path.is_file() or not path.name.endswith(".jsonl"):
        return "pretrain"
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return "pretrain"  # the documents' own reader names the bad line
    return "sft" if isinstance(record, dict) and "text" not in record else "pretrain"


def build_dataset(kind: str, args: argparse.Namespace, tokenizer: Tokenizer, is_main: bool) -> Dataset:
    """The dataset of a stage, from its data flags; rank 0 builds a token cache while the others wait."""
    kind = data_kind(kind, args)
    data_path = resolve_path(args.data_path)
    if kind == "pretrain" and args.copy_share and not args.packed:
        raise CliError("--copy_share needs the packed token cache: drop --no-packed")
    if kind == "pretrain" and args.packed and (args.num_proc > 1 or data_path is None or not data_path.is_file()
                                               or not data_path.name.endswith(".jsonl")):
        if args.num_proc < 1:
            raise CliError(f"--num_proc must be >= 1, got {args.num_proc}")
        spec = data_path or args.data_path
        if is_main:  # rank 0 builds (or finishes) the shards while the others wait, then all read them
            build_shards(spec, tokenizer, num_proc=args.num_proc)
        barrier()
        return PackedDataset(shard_index_path(spec), max_length=args.max_length, copy_share=args.copy_share)
    if data_path is None or not data_path.is_file():
        raise FileNotFoundError(f"--data_path {args.data_path}: no such file")
    if kind == "sft":
        dataset = SFTDataset(data_path, tokenizer, max_length=args.max_length)
        dataset.validate()  # a bad line fails now, not hours into an epoch
        return dataset
    if kind in ("dpo", "grpo"):  # every line is parsed now
        if kind == "dpo":
            dataset, what = PreferenceDataset(data_path, tokenizer, max_length=args.max_length), "pairs"
        else:
            schemas = [t.schema() for t in select_tools(args.tools).values()] if args.tools else None
            dataset, what = PromptDataset(data_path, tokenizer, max_length=args.max_length, tools=schemas), "prompts"
        if dataset.dropped and is_main:
            print(f"note: dropped {dataset.dropped:,} of {dataset.dropped + len(dataset):,} {what} whose prompt "
                  f"leaves no room within --max_length {args.max_length}")
        return dataset
    if args.packed:
        if is_main:  # rank 0 builds (or reuses) the cache while the others wait, then all read it
            packed_cache(data_path, tokenizer)
        barrier()
        return PackedDataset(packed_cache(data_path, tokenizer, progress=False), max_length=args.max_length,
                             copy_share=args.copy_share)
    dataset = PretrainDataset(data_path, tokenizer, max_length=args.max_length)
    dataset.validate()
    return dataset
