"""Training-step throughput of minillm vs transformers' LlamaForCausalLM on the same config and weights.

One step = forward, loss, backward, gradient clipping to norm 1 and an AdamW step, as minillm's
trainer does it. Both sides get the same batch and the same optimizer (minillm.train.trainer.build_optimizer),
so the ratio measures the models. Steps alternate between the sides after warm-up; the median step
time gives tokens/s. MFU = model FLOPs per token x tokens/s / peak, where model FLOPs per token =
6 x (parameters in matmuls, LM head included) + 12 x layers x hidden x seq_len (attention, forward
and backward) and the peak is a float32 GEMM measured in this run (CPU) or the card's bf16 dense peak.

    python bench/train_throughput.py                      # default config, batch 8 x 256, float32 CPU
    python bench/train_throughput.py --rounds 2 --no_memory --profile 3   # and where a step's time goes
    python bench/train_throughput.py --config 124m --batch_size 16 --seq_len 1024 --compile   # GPU, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
from common import (
    SIDES,
    add_common_args,
    add_json_flag,
    checkpoint_config,
    device_peak,
    environment,
    load_side,
    median,
    peak_memory,
    print_profile,
    print_ratio,
    print_table,
    resolve_device,
    setup,
    time_alternating,
    train_flops_per_token,
    twice,
    write_checkpoint,
    write_json,
)

from minillm.train.optim import build_optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, Y, loss_mask) as the pretraining dataset yields them; the last 16 positions of row 0 are masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask[0, -16:] = 0
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask.to(device)


def make_train_step(side: str, model: torch.nn.Module, device: torch.device, batch_size: int, seq_len: int,
                    dtype: str, compile: bool, seed: int):
    """A closure running one training step of `model` on a fixed batch; returns the loss tensor."""
    model.train()
    vocab = model.config.vocab_size
    X, Y, M = make_batch(vocab, batch_size, seq_len, seed, device)
    Y_hf = Y.masked_fill(M == 0, -100)  # transformers masks through ignored labels
    optimizer = build_optimizer(model, "adamw", 5e-4, 0.1, device)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if compile else model
    autocast = (torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "float32"
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        with autocast:
            if side == "minillm":
                loss = forward(X, labels=Y, loss_mask=M).loss
            else:  # shift_labels: Y is already shifted, as minillm's labels are
                loss = forward(input_ids=X, labels=Y_hf, shift_labels=Y_hf).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train_memory_workload(side, model, device, **kwargs):
    """Two training steps from a fresh optimizer (the peak includes gradients and AdamW state)."""
    return twice(make_train_step(side, model, device, **kwargs))


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    add_common_args(parser)
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--compile", nargs="?", const="both", choices=["both", "minillm"], default=None,
                        help="torch.compile both models, or (--compile minillm) minillm's only")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="device peak in TFLOP/s for MFU (default: measured GEMM on CPU, table on GPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps per side (torch.profiler) and print where the time goes")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    setup(args.threads, args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model_dir or write_checkpoint(args.config, tmp, args.seed)
        config = checkpoint_config(directory)
        kwargs = dict(batch_size=args.batch_size, seq_len=args.seq_len, dtype=dtype, seed=args.seed)
        compiled = {side: args.compile == "both" or args.compile == side for side in SIDES}
        models = {side: load_side(side, directory, device) for side in SIDES}
        n_params = models["minillm"].num_parameters()
        steps = {side: make_train_step(side, models[side], device, compile=compiled[side], **kwargs)
                 for side in SIDES}
        # Same weights and batch: the first losses must agree (before the sides drift apart).
        first = {side: steps[side]().item() for side in SIDES}
        tol = 1e-4 if dtype == "float32" else 2e-2
        assert abs(first["minillm"] - first["transformers"]) <= tol * abs(first["transformers"]), first
        peak_before, how = device_peak(device, args.peak_tflops)
        times = time_alternating(steps, args.warmup, args.rounds, device)
        peak_after, _ = device_peak(device, args.peak_tflops)
        peak = max(peak_before, peak_after)
        if args.profile:
            print_profile(steps, args.profile)
        # Memory of the eager step (compilation's own memory would swamp it).
        memory = {} if args.no_memory else peak_memory(train_memory_workload, directory, device, args.threads,
                                                       compile=False, **kwargs)

    tokens = args.batch_size * args.seq_len
    flops_tok = train_flops_per_token(config, args.seq_len)
    print(f"# train step: {args.model_dir or args.config} ({n_params / 1e6:.1f}M parameters), "
          f"batch {args.batch_size} x {args.seq_len}, {dtype}, compiled: "
          f"{', '.join(side for side in SIDES if compiled[side]) or 'none'}")
    print(f"# {environment(device)}")
    print(f"# peak {peak / 1e12:.3f} TFLOP/s ({how}); model FLOPs/token {flops_tok / 1e6:.1f}M "
          f"(6N + 12*L*C*T); first loss {first['minillm']:.5f} vs {first['transformers']:.5f}")
    header = ["side", "step ms (median)", "min", "max", "tokens/s", "MFU"]
    if memory:
        header += ["peak MiB", "workload MiB"]
    rows = []
    tps = {}
    for side in SIDES:
        t = median(times[side])
        tps[side] = tokens / t
        row = [side, f"{t * 1e3:.1f}", f"{min(times[side]) * 1e3:.1f}", f"{max(times[side]) * 1e3:.1f}",
               f"{tps[side]:,.0f}", f"{tps[side] * flops_tok / peak:.1%}"]
        if memory:
            row += [f"{memory[side].peak:,.0f}", f"{memory[side].extra:,.0f}"]
        rows.append(row)
    print_table(header, rows)
    print_ratio(tps, times)
    write_json(args.json)


if __name__ == "__main__":
    main()
