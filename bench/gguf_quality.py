"""What GGUF quantization costs: held-out bits per byte in llama.cpp for f32, q8_0, q5_k_m and q4_k_m exports of one
model, beside minillm's own f32 number (issue 50, item 6).

Each export is made by export_gguf.py (k-quants by llama.cpp's own quantizer) and read by llama.cpp through
llama-cpp-python (the dev extra). Every held-out document is scored as eval_ppl.py scores it: after an
<|endoftext|> prefix, its closing <|endoftext|> included; documents longer than the model's training context are cut
to it (the same cut for every side), so the f32 row must equal minillm's own.

    python bench/gguf_quality.py --model out/pretrain [--limit 233] [--json quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import environment, print_table

from minillm.data.tokenizer import Tokenizer
from minillm.eval.perplexity import read_documents
from minillm.export.llama_cpp_loader import load_llama_cpp
from minillm.model.model import MiniLLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import export_gguf  # noqa: E402


def log_softmax_at(scores: np.ndarray, targets: list[int]) -> np.ndarray:
    """log p(target) per row of raw logits, in float64."""
    rows = scores.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    return rows[np.arange(len(targets)), targets] - logz


def main(argv: list[str] | None = None) -> None:
    """Print the table; optionally write it as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained model directory")
    p.add_argument("--data", default=str(REPO / "dataset" / "eval.jsonl"), help="held-out documents")
    p.add_argument("--limit", type=int, default=0, help="score only the first N documents (0: all)")
    p.add_argument("--dtypes", default="f32,q8_0,q5_k_m,q4_k_m", help="exports to score, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    model = MiniLLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(args.model)
    context = model.config.trained_context or model.config.max_position_embeddings
    texts = read_documents(args.data)[:args.limit or None]
    eos = tokenizer.eos_id
    docs = [([eos] + tokenizer.encode(t) + [eos])[:context] for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(d) - 1 for d in docs)

    def bits(nll: float) -> float:
        return nll / (n_bytes * math.log(2))

    with torch.inference_mode():
        ours = -sum(torch.log_softmax(model(torch.tensor([d])).logits[0, :-1].double(), -1)
                    .gather(-1, torch.tensor(d[1:])[:, None]).sum().item() for d in docs)
    results = {"minillm f32 (torch)": {"bits_per_byte": bits(ours), "mib": None}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            path = Path(tmp) / f"m-{dtype}.gguf"
            if export_gguf.main(["--model", args.model, "--out", str(path), "--dtype", dtype, "--force"]) != 0:
                raise SystemExit(f"export to {dtype} failed")
            llm = load_llama_cpp(path, repack=False, n_ctx=context, n_threads=args.threads, verbose=False,
                                 logits_all=True, type_k=0, type_v=0)
            nll = 0.0
            for d in docs:
                llm.reset()
                llm.eval(d[:-1])
                nll -= float(log_softmax_at(np.array(llm.scores[:len(d) - 1]), d[1:]).sum())
            results[f"llama.cpp {dtype}"] = {"bits_per_byte": bits(nll), "mib": path.stat().st_size / 2**20}
            del llm
    base = results["minillm f32 (torch)"]["bits_per_byte"]
    print(f"# {args.model}: {len(docs)} documents, {n_tokens:,} scored tokens, {n_bytes:,} bytes, context {context}; "
          f"{environment(torch.device('cpu'))}")
    print_table(["weights", "file MiB", "held-out bits/byte", "vs minillm f32"],
                [[name, "-" if r["mib"] is None else f"{r['mib']:.1f}", f"{r['bits_per_byte']:.4f}",
                  f"{r['bits_per_byte'] - base:+.4f}"] for name, r in results.items()])
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "documents": len(docs), "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
