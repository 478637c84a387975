"""Distillation's cost: a train_distill.py step against a pretraining step of the same student (issue 48).

Both sides run the loop's own train_step (minillm/train/trainer.py) on the same batch: pretraining with the
language-modelling objective, distillation with the Distillation objective (the teacher's forward under no_grad,
the generalized JSD and the cross-entropy), and distillation from a --teacher_topk cache built before timing (the
teacher's k likeliest ids read back instead of its forward). Steps alternate after warm-up; tokens/s counts the
student's input positions. Peak memory is each side's in a fresh process (teacher and student both loaded for
distillation).

    python bench/distill_throughput.py                          # 4.6M student, 25.8M teacher, 16 x 128, CPU
    python bench/distill_throughput.py --teacher pretrain       # a teacher of the student's own shape
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import (
    CONFIGS,
    add_json_flag,
    environment,
    median,
    peak_memory_of,
    print_table,
    resolve_device,
    setup,
    time_alternating,
    twice,
    write_json,
)
from train_throughput import make_batch

from minillm.model.model import MiniLLM
from minillm.train.distill import Distillation
from minillm.train.distributed import DistEnv
from minillm.train.objective import LanguageModeling
from minillm.train.optim import build_optimizer
from minillm.train.trainer import train_step

SIDES = ("pretraining", "distillation", "distillation, top-k cache")


def make_step(side: str, device: torch.device, student: str, teacher: str, batch_size: int, seq_len: int,
              seed: int, topk: int):
    """A closure running one optimizer step of the student (loop's train_step) on a fixed batch."""
    torch.manual_seed(seed)
    model = MiniLLM(CONFIGS[student]).to(device).train()
    micro = [make_batch(model.config.vocab_size, batch_size, seq_len, seed, device)]
    rows = list(zip(*(part.cpu() for part in micro[0])))  # the batch as a dataset the cache is built from
    if side.startswith("distillation"):
        cache = tempfile.mkdtemp(prefix="minillm-teacher-") if side.endswith("cache") else None
        objective = Distillation(MiniLLM(CONFIGS[teacher]).eval(), alpha=0.5, beta=0.5, temperature=1.0,
                                 topk=topk if cache else None, cache_dir=cache, verbose=False)
    else:
        objective = LanguageModeling()
    objective.prepare(model, rows, device, torch.float32)
    optimizer = build_optimizer(model, "adamw", 2e-3, 0.1, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    params = list(model.parameters())
    env = DistEnv(device=device)

    def step() -> float:
        return train_step(model, params, optimizer, scaler, micro, torch.float32, env, 1.0, False,
                          objective=objective).loss

    return step


def memory_workload(device: torch.device, side: str, **kwargs):
    """Two steps from a fresh optimizer, as train_throughput measures them."""
    return twice(make_step(side, device, **kwargs))


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    parser.add_argument("--student", choices=sorted(CONFIGS), default="pretrain",
                        help="student shape (default: %(default)s, train_pretrain.py's 4.6M)")
    parser.add_argument("--teacher", choices=sorted(CONFIGS), default="default",
                        help="teacher shape (default: %(default)s, the 25.8M shape)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--topk", type=int, default=32, help="ids per position in the cache (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch seed (default: %(default)s)")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes")
    args = parser.parse_args(argv)
    if CONFIGS[args.student].vocab_size != CONFIGS[args.teacher].vocab_size:
        raise SystemExit(f"--student {args.student} and --teacher {args.teacher} have different vocabularies")
    device = resolve_device(args.device)
    setup(args.threads, args.seed)
    kwargs = dict(student=args.student, teacher=args.teacher, batch_size=args.batch_size, seq_len=args.seq_len,
                  seed=args.seed, topk=args.topk)
    steps = {side: make_step(side, device, **kwargs) for side in SIDES}
    times = time_alternating(steps, args.warmup, args.rounds, device)
    memory = {} if args.no_memory else {side: peak_memory_of(memory_workload, device, args.threads, side=side,
                                                             **kwargs) for side in SIDES}
    tokens = args.batch_size * args.seq_len
    tps = {side: tokens / median(times[side]) for side in SIDES}
    print(f"# student {args.student} ({MiniLLM(CONFIGS[args.student]).num_parameters() / 1e6:.1f}M), teacher "
          f"{args.teacher} ({MiniLLM(CONFIGS[args.teacher]).num_parameters() / 1e6:.1f}M), "
          f"{args.batch_size} x {args.seq_len}, float32; {environment(device)}")
    rows = [[side, f"{median(times[side]) * 1000:.1f}", f"{tps[side]:,.0f}",
             f"{memory[side].peak:.0f}" if memory else "-", f"{memory[side].extra:.0f}" if memory else "-"]
            for side in SIDES]
    print_table(["step", "ms (median)", "student tokens/s", "peak MiB", "step MiB"], rows)
    ratio = tps["pretraining"] / tps["distillation"]
    cached = tps["pretraining"] / tps["distillation, top-k cache"]
    print(f"\na distillation step costs {ratio:.2f}x a pretraining step of the same student; from a top-{args.topk} "
          f"cache, {cached:.2f}x")
    write_json(args.json, ratio=ratio, cached_ratio=cached, tokens_per_s=tps,
               peak_mib={side: memory[side].peak for side in memory})


if __name__ == "__main__":
    main()
