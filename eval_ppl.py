"""Perplexity and bits per byte of a saved model on held-out text: a thin CLI over minillm.eval.perplexity.

    python eval_ppl.py --model out/pretrain
    torchrun --nproc_per_node 2 eval_ppl.py --model out/pretrain   # documents split, sums reduced
"""

from __future__ import annotations

import argparse
import math
import sys

from minillm.cli import (
    BAD_INPUT,
    CliError,
    add_model_flags,
    check_output_file,
    default_context,
    load_trained,
    report,
)
from minillm.device import DTYPES, resolve_dtype
from minillm.eval.perplexity import evaluate_perplexity, read_documents
from minillm.files import write_json
from minillm.train.distributed import setup_distributed, teardown_distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="eval_ppl.py",
        description="Perplexity of a causal LM on held-out documents. Each document is scored on its own "
                    "after an <|endoftext|> prefix, its closing <|endoftext|> included; long documents "
                    "are scored with strided sliding windows. Aggregated over tokens.")
    add_model_flags(p)
    p.add_argument("--data", default="dataset/eval.jsonl",
                   help="JSON lines with a \"text\" field per document, or a .txt file scored as one "
                        "document (default: %(default)s, the shipped held-out split)")
    p.add_argument("--max_length", type=int, default=None,
                   help="input tokens per window; default: the context the model was trained on, as "
                        "train_*.py record it in config.json (longer windows would measure extrapolation), "
                        "else the model's max_position_embeddings")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens the window advances by (1..max_length); each window re-reads "
                        "max_length - stride tokens of context and scores only new tokens. Smaller is "
                        "more accurate and slower (default: max_length, i.e. no overlap)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default: auto = cuda if available, else cpu; under torchrun "
                        "cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", choices=["auto", *DTYPES],
                   help="compute dtype; bfloat16/float16 run under autocast with float32 weights (default: "
                        "%(default)s, so the number does not depend on the machine; auto = the training rule: "
                        "bfloat16 on GPUs and on CPUs with native bf16 matrix units, else float32)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result (sums, metrics and settings) as JSON to PATH")
    return p.parse_args(argv)


def run(args: argparse.Namespace, env) -> dict | None:
    """Load, score and report; returns the JSON-ready result (on every rank)."""
    model, tokenizer, tokenizer_dir = load_trained(args, env.device)
    tokenizer_source = "default" if tokenizer_dir is None else str(tokenizer_dir)
    limit = model.config.max_position_embeddings
    max_length, source = ((args.max_length, "--max_length") if args.max_length is not None else
                          default_context(model.config))
    if not 1 <= max_length <= limit:
        raise CliError(f"--max_length must be in [1, {limit}] (the model's max_position_embeddings), "
                       f"got {max_length}")
    stride = args.stride if args.stride is not None else max_length
    if not 1 <= stride <= max_length:
        raise CliError(f"--stride must be in [1, --max_length={max_length}], got {stride}")
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be >= 1, got {args.batch_size}")
    dtype = resolve_dtype(args.dtype, env.device)
    check_output_file(args.json, "--json")  # before the evaluation, which a failed write would lose

    texts = read_documents(args.data)
    documents = tokenizer.encode_batch(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes == 0:
        raise CliError(f"--data {args.data}: the documents hold no text (0 bytes): nothing to score")
    result = evaluate_perplexity(model, documents, max_length=max_length, stride=stride,
                                 batch_size=args.batch_size, eos_id=tokenizer.eos_id, n_bytes=n_bytes,
                                 device=env.device, dtype=dtype, progress=env.is_main)
    settings = {"model": str(args.model), "adapter": args.adapter and str(args.adapter), "data": str(args.data),
                "tokenizer": tokenizer_source,
                "max_length": max_length, "max_length_from": source, "stride": stride, "batch_size": args.batch_size,
                "device": str(env.device), "dtype": str(dtype).removeprefix("torch."), "world_size": env.world_size}
    return {**settings, **result.to_dict()}


def format_table(r: dict) -> str:
    """The result as an aligned two-column table."""
    rows = [
        ("model", r["model"] + (f" + adapter {r['adapter']}" if r.get("adapter") else "")),
        ("data", r["data"]),
        ("windows", f"max_length {r['max_length']} ({r['max_length_from']}), stride {r['stride']}"),
        ("compute", f"{r['dtype']} on {r['device']} x {r['world_size']}"),
        ("documents", f"{r['documents']:,}"),
        ("scored tokens", f"{r['tokens']:,}"),
        ("mean NLL (nats/token)", f"{r['mean_nll']:.4f}"),
        ("perplexity", f"{r['perplexity']:.3f}"),
        ("bits per byte", f"{r['bits_per_byte']:.4f}"),
        ("tokens/s", f"{r['tokens_per_second']:,.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input gives one message on stderr and exit status 1, no traceback."""
    args = parse_args(argv)
    env = None
    try:
        env = setup_distributed(None if args.device == "auto" else args.device)
        result = run(args, env)
    except BAD_INPUT as e:
        return report("eval_ppl.py", e)
    finally:
        teardown_distributed()
    if env.is_main:
        print(format_table(result))
        if args.json:
            # NaN (e.g. zero bytes) is not JSON; write null instead.
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
            write_json(args.json, clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
