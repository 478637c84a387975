"""Does a chat model's line length follow the requested form? A finer view than eval_tasks.py's greedy check.

eval_tasks.py's form and line-length checks ask four distinct prompts (请写一首唐代的五言绝句 ... 七言律诗),
greedily, so a model's rate moves in whole prompts. Here each model samples --samples answers per prompt
(temperature 1, seeded) and the first verse clause of each answer is counted as 5 characters, 7, or other.
A model that follows the request writes more 5s after 五言 and more 7s after 七言; one that ignores it
writes the same mix after both.

    python bench/form_following.py --model out/sft
    python bench/form_following.py --model old_sft --model out/sft --samples 96
"""

from __future__ import annotations

import argparse

import torch

from minillm.data.tokenizer import load_tokenizer
from minillm.eval.tasks import FORM_PROMPT, answer_body, clauses
from minillm.infer.generation import generate
from minillm.model.model import MiniLLM

FORMS = ["五言绝句", "五言律诗", "七言绝句", "七言律诗"]
SIZES = ("5", "7", "other")


def first_clause_size(answer: str) -> str:
    """"5" or "7" when the answer's first verse clause has that many characters, else "other"."""
    parts = clauses("\n".join(answer_body(answer)))
    size = str(len(parts[0])) if parts else ""
    return size if size in ("5", "7") else "other"


def first_clause_lengths(model_dir: str, samples: int, seed: int) -> dict[str, dict[str, int]]:
    """For each form prompt: how many sampled answers open with a 5-, a 7- or an other-length clause."""
    model = MiniLLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    for form in FORMS:
        prompt = FORM_PROMPT.format(dynasty="唐", form=form)
        ids = tokenizer.render_conversation([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
        out_BT = generate(model, [ids] * samples, max_new_tokens=40, temperature=1.0, generator=generator,
                          eos_token_id=[tokenizer.im_end_id, tokenizer.eos_id])
        tally = dict.fromkeys(SIZES, 0)
        for row in out_BT.tolist():
            tally[first_clause_size(tokenizer.decode(row[len(ids):]))] += 1
        counts[form] = tally
    return counts


def main(argv: list[str] | None = None) -> None:
    """Print, per model and form prompt, the first-clause lengths of sampled answers."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True,
                   help="a chat model directory (repeat to compare models in one run)")
    p.add_argument("--samples", type=int, default=48, help="answers sampled per prompt (default: 48)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = p.parse_args(argv)
    print("| model | asked | first clause 5 | 7 | other |\n|---|---|---|---|---|")
    for model_dir in args.model:
        counts = first_clause_lengths(model_dir, args.samples, args.seed)
        for size in "五七":
            total = {k: sum(counts[f][k] for f in FORMS if f.startswith(size)) for k in SIZES}
            print(f"| {model_dir} | {size}言 | {total['5']} | {total['7']} | {total['other']} |")


if __name__ == "__main__":
    main()
