"""How long a running stream stalls while the server reads a long prompt: whole prefill against chunked.

In-process (the scheduler serve.py runs, no HTTP): one greedy sequence streams; once it has produced 8
tokens a second sequence with a --long_prompt-token prompt arrives. Reported for each --prefill_chunk: the
running stream's longest gap between two tokens, its median gap, and the long sequence's time to first
token, medians over --rounds runs.

    python bench/prefill_stall.py                           # 25.8M shape, 1,500-token prompt, chunks 0 and 256
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from common import CONFIGS, add_json_flag, environment, median, print_table, setup, write_json

from minillm.infer.serving import GenerationRequest, Sampling, Scheduler
from minillm.model.model import MiniLLM


def one_run(model: MiniLLM, chunk: int, long_prompt: list[int], context: int) -> tuple[float, float, float]:
    """(longest gap s, median gap s, long prompt's time to first token s) of one run."""
    times: list[float] = []
    first: list[float] = []
    done = threading.Semaphore(0)
    short = GenerationRequest([5, 6, 7], 120, Sampling(0.0), [],
                              lambda t: times.append(time.perf_counter()) if t is not None else done.release())
    long = GenerationRequest(long_prompt, 4, Sampling(0.0), [],
                             lambda t: first.append(time.perf_counter()) if t is not None else done.release())
    scheduler = Scheduler(model, max_batch=4, context=context, prefill_chunk=chunk).start()
    try:
        scheduler.submit([short])
        while len(times) < 8:
            time.sleep(0.0005)
        sent = time.perf_counter()
        scheduler.submit([long])
        done.acquire()
        done.acquire()
    finally:
        scheduler.stop()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return max(gaps), median(gaps), first[0] - sent


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(p)
    p.add_argument("--config", choices=sorted(CONFIGS), default="default", help="model shape (random weights)")
    p.add_argument("--long_prompt", type=int, default=1500, help="tokens of the prompt that arrives mid-stream")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 256], help="--prefill_chunk values (0: whole)")
    p.add_argument("--rounds", type=int, default=3, help="runs per value (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    setup(args.threads, seed=0)
    model = MiniLLM(CONFIGS[args.config]).eval()
    long_prompt = torch.randint(3, model.config.vocab_size, (args.long_prompt,)).tolist()
    context = min(model.config.max_position_embeddings, args.long_prompt + 130)
    rows = []
    for chunk in args.chunks:
        runs = [one_run(model, chunk, long_prompt, context) for _ in range(args.rounds)]
        worst, typical, ttft = (median([r[i] for r in runs]) for i in range(3))
        rows.append([str(chunk or "0 (whole)"), f"{worst * 1e3:.0f}", f"{typical * 1e3:.1f}", f"{ttft * 1e3:.0f}"])
    print(f"# {args.config}, a {args.long_prompt}-token prompt arriving beside one stream, max_batch 4; "
          f"{environment(torch.device('cpu'))}")
    print_table(["--prefill_chunk", "stream's longest gap ms", "median gap ms", "long prompt's first token ms"], rows)
    write_json(args.json)


if __name__ == "__main__":
    main()
