"""Peak memory and training speed of full fine-tuning vs LoRA, for the default model and a 124M-class model.

Each (model, method) pair runs in its own subprocess, so its peak resident set size (RSS high-water mark,
getrusage ru_maxrss) is its own: weights, gradients, AdamW state and activations of one training step
loop, on random tokens, with the same optimizer the trainer builds. Speed is the best of the timed steps
(other work on the machine only ever slows a step down), as wall-clock tokens/s and as tokens per CPU-second
of the process: on a machine shared with other jobs the second is the steadier measure, and with one torch
thread (the default) it is the single-core speed. Prints a Markdown table.

    python bench/lora_memory.py
    python bench/lora_memory.py --batch_size 2 --seq_len 256 --steps 3 --models default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import add_json_flag, write_json

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    # What train_pretrain.py builds without size flags (LMConfig defaults, the shipped 6400-token tokenizer).
    "default": dict(vocab_size=6400, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2),
    # GPT-2-small-sized: 768 wide, 12 layers, 12 heads (no GQA), a 32k vocabulary.
    "124m": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
}


def peak_rss_mib() -> float:
    """This process's RSS high-water mark in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    """Build one model, train it for a few steps, and report memory and speed."""
    import torch

    from minillm.model.config import LMConfig
    from minillm.model.lora import apply_lora, parameter_counts
    from minillm.model.model import MiniLLM
    from minillm.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    baseline = peak_rss_mib()  # the interpreter plus torch, before any model exists
    torch.manual_seed(0)
    model = MiniLLM(LMConfig(max_position_embeddings=max(2048, args.seq_len), **MODELS[args.model]))
    if args.method == "lora":
        apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    trainable, total = parameter_counts(model)
    optimizer = build_optimizer(model, "adamw", 1e-4, 0.1, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    model.train()
    times, cpu_times = [], []
    for _ in range(args.steps + 1):  # the first step allocates optimizer state and warms up; not timed
        x = torch.randint(0, V, (args.batch_size, args.seq_len), generator=g)
        y = torch.randint(0, V, (args.batch_size, args.seq_len), generator=g)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    tokens = args.batch_size * args.seq_len
    return {"model": args.model, "method": args.method, "trainable": trainable, "total": total,
            "baseline_mib": baseline, "peak_mib": peak_rss_mib(), "tokens_per_s": tokens / min(times[1:]),
            "tokens_per_cpu_s": tokens / min(cpu_times[1:]), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    """Run every (model, method) in a subprocess and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_json_flag(p)
    p.add_argument("--models", default="default,124m", help="comma list from: " + ", ".join(MODELS))
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    for model in args.models.split(","):
        for method in ("full", "lora"):
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--method", method,
                   "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--steps", str(args.steps),
                   "--lora_r", str(args.lora_r), "--threads", str(args.threads)]
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{model} {method}: done", file=sys.stderr)

    print(f"batch {args.batch_size} x {args.seq_len} tokens, float32 AdamW, LoRA r={args.lora_r} on "
          f"q,k,v,o,gate,up,down; {platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads\n")
    print("| model | method | trainable params | total params | weights+grads+AdamW (MiB) | peak RSS (MiB) "
          "| peak above import (MiB) | tokens/s | tokens/CPU-s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        # float32: 4 bytes per weight, plus a gradient and two AdamW moments per trainable weight.
        state_mib = (4 * r["total"] + 12 * r["trainable"]) / 2**20
        print(f"| {r['model']} | {r['method']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
              f"{r['total']:,} | {state_mib:,.0f} | {r['peak_mib']:,.0f} | {r['peak_mib'] - r['baseline_mib']:,.0f} "
              f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} |")
    write_json(args.json, rows=rows)


if __name__ == "__main__":
    main()
