"""How often weight-only int8 (generate.py --quantize int8) picks the float32 model's greedy token.

Teacher-forced: the float32 model answers eval_tasks.py's held-out request prompts greedily; along each
prompt + answer, both models predict every answer token, and the rate is the share of positions where the
int8 model's most likely token is the float32 one. Also prints the largest logit difference.

    python bench/int8_agreement.py --model out/sft
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cpu_flags

from minillm.data.jsonl import iter_records
from minillm.data.tokenizer import load_tokenizer
from minillm.eval.perplexity import read_documents
from minillm.eval.tasks import known_tunes, parse_poem, requests
from minillm.infer.generation import generate
from minillm.model.linear import quantize_int8
from minillm.model.model import MiniLLM


def main(argv: list[str] | None = None) -> None:
    """Print the agreement over the request prompts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="out/sft", help="a chat model directory (default: %(default)s)")
    p.add_argument("--limit", type=int, default=32, help="prompts per request kind, as eval_tasks.py")
    p.add_argument("--max_new_tokens", type=int, default=160, help="tokens per answer, as eval_tasks.py")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = MiniLLM.from_pretrained(args.model, dtype=torch.float32).eval()
    int8 = quantize_int8(MiniLLM.from_pretrained(args.model, dtype=torch.float32)).eval()
    tokenizer = load_tokenizer(args.model)
    poems = [p for p in (parse_poem(t) for t in read_documents("dataset/eval.jsonl")) if p is not None]
    tunes = known_tunes([r for _, r in iter_records("dataset/sft.jsonl")])
    prompts = list(dict.fromkeys(r.prompt for r in requests(poems, tunes, args.limit)))
    stops = [*tokenizer.turn_end_ids, tokenizer.eos_id]
    agree = total = 0
    worst = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for text in prompts:
            prompt, _ = tokenizer.render_conversation([{"role": "user", "content": text}], add_generation_prompt=True)
            ids = generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=0, eos_token_id=stops)
            a_T, b_T = model(ids).logits[0], int8(ids).logits[0]
            answer = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions that predict answer tokens
            agree += int((a_T[answer].argmax(-1) == b_T[answer].argmax(-1)).sum())
            total += answer.stop - answer.start
            worst = max(worst, float((a_T - b_T).abs().max()))
    print(f"# {args.model}: {len(prompts)} prompts, {total} answer positions; {cpu_flags()}; torch {torch.__version__}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"int8 picks the float32 greedy token at {agree}/{total} = {100 * agree / total:.2f}% of positions; "
          f"largest logit difference {worst:.4f}")


if __name__ == "__main__":
    main()
