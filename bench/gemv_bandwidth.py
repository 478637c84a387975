"""How fast torch reads weights in batch-1 decoding: the GEMVs of one decode step, alone, at 1 and 2 threads.

Decoding one token multiplies one row by every weight matrix of the model (the fused q|k|v, o, gate|up and
down projections of each block, then the LM head), so it reads all the weights once. This times exactly those
products, outside any model, and compares their bandwidth with a plain `sum` over the same bytes (what the
memory system gives one pass of reads). A GEMV that uses the cores' bandwidth reads about as fast as the sum;
one that uses a single core's does not speed up with a second thread. The last columns time minillm's decode
fast path for the same products: each written as a multiply-and-sum (model/linear.py's row_product), all in one
torch.compile graph, which inductor turns into reductions split over the threads.

    python bench/gemv_bandwidth.py                  # the 25.8M shape (103 MB of weights per token)
    python bench/gemv_bandwidth.py --config pretrain --config 124m
"""

from __future__ import annotations

import argparse
import time

import torch
from common import CONFIGS, add_json_flag, cpu_flags, median, print_table, write_json

from minillm.model.linear import row_product
from minillm.model.model import MiniLLM


def step_matrices(config_name: str) -> list[torch.Tensor]:
    """The weight matrices one decode step multiplies by (tied head included once)."""
    model = MiniLLM(CONFIGS[config_name])
    return [p.detach().contiguous() for name, p in model.named_parameters()
            if p.dim() == 2 and name not in ("embed_tokens.weight", "lm_head.weight")] + [model.lm_head.weight.detach()]


def seconds(fn, rounds: int) -> float:
    """Median seconds of fn() over `rounds` calls, after two warm-up calls."""
    times = []
    for r in range(rounds + 2):
        start = time.perf_counter()
        fn()
        if r >= 2:
            times.append(time.perf_counter() - start)
    return median(times)


def main(argv: list[str] | None = None) -> None:
    """Print GB/s of the decode GEMVs and of a sum over the same bytes, at each thread count."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(p)
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="model shape(s) (default: default)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    p.add_argument("--rounds", type=int, default=20, help="timed passes per measurement (median)")
    args = p.parse_args(argv)
    print(f"# {cpu_flags()}; torch {torch.__version__}")
    rows = []
    for config_name in args.config or ["default"]:
        weights = step_matrices(config_name)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        xs = [torch.randn(w.shape[1]) for w in weights]
        rows_1C = [x[None] for x in xs]
        fast = torch.compile(lambda xs, ws: [row_product(x, w) for x, w in zip(xs, ws)])
        for threads in args.threads:
            torch.set_num_threads(threads)
            torch._dynamo.reset()  # inductor fixes the thread count when it compiles
            fast(rows_1C, weights)
            gemv = seconds(lambda ws=weights, xs=xs: [torch.mv(w, x) for w, x in zip(ws, xs)], args.rounds)
            total = seconds(lambda ws=weights: [w.sum() for w in ws], args.rounds)
            reduction = seconds(lambda ws=weights, f=fast, xs=rows_1C: f(xs, ws), args.rounds)
            rows.append([config_name, f"{nbytes / 1e6:.0f}", str(threads), f"{gemv * 1e3:.2f}",
                         f"{nbytes / gemv / 1e9:.1f}", f"{nbytes / total / 1e9:.1f}", f"{total / gemv:.2f}",
                         f"{reduction * 1e3:.2f}", f"{nbytes / reduction / 1e9:.1f}"])
    print_table(["shape", "weights MB", "threads", "GEMVs ms", "GEMV GB/s", "sum GB/s", "GEMV / sum speed",
                 "fast path ms", "fast path GB/s"], rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
