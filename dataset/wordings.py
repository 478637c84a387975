"""Request wordings composed from parts (dataset/wordings.json), and the open vocabulary of words requests.

A model trained on one sentence per request learns the sentence, not the request (issue 45: the SFT model named
the tune for 97% of prompts in the SFT set's own wording and for 60% of close variants). So the builder asks for
tunes, forms and words in hundreds of surface forms, each composed from one choice per slot of a frame (an opener,
a verb, the constraint phrased one way, punctuation, a quote style), and for words drawn from the whole corpus by
document frequency instead of a fixed list. What the evaluation holds out stays out: a composed wording equal or
near to a held-out one (minillm/eval/heldout.py), or a listed word the held-out evaluation asks for, stops the
build with the item named.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

from minillm.eval.heldout import check_training_side, clause_pairs

KINDS = ("tune", "tune_open", "form", "words", "word_line", "tool_quote", "tool_source", "tool_tone", "tool_chain")
FIELDS = {"tune": {"tune"}, "tune_open": {"tune"}, "form": {"dynasty", "form"}, "words": {"kind", "w1", "w2"},
          "word_line": {"w"}, "tool_quote": {"title", "nth"}, "tool_source": {"line"}, "tool_tone": {"char"},
          "tool_chain": {"title", "nth"}}


def compose(spec: dict) -> list[str]:
    """Every wording of one kind: the product of each frame's slots, once per quote pair, in a stable order."""
    out: dict[str, None] = {}
    for left, right in spec["quotes"]:
        for frame in spec["frames"]:
            for choice in itertools.product(*frame):
                out["".join(choice).replace("{L}", left).replace("{R}", right)] = None
    return list(out)


def load_wordings(path: str | Path) -> dict[str, list[str]]:
    """The composed wordings of each kind in `path`; ValueError naming the file and the first bad wording (a missing
    or unknown field, or one equal or near to a held-out wording)."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the wordings: {e}") from None
    wordings = {}
    for kind in KINDS:
        if kind not in spec:
            raise ValueError(f"{path}: no wordings for {kind!r}; expected the kinds {', '.join(KINDS)}")
        wordings[kind] = compose(spec[kind])
        for wording in wordings[kind]:
            fields = set(re.findall(r"\{(\w+)\}", wording))
            if not FIELDS[kind] - {"dynasty", "kind"} <= fields or not fields <= FIELDS[kind]:
                raise ValueError(f"{path}: the {kind} wording {wording!r} must hold the fields "
                                 f"{sorted(FIELDS[kind])} (dynasty and kind optional) and no others")
        try:
            check_training_side(wordings[kind])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return wordings


def pick(rng: random.Random, canonical: str, wordings: list[str], canonical_share: float) -> str:
    """The canonical template with probability canonical_share (the evaluation's training-distribution wording),
    else one composed wording."""
    return canonical if rng.random() < canonical_share else rng.choice(wordings)


class Vocabulary:
    """Words a request may name: 2-character strings of one clause that at least `min_documents` training poems
    hold (words of the language by corpus statistics, not chance pairs), two distinct characters, none held out."""

    def __init__(self, frequency: Counter, heldout: set[str], min_documents: int = 20,
                 listed: list[str] | None = None) -> None:
        if listed is not None:  # a user's word list instead of the corpus statistics
            bad = [w for w in listed if w in heldout]
            if bad:
                raise ValueError(f"the word list holds {bad[0]!r}, a word the held-out evaluation asks for "
                                 f"({len(bad)} such words); held-out words are for evaluation only")
            self.words = set(listed)
        else:
            self.words = {w for w, n in frequency.items() if n >= min_documents and w[0] != w[1]} - heldout

    def __len__(self) -> int:
        return len(self.words)

    def words_in(self, line: str) -> list[str]:
        """The vocabulary's words in a line, in order of first occurrence."""
        return [w for w in dict.fromkeys(clause_pairs(line)) if w in self.words]
