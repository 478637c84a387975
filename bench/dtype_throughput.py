"""Training throughput in float32 and under bf16 autocast, side by side: does `--dtype auto`'s bf16 pay here?

`--dtype auto` trains in bfloat16 on CPUs with native bf16 matrix units (AMX or AVX512-BF16) and in float32
elsewhere. This measures the two on the CPU at hand, with the trainer's step (forward, token-weighted loss,
backward, clipping, AdamW) on one fixed batch, the sides alternating round by round.

    python bench/dtype_throughput.py                      # the default 4 x 256 model at 16 x 128
    python bench/dtype_throughput.py --config default --batch_size 8 --seq_len 256
"""

from __future__ import annotations

import argparse

import torch
from common import (
    CONFIGS,
    add_json_flag,
    environment,
    median,
    print_table,
    resolve_device,
    setup,
    time_alternating,
    write_json,
)
from train_throughput import make_train_step

from minillm.device import dtype_reason
from minillm.model.model import MiniLLM

SIDES = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> None:
    """Run both sides and print a Markdown table and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="pretrain", help="model size preset")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per side before timing")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per side (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    setup(args.threads, args.seed)
    steps = {}
    for dtype in SIDES:
        torch.manual_seed(args.seed)
        model = MiniLLM(CONFIGS[args.config]).to(device)
        steps[dtype] = make_train_step("minillm", model, device, args.batch_size, args.seq_len, dtype, False,
                                       args.seed)
    times = time_alternating(steps, args.warmup, args.rounds, device)
    tokens = args.batch_size * args.seq_len
    tps = {side: tokens / median(times[side]) for side in SIDES}
    print(environment(device))
    print(f"{args.config} model, {args.batch_size} x {args.seq_len} tokens per step; --dtype auto here: "
          f"{dtype_reason('auto', device)}\n")
    print_table(["dtype", "median step s", "tokens/s"],
                [[side, f"{median(times[side]):.3f}", f"{tps[side]:,.0f}"] for side in SIDES])
    print(f"\nbfloat16 / float32: {tps['bfloat16'] / tps['float32']:.2f}x tokens/s")
    write_json(args.json)


if __name__ == "__main__":
    main()
