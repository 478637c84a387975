"""Mixture of Experts against dense: training and batch-1 decoding speed, side by side in one run.

Three models of the default pretraining shape (4 layers of 256, train_pretrain.py's defaults):
- dense, same active parameters: the default SwiGLU width (704);
- MoE: --num_experts E --num_experts_per_tok K, each expert moe_intermediate_size wide (default: 704 / K,
  rounded up to 64), every layer sparse, QK-norm (the Qwen3-MoE layout);
- dense, same total parameters: one SwiGLU as wide as all the experts together (E x expert width).
Training: forward, loss (with the router's aux loss for the MoE), backward and a fused AdamW step on a fixed
batch. Decoding: greedy, batch 1, a 32-token prompt and 128 new tokens with the KV cache. Rounds alternate
between the models; medians are reported, float32, on the CPU unless --device says otherwise.

    python bench/moe_throughput.py
    python bench/moe_throughput.py --num_experts 8 --num_experts_per_tok 1 --rounds 5
"""

from __future__ import annotations

import argparse

import torch
from common import (
    CONFIGS,
    add_json_flag,
    cpu_flags,
    median,
    print_table,
    resolve_device,
    sync,
    time_alternating,
    write_json,
)

from minillm.infer.generation import generate
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM
from minillm.train.optim import build_optimizer


def models(experts: int, top_k: int, device: torch.device) -> dict[str, MiniLLM]:
    """The three sides, built from the default pretraining shape."""
    base = CONFIGS["pretrain"].to_dict()
    moe = LMConfig(**{**base, "qk_norm": True, "num_experts": experts, "num_experts_per_tok": top_k})
    wide = LMConfig(**{**base, "intermediate_size": experts * moe.moe_intermediate_size})
    torch.manual_seed(0)
    return {name: MiniLLM(config).to(device) for name, config in
            (("dense, same active", LMConfig(**base)), (f"MoE {experts} experts, top-{top_k}", moe),
             ("dense, same total", wide))}


def active_parameters(model: MiniLLM) -> int:
    """Parameters one token computes with (the k chosen experts of each sparse layer, not all E)."""
    c = model.config
    n = model.num_parameters()
    if c.num_experts:
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        n -= len(c.sparse_layers()) * (c.num_experts - c.num_experts_per_tok) * per_expert
    return n


def train_step(model: MiniLLM, device: torch.device, batch: int, seq: int):
    """A closure running one training step on a fixed batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g).to(device)
    optimizer = build_optimizer(model.train(), "adamw", 1e-4, 0.1, device)

    def step() -> None:
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def decode(model: MiniLLM, device: torch.device, new_tokens: int):
    """A closure decoding new_tokens greedily at batch 1 after a 32-token prompt."""
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)

    def run() -> None:
        with torch.no_grad():
            generate(model.eval(), prompt, max_new_tokens=new_tokens, temperature=0)

    return run


def main(argv: list[str] | None = None) -> None:
    """Print tokens/s of the three models, training and decoding."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(p)
    p.add_argument("--num_experts", type=int, default=4, help="experts per sparse layer (default: 4)")
    p.add_argument("--num_experts_per_tok", type=int, default=2, help="experts per token (default: 2)")
    p.add_argument("--batch_size", type=int, default=16, help="training sequences per step (default: 16)")
    p.add_argument("--seq_len", type=int, default=128, help="training sequence length (default: 128)")
    p.add_argument("--new_tokens", type=int, default=128, help="decoded tokens per call (default: 128)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds per side (default: 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per side (default: 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sides = models(args.num_experts, args.num_experts_per_tok, device)
    train_times = time_alternating({n: train_step(m, device, args.batch_size, args.seq_len) for n, m in sides.items()},
                                   args.warmup, args.rounds, device)
    decode_times = time_alternating({n: decode(m, device, args.new_tokens) for n, m in sides.items()},
                                    args.warmup, args.rounds, device)
    sync(device)
    print(f"# {cpu_flags()}; {args.threads} threads; torch {torch.__version__}; float32; training batch "
          f"{args.batch_size} x {args.seq_len}; decoding batch 1, 32 + {args.new_tokens} tokens")
    first = next(iter(sides))
    rows = []
    for name, model in sides.items():
        train_tps = args.batch_size * args.seq_len / median(train_times[name])
        decode_tps = args.new_tokens / median(decode_times[name])
        rows.append([name, f"{model.num_parameters() / 1e6:.2f}M", f"{active_parameters(model) / 1e6:.2f}M",
                     f"{train_tps:,.0f}", f"{train_tps / (args.batch_size * args.seq_len / median(train_times[first])):.2f}x",
                     f"{decode_tps:,.1f}", f"{decode_tps / (args.new_tokens / median(decode_times[first])):.2f}x"])
    print_table(["model", "parameters", "active per token", "training tokens/s", "vs dense active",
                 "decode tokens/s", "vs dense active"], rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
