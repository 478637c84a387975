"""The serving scheduler alone (no HTTP, no clients): batched against one at a time, and a lone request.

serve.py's `Scheduler` in this process: 16 greedy sequences (prompts of 20-65 tokens, 48 new tokens each)
submitted at once to a scheduler with --max_batch 16 and to one with --max_batch 1, then a lone sequence to
each. Prints aggregate tokens/s and the ratios issue 30 sets targets for (16 sequences: batched >= 6x one at
a time; a lone request at max_batch 16 no slower than 1.2x its max_batch 1 speed). Rounds alternate; medians.

    python bench/scheduler_throughput.py                  # 25.8M shape, float32, 1 thread (serve.py's default here)
    python bench/scheduler_throughput.py --quantize int8
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from common import CONFIGS, add_json_flag, environment, median, print_table, setup, write_json

from minillm.infer.serving import GenerationRequest, Sampling, Scheduler
from minillm.model.linear import quantize_int8, rows_independent
from minillm.model.model import MiniLLM

NEW_TOKENS = 48


def tokens_per_second(model: MiniLLM, prompts: list[list[int]], max_batch: int, context: int,
                      invariant: bool = True) -> tuple[float, list]:
    """Aggregate new tokens/s of greedy answers to `prompts` submitted at once, and the answers."""
    done = threading.Semaphore(0)
    out: list[list[int]] = [[] for _ in prompts]
    requests = [GenerationRequest(p, NEW_TOKENS, Sampling(0.0), [],
                                  lambda t, i=i: out[i].append(t) if t is not None else done.release())
                for i, p in enumerate(prompts)]
    scheduler = Scheduler(model, max_batch=max_batch, context=context,
                          rows_independent=None if invariant else True).start()
    try:
        start = time.perf_counter()
        scheduler.submit(requests)
        for _ in prompts:
            done.acquire()
        seconds = time.perf_counter() - start
    finally:
        scheduler.stop()
    return NEW_TOKENS * len(prompts) / seconds, out


def main(argv: list[str] | None = None) -> None:
    """Print the table and the two ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(p)
    p.add_argument("--config", choices=sorted(CONFIGS), default="default", help="model shape (random weights)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="weights as serve.py --quantize")
    p.add_argument("--threads", type=int, default=1, help="torch threads (serve.py: the cores minus one)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    p.add_argument("--context", type=int, default=512, help="tokens per slot")
    p.add_argument("--batch_invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="as serve.py: feed every slot where the CPU's products depend on the row count")
    args = p.parse_args(argv)
    setup(args.threads, seed=0)
    model = MiniLLM(CONFIGS[args.config]).eval()
    if args.quantize == "int8":
        quantize_int8(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (20 + 3 * i,), generator=g).tolist() for i in range(16)]
    cases = {("16 sequences", 16): prompts, ("16 sequences", 1): prompts,
             ("1 sequence", 16): prompts[:1], ("1 sequence", 1): prompts[:1]}
    rates: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    answers = {}
    for _ in range(args.rounds):
        for case, group in cases.items():
            rate, answers[case] = tokens_per_second(model, group, case[1], args.context, args.batch_invariant)
            rates[case].append(rate)
    same = answers[("16 sequences", 16)] == answers[("16 sequences", 1)]
    rows = [[what, str(mb), f"{median(rates[(what, mb)]):.1f}"] for what, mb in cases]
    feeds_all = args.batch_invariant and not rows_independent(model, 16)
    print(f"# {args.config}, {args.quantize} weights, {args.threads} thread(s), {NEW_TOKENS} new tokens each, "
          f"context {args.context}, steps feed {'every slot' if feeds_all else 'the active slots'}; "
          f"{environment(torch.device('cpu'))}")
    print_table(["load", "--max_batch", "tokens/s (median)"], rows)
    batched = median(rates[("16 sequences", 16)]) / median(rates[("16 sequences", 1)])
    lone = median(rates[("1 sequence", 1)]) / median(rates[("1 sequence", 16)])
    print(f"\n16 sequences, batched / one at a time: {batched:.2f}x (target >= 6x); a lone request at max_batch 16 "
          f"is {lone:.2f}x slower than at max_batch 1 (target <= 1.2x); batched answers equal one-at-a-time: {same}")
    write_json(args.json)


if __name__ == "__main__":
    main()
