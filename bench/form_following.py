"""Does a chat model's line length follow the requested form? A finer view than eval_tasks.py's greedy check.

eval_tasks.py's form and line-length checks ask four distinct prompts (请写一首唐代的五言绝句 ... 七言律诗),
greedily, so a model's rate moves in whole prompts. Here each model samples --samples answers per prompt
(temperature 1, seeded) and the first verse clause of each answer is counted as 5 characters, 7, or other.
A model that follows the request writes more 5s after 五言 and more 7s after 七言; one that ignores it
writes the same mix after both.

    python bench/form_following.py --model out/sft
    python bench/form_following.py --model old_sft --model out/sft --samples 96
    python bench/form_following.py --model out/sft --teacher_forced 200

--teacher_forced N asks instead, on the first N 七言 form examples of the SFT set (dataset/sft.jsonl): with the
answer given up to the fifth character of its first verse line, what probability does the model put on a comma
next, under the real 七言 request and with 五言 written in its place? A model that reads the request puts less
there after 七言 (the line goes on) than after 五言 (the line ends).
"""

from __future__ import annotations

import argparse
import math

import torch
from common import add_json_flag, write_json

from minillm.data.jsonl import iter_records
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


def comma_probabilities(model_dir: str, data: str, limit: int) -> dict[str, float]:
    """Mean P(comma | the first five characters of a 七言 answer) under the 七言 request and under 五言."""
    model = MiniLLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    comma = tokenizer.encode("，")
    assert len(comma) == 1, "the tokenizer has no single comma token"
    sums, n = {"七言": 0.0, "五言": 0.0}, 0
    for _, record in iter_records(data):
        turns = record.get("conversations", [])
        if n == limit or len(turns) != 2 or "七言" not in turns[0]["content"]:
            if n == limit:
                break
            continue
        title, _, body = turns[1]["content"].partition("\n")
        if not clauses(body) or len(clauses(body)[0]) != 7:
            continue
        for form in sums:
            prompt = turns[0]["content"].replace("七言", form)
            ids = tokenizer.render_conversation([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
            ids = ids + tokenizer.encode(f"{title}\n{body[:5]}")
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            sums[form] += math.exp(torch.log_softmax(logits, -1)[comma[0]].item())
        n += 1
    return {form: total / max(n, 1) for form, total in sums.items()} | {"examples": n}


def main(argv: list[str] | None = None) -> None:
    """Print, per model and form prompt, the first-clause lengths of sampled answers."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_json_flag(p)
    p.add_argument("--model", action="append", required=True,
                   help="a chat model directory (repeat to compare models in one run)")
    p.add_argument("--samples", type=int, default=48, help="answers sampled per prompt (default: 48)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--teacher_forced", type=int, default=0, metavar="N",
                   help="instead: P(comma after five characters) on N 七言 SFT examples, asked as 七言 and as 五言")
    p.add_argument("--data", default="dataset/sft.jsonl", help="SFT set of --teacher_forced (default: %(default)s)")
    args = p.parse_args(argv)
    results = []
    if args.teacher_forced:
        print("| model | 七言 examples | P(comma) asked 七言 | asked 五言 |\n|---|---|---|---|")
        for model_dir in args.model:
            r = comma_probabilities(model_dir, args.data, args.teacher_forced)
            print(f"| {model_dir} | {r['examples']} | {r['七言']:.3f} | {r['五言']:.3f} |")
            results.append({"model": model_dir, **r})
        write_json(args.json, teacher_forced=results)
        return
    print("| model | asked | first clause 5 | 7 | other |\n|---|---|---|---|---|")
    for model_dir in args.model:
        counts = first_clause_lengths(model_dir, args.samples, args.seed)
        for size in "五七":
            total = {k: sum(counts[f][k] for f in FORMS if f.startswith(size)) for k in SIZES}
            print(f"| {model_dir} | {size}言 | {total['5']} | {total['7']} | {total['other']} |")
            results.append({"model": model_dir, "asked": f"{size}言", **total})
    write_json(args.json, first_clause=results)


if __name__ == "__main__":
    main()
