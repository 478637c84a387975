"""Which part of a two-word request defeats a chat model: the wording, or the words (issue 45)?

    python bench/words_copy.py --model out/sft

Greedy answers to 24 requests per condition: the canonical wording of eval_tasks.py or a held-out one
(minillm/eval/heldout.py) or one composed for training (dataset/wordings.json), with IMAGERY words, words the SFT
set asked for, or the held-out poems' own words (never asked in training). Prints how many answers use both words,
and how many the first.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import torch

from minillm.data.tokenizer import Tokenizer
from minillm.eval.heldout import HELDOUT, document_frequency
from minillm.eval.perplexity import read_documents
from minillm.eval.tasks import IMAGERY, WORDS_PROMPT, answer_all, check_words, parse_poem, poem_words
from minillm.model.model import MiniLLM

REPO = Path(__file__).resolve().parent.parent
N = 24


def trained_pairs(sft: Path) -> list[tuple[str, str]]:
    """Word pairs (neither an IMAGERY word) that the SFT set asks for in the canonical wording."""
    pattern = re.compile(r"^写一首(?:诗|词)，要用上“(..)”和“(..)”这两个词。$")
    out = []
    for line in sft.open(encoding="utf-8"):
        record = json.loads(line)
        m = pattern.match(record["conversations"][0]["content"]) if "tools" not in record else None
        if m and not {m.group(1), m.group(2)} & set(IMAGERY):
            out.append((m.group(1), m.group(2)))
    return out[:N]


def main() -> None:
    """Answer every condition's requests and print the counts."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default=str(REPO / "dataset"), help="the dataset directory the model trained on")
    args = p.parse_args()
    data = Path(args.dataset)
    sys.path.insert(0, str(REPO / "dataset"))
    from wordings import load_wordings

    model = MiniLLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(args.model)
    poems = [p for p in (parse_poem(t) for t in read_documents(data / "eval.jsonl")) if p]
    frequency = document_frequency(read_documents(data / "pretrain.jsonl"))
    held = [pair for p in poems if (pair := poem_words(p, frequency))][:N]
    rng = random.Random(0)
    imagery = [tuple(rng.sample(IMAGERY, 2)) for _ in range(N)]
    composed = load_wordings(REPO / "dataset" / "wordings.json")["words"]
    heldout = HELDOUT["words"]
    conditions = {
        "canonical + IMAGERY": (imagery, lambda i: WORDS_PROMPT),
        "canonical + trained corpus words": (trained_pairs(data / "sft.jsonl"), lambda i: WORDS_PROMPT),
        "canonical + held-out words": (held, lambda i: WORDS_PROMPT),
        "composed + held-out words": (held, lambda i: rng.choice(composed)),
        "held-out wording + IMAGERY": (imagery, lambda i: heldout[i % len(heldout)]),
        "held-out wording + held-out words": (held, lambda i: heldout[i % len(heldout)]),
    }
    for name, (pairs, wording) in conditions.items():
        prompts = [wording(i).format(kind="诗", w1=a, w2=b) for i, (a, b) in enumerate(pairs)]
        answers = answer_all(model, tok, prompts, 80)
        both = sum(check_words(a, b)(answers[q][0]) for q, (a, b) in zip(prompts, pairs))
        first = sum(a in "".join(answers[q][0].split("\n")[1:]) for q, (a, _) in zip(prompts, pairs))
        print(f"{name}: both words {both}/{len(pairs)}, the first {first}/{len(pairs)}", flush=True)


if __name__ == "__main__":
    main()
