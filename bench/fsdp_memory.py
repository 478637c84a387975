"""Per-process memory of DDP, FSDP2, FSDP2 + activation checkpointing (+ chunked loss): 2 CPU processes (gloo), one table.

Each mode runs as its own `torchrun --nproc_per_node 2` job of this file. Every rank builds the model,
wraps or shards it, builds the optimizer and runs --steps training steps on random tokens. It reports:
- the bytes it holds of parameters, gradients and AdamW moments, counted from the tensors themselves
  (the local shards under FSDP2);
- its peak resident memory, and the peak above the resident memory after setup (the high-water mark
  reset after setup), which is what the training steps add: gradients, optimizer state, activations.

    python bench/fsdp_memory.py                       # 124m config, batch 4 x 256, 2 steps
    python bench/fsdp_memory.py --config default --batch_size 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import add_json_flag, write_json

MODES = {"ddp": [], "fsdp": ["--fsdp"], "fsdp + activation checkpointing": ["--fsdp", "--ac"],
         "fsdp + activation checkpointing + loss_chunk 64": ["--fsdp", "--ac", "--loss_chunk", "64"]}


def local_bytes(tensors) -> int:
    """Bytes of the tensors this process holds (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    """One rank: set up, train --steps steps, print one JSON line."""
    from common import CONFIGS, rss_kib
    from torch.nn.parallel import DistributedDataParallel as DDP

    from minillm.model.model import MiniLLM
    from minillm.train.distributed import setup_distributed, teardown_distributed
    from minillm.train.optim import build_optimizer
    from minillm.train.sharding import apply_fsdp, fsdp_policy

    env = setup_distributed("cpu")
    torch.manual_seed(0)
    model = MiniLLM(CONFIGS[args.config])
    if args.fsdp:
        apply_fsdp(model, fsdp_policy(env.device, torch.float32))
        wrapped = model
    else:
        wrapped = DDP(model)
    model.activation_checkpointing = args.ac
    optimizer = build_optimizer(model, "adamw", 5e-4, 0.1, env.device)
    g = torch.Generator().manual_seed(env.rank)
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: measure the steps
    after_setup = rss_kib("VmRSS") / 1024
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = wrapped(x, labels=x, loss_chunk=args.loss_chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated, as they are between steps
    seconds = (time.perf_counter() - start) / args.steps
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    print(json.dumps({"rank": env.rank, "params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
                      "optimizer": local_bytes(state), "rss_after_setup": after_setup,
                      "peak_rss": rss_kib("VmHWM") / 1024, "step_s": seconds}), flush=True)
    teardown_distributed()


def main() -> None:
    """Run every mode and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    parser.add_argument("--config", default="124m", help="model preset from bench/common.py (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per process per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=2, help="training steps measured")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss_chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from common import CONFIGS, environment, print_table

    from minillm.model.model import MiniLLM

    rows = []
    for mode, flags in MODES.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--config", args.config, "--batch_size", str(args.batch_size), "--seq_len",
               str(args.seq_len), "--steps", str(args.steps), *flags]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode:
            raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
        for line in sorted(line for line in res.stdout.splitlines() if line.startswith("{")):
            r = json.loads(line)
            state = (r["params"] + r["grads"] + r["optimizer"]) / 2**20
            rows.append([mode, str(r["rank"]), f"{r['params'] / 2**20:,.0f}", f"{r['grads'] / 2**20:,.0f}",
                         f"{r['optimizer'] / 2**20:,.0f}", f"{state:,.0f}", f"{r['peak_rss']:,.0f}",
                         f"{r['peak_rss'] - r['rss_after_setup']:,.0f}", f"{r['step_s']:.2f}"])
    with torch.device("meta"):
        n = MiniLLM(CONFIGS[args.config]).num_parameters()
    print(f"# {args.config}: {n:,} parameters; 2 processes (gloo, 1 thread each), batch {args.batch_size} x "
          f"{args.seq_len} per process, float32, AdamW; {args.steps} steps")
    print(f"# {environment(torch.device('cpu'))}")
    header = ["mode", "rank", "params MiB", "grads MiB", "AdamW MiB", "state MiB", "peak RSS MiB",
              "peak above setup MiB", "s/step"]
    print_table(header, rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
