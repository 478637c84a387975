"""The small levers of bench/RESULTS.md's "Levers" table, each timed side by side with its alternative.

- adamw: one AdamW step over a model's parameters, for-loop vs foreach vs fused (minillm builds the fused one);
- sdpa: one layer's attention forward + backward at training length, SDPA's math backend vs flash;
- loss: the LM loss over [tokens, vocab] forward + backward, F.cross_entropy vs logsumexp - gather;
- decode_attention: one query per head over a 64-token cache, SDPA vs minillm's two small matmuls;
- muon: Muon's Newton-Schulz iterations over the hidden matrices of a model, float32 vs bfloat16.

Medians of --rounds calls after two warm-up calls; the alternatives alternate call by call.

    python bench/levers.py                        # all of them, the 25.8M shape
    python bench/levers.py --only muon --config default
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import CONFIGS, add_json_flag, cpu_flags, median, print_table, write_json

from minillm.model.model import MiniLLM, decode_attention
from minillm.train.optim import hidden_matrices, orthogonalise


def alternate(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median milliseconds of each function, called in turn."""
    times = {name: [] for name in fns}
    for r in range(rounds + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: median(t) for name, t in times.items()}


def adamw(model: MiniLLM) -> dict[str, callable]:
    """AdamW steps over the model's parameters (gradients set once), three implementations."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    kinds = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    opts = {name: torch.optim.AdamW(params, lr=1e-9, **kw) for name, kw in kinds.items()}
    return {name: opt.step for name, opt in opts.items()}


def sdpa(model: MiniLLM, seq_len: int = 256, batch: int = 8) -> dict[str, callable]:
    """One layer's causal attention, forward and backward, per SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = model.config
    D = c.hidden_size // c.num_attention_heads
    q = torch.randn(batch, c.num_attention_heads, seq_len, D, requires_grad=True)
    k = torch.randn(batch, c.num_key_value_heads, seq_len, D, requires_grad=True)
    v = torch.randn(batch, c.num_key_value_heads, seq_len, D, requires_grad=True)

    def run(backend):
        def call():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        return call

    return {"math": run(SDPBackend.MATH), "flash": run(SDPBackend.FLASH_ATTENTION)}


def loss(model: MiniLLM, tokens: int = 2048) -> dict[str, callable]:
    """The loss over [tokens, vocab] logits, forward and backward, two formulations."""
    logits = torch.randn(tokens, model.config.vocab_size, requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (tokens,))

    def lse_gather():
        (torch.logsumexp(logits, -1) - logits.gather(1, labels[:, None])[:, 0]).mean().backward()

    return {"F.cross_entropy": lambda: F.cross_entropy(logits, labels).backward(), "logsumexp - gather": lse_gather}


def decode(model: MiniLLM, cached: int = 64) -> dict[str, callable]:
    """One decode step's attention in every layer (batch 1), SDPA vs two small matmuls."""
    c = model.config
    D = c.hidden_size // c.num_attention_heads
    q = torch.randn(1, c.num_attention_heads, 1, D)
    k = torch.randn(1, c.num_key_value_heads, cached, D)
    v = torch.randn(1, c.num_key_value_heads, cached, D)
    layers = range(c.num_hidden_layers)
    return {"SDPA": lambda: [F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for _ in layers],
            "two matmuls": lambda: [decode_attention(q, k, v) for _ in layers]}


def muon(model: MiniLLM) -> dict[str, callable]:
    """Newton-Schulz over every hidden matrix (what one Muon step adds to AdamW's work), in two dtypes."""
    names = set(hidden_matrices(model))
    grads = [torch.randn_like(p) for n, p in model.named_parameters() if n in names]

    def run(dtype: torch.dtype):
        return lambda: [orthogonalise(g, dtype=dtype) for g in grads]

    return {"float32": run(torch.float32), "bfloat16": run(torch.bfloat16)}


LEVERS = {"adamw": adamw, "sdpa": sdpa, "loss": loss, "decode_attention": decode, "muon": muon}


def main(argv: list[str] | None = None) -> None:
    """Time each lever's alternatives and print one table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(p)
    p.add_argument("--config", choices=sorted(CONFIGS), default="default", help="model shape (default: default)")
    p.add_argument("--only", choices=sorted(LEVERS), action="append", help="these levers only (repeatable)")
    p.add_argument("--rounds", type=int, default=10, help="timed calls per alternative (median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MiniLLM(CONFIGS[args.config])
    print(f"# {args.config} shape ({model.num_parameters() / 1e6:.1f}M parameters); {cpu_flags()}; "
          f"{args.threads} threads; torch {torch.__version__}")
    rows = []
    for name in args.only or LEVERS:
        for alternative, ms in alternate(LEVERS[name](model), args.rounds).items():
            rows.append([name, alternative, f"{ms:.2f}"])
    print_table(["lever", "alternative", "ms per call (median)"], rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
