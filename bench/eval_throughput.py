"""Perplexity-evaluation throughput: minillm's evaluate_perplexity vs a plain transformers forward.

Both sides score the same tokenized documents of the eval set with the same strided windows
(minillm.eval.perplexity.windows), the same batches (longest first, right-padded with eos) and a summed
float64 cross-entropy; the transformers side is a plain loop of model(input_ids).logits under
inference_mode. The two totals are asserted equal within 1e-5 relative; calls alternate between the
sides after warm-up, and scored tokens per second come from the median.

    python bench/eval_throughput.py
    python bench/eval_throughput.py --docs 233 --max_length 512 --stride 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    SIDES,
    add_common_args,
    add_json_flag,
    environment,
    load_side,
    median,
    peak_memory,
    print_ratio,
    print_table,
    resolve_device,
    setup,
    time_alternating,
    write_checkpoint,
    write_json,
)

from minillm.data.tokenizer import load_tokenizer
from minillm.eval.perplexity import evaluate_perplexity, read_documents, window_batch, window_jobs

ROOT = Path(__file__).resolve().parent.parent


def transformers_nll(model: torch.nn.Module, documents: list[list[int]], max_length: int, stride: int,
                     batch_size: int, eos_id: int, device: torch.device) -> tuple[float, int]:
    """(summed NLL, scored tokens) of the windows evaluate_perplexity scores, through a plain HF forward."""
    jobs = window_jobs(documents, max_length, stride)  # the windows and batches evaluate_perplexity scores
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for i in range(0, len(jobs), batch_size):
            x_BT, y_BT = window_batch(documents, jobs[i:i + batch_size], eos_id)
            logits_BTV = model(input_ids=x_BT.to(device)).logits
            nll_sum += F.cross_entropy(logits_BTV.flatten(0, 1).float(), y_BT.to(device).flatten(),
                                       ignore_index=-100, reduction="sum").double()
    return nll_sum.item(), sum(end - first for *_, end, first in jobs)


def make_eval(side: str, model: torch.nn.Module, device: torch.device, documents: list[list[int]],
              max_length: int, stride: int, batch_size: int, eos_id: int):
    """A closure that scores all documents; returns (summed NLL, scored tokens)."""
    if side == "minillm":
        def run() -> tuple[float, int]:
            result = evaluate_perplexity(model, documents, max_length, stride, batch_size, eos_id, device=device)
            return result.nll_sum, result.tokens
        return run
    return lambda: transformers_nll(model, documents, max_length, stride, batch_size, eos_id, device)


def eval_memory_workload(side, model, device, **kwargs):
    """One full evaluation."""
    return make_eval(side, model, device, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(parser)
    add_common_args(parser)
    parser.add_argument("--data", default=str(ROOT / "dataset/eval.jsonl"), help="jsonl of {'text': ...}")
    parser.add_argument("--docs", type=int, default=64, help="score the first this many documents")
    parser.add_argument("--max_length", type=int, default=256, help="window length")
    parser.add_argument("--stride", type=int, default=128, help="window stride")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward")
    parser.set_defaults(warmup=1, rounds=5)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    setup(args.threads, args.seed)
    tokenizer = load_tokenizer()
    documents = tokenizer.encode_batch(read_documents(args.data)[:args.docs])

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model_dir or write_checkpoint(args.config, tmp, args.seed)
        models = {side: load_side(side, directory, device) for side in SIDES}
        if models["minillm"].config.vocab_size < tokenizer.vocab_size:
            raise SystemExit(f"the model's vocabulary ({models['minillm'].config.vocab_size}) is smaller than the "
                             f"tokenizer's ({tokenizer.vocab_size})")
        kwargs = dict(documents=documents, max_length=args.max_length, stride=args.stride,
                      batch_size=args.batch_size, eos_id=tokenizer.eos_id)
        runs = {side: make_eval(side, models[side], device, **kwargs) for side in SIDES}
        totals = {side: runs[side]() for side in SIDES}
        (ours, n), (theirs, n_ref) = totals["minillm"], totals["transformers"]
        assert n == n_ref, (n, n_ref)
        assert abs(ours - theirs) <= 1e-5 * abs(theirs), totals
        times = time_alternating(runs, args.warmup, args.rounds, device)
        memory = {} if args.no_memory else peak_memory(eval_memory_workload, directory, device, args.threads,
                                                       **kwargs)

    print(f"# perplexity eval: {args.model_dir or args.config}, {len(documents)} documents of {args.data}, "
          f"{n} scored tokens, windows {args.max_length} / stride {args.stride}, batch {args.batch_size}, float32")
    print(f"# {environment(device)}")
    print(f"# summed NLL {ours:.6f} vs {theirs:.6f} (relative difference {abs(ours - theirs) / abs(theirs):.1e}); "
          f"perplexity {torch.tensor(ours / n).exp().item():.4f}")
    header = ["side", "call ms (median)", "min", "tokens/s"]
    if memory:
        header += ["peak MiB", "workload MiB"]
    rows, tps = [], {}
    for side in SIDES:
        t = median(times[side])
        tps[side] = n / t
        row = [side, f"{t * 1e3:.1f}", f"{min(times[side]) * 1e3:.1f}", f"{tps[side]:,.0f}"]
        if memory:
            row += [f"{memory[side].peak:,.0f}", f"{memory[side].extra:,.0f}"]
        rows.append(row)
    print_table(header, rows)
    print_ratio(tps, times)
    write_json(args.json)


if __name__ == "__main__":
    main()
