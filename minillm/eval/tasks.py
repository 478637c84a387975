"""Behavioural evaluations on held-out poems: a cloze for any model, and request following for chat models.

Held-out poems are the records of dataset/eval.jsonl, rendered as "title\\nauthor（dynasty）\\nbody lines".

- Cloze: for a poem of n >= 2 lines, the context is the poem up to line k = n // 2 and the candidates
  are its true line k and 3 lines of other held-out poems with the same shape (the same clause lengths,
  hence the same length). The model picks the candidate of highest total log-likelihood after the
  context. Chance is 25%.
- Requests: prompts in the SFT set's wording, filled from held-out poems; each greedy answer is checked
  by a rule a reader can verify by eye (the functions check_*), and checked for a verbatim copy of a
  training poem.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.data.jsonl import iter_records
from minillm.data.poems import _CJK, CLAUSE_END, Poem, cjk, clauses, parse_poem  # noqa: F401  (re-exported)
from minillm.data.tokenizer import Tokenizer
from minillm.eval.heldout import distinct_2, heldout_wording, open_words, repeats
from minillm.eval.perplexity import read_documents
from minillm.infer.generation import generate
from minillm.model.model import MiniLLM

# Image words a "words" request asks for (the SFT set draws its pairs from this list; dataset/build.py).
IMAGERY = [
    "明月", "春风", "故乡", "黄昏", "杨柳", "落花", "斜阳", "秋风", "白云", "青山", "流水", "芳草",
    "梧桐", "西风", "东风", "归来", "天涯", "相思", "江南", "长安", "孤舟", "夕阳", "烟雨", "千里",
    "万里", "故人", "浮云", "楼台", "黄河", "桃花", "梨花", "杜鹃", "鸳鸯", "帘幕", "阑干", "何处",
    "风雨", "黄花", "清风", "白发", "少年", "美人", "春色", "秋色", "寒食", "重阳",
]
# The SFT set's wording of the three request kinds (dataset/build.py PROMPT_TEMPLATES).
TUNE_PROMPT = "请以《{tune}》为词牌，填一首词。"
FORM_PROMPT = "请写一首{dynasty}代的{form}。"
WORDS_PROMPT = "写一首{kind}，要用上“{w1}”和“{w2}”这两个词。"
_TUNE_REQUEST = re.compile(r"^请以《(.+?)》为词牌")


def verse_form(lines: list[str]) -> str:
    """五言/七言 绝句/律诗 when the lines hold exactly 4 or 8 clauses of 5 or 7 characters each, else ''."""
    parts = clauses("\n".join(lines))
    sizes = {len(c) for c in parts}
    if len(sizes) != 1 or not sizes & {5, 7} or len(parts) not in (4, 8):
        return ""
    return ("五言" if 5 in sizes else "七言") + ("绝句" if len(parts) == 4 else "律诗")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


@dataclass
class Rate:
    """How many of n items passed a check, with the 95% interval."""

    name: str
    passed: int
    n: int

    @property
    def rate(self) -> float:
        """passed / n (NaN for no items)."""
        return math.nan if self.n == 0 else self.passed / self.n

    def __str__(self) -> str:
        lo, hi = wilson(self.passed, self.n)
        return f"{self.name}: {self.passed}/{self.n} = {self.rate:.1%} (95% CI {lo:.1%}-{hi:.1%})"


# ---------------------------------------------------------------------------------------------- cloze


@dataclass
class ClozeItem:
    """One question: the context, the 4 candidates and which one is true."""

    context: str
    candidates: list[str]
    answer: int


def line_shape(line: str) -> tuple[int, ...]:
    """Clause lengths and punctuation of a line: lines of one shape are interchangeable in form."""
    return tuple(len(c) for c in clauses(line)) + tuple(ch for ch in line if ch in CLAUSE_END)


def cloze_items(poems: list[Poem], seed: int = 0) -> list[ClozeItem]:
    """One item per poem with >= 2 lines and 3 same-shape lines in other poems; deterministic in seed."""
    by_shape: dict[tuple, list[tuple[int, str]]] = {}
    for i, poem in enumerate(poems):
        for line in poem.lines:
            by_shape.setdefault(line_shape(line), []).append((i, line))
    items = []
    for i, poem in enumerate(poems):
        if len(poem.lines) < 2:
            continue
        k = len(poem.lines) // 2
        true = poem.lines[k]
        others = sorted({line for j, line in by_shape[line_shape(true)] if j != i and line != true})
        if len(others) < 3:
            continue
        rng = random.Random(seed * 100_003 + i)
        candidates = [true, *rng.sample(others, 3)]
        rng.shuffle(candidates)
        context = "\n".join([poem.title, poem.header, *poem.lines[:k]]) + "\n"
        items.append(ClozeItem(context, candidates, candidates.index(true)))
    return items


@torch.inference_mode()
def candidate_logprobs(model: MiniLLM, tokenizer: Tokenizer, context: str, candidates: list[str],
                       dtype: torch.dtype = torch.float32) -> list[float]:
    """Total log-probability of each candidate's tokens after <|endoftext|> + context (one padded batch)."""
    device = next(model.parameters()).device
    prefix = [tokenizer.eos_id, *tokenizer.encode(context)]
    conts = [tokenizer.encode(c) for c in candidates]
    width = len(prefix) + max(len(c) for c in conts)
    x_BT = torch.full((len(conts), width), tokenizer.eos_id, dtype=torch.long)
    for b, c in enumerate(conts):
        x_BT[b, :len(prefix) + len(c)] = torch.tensor(prefix + c)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits_BTV = model(x_BT.to(device)).logits.float()
    logp_BTV = F.log_softmax(logits_BTV[:, :-1], dim=-1)
    totals = []
    for b, c in enumerate(conts):
        positions = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(c), device=device)
        totals.append(logp_BTV[b, positions, torch.tensor(c, device=device)].sum().item())
    return totals


def run_cloze(model: MiniLLM, tokenizer: Tokenizer, items: list[ClozeItem], dtype: torch.dtype = torch.float32,
              progress: Callable[[], None] | None = None) -> Rate:
    """Accuracy of choosing the true line by total log-likelihood."""
    correct = 0
    for item in items:
        scores = candidate_logprobs(model, tokenizer, item.context, item.candidates, dtype)
        correct += max(range(len(scores)), key=scores.__getitem__) == item.answer
        if progress:
            progress()
    return Rate("cloze accuracy (chance 25%)", correct, len(items))


# ------------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One prompt and the check its answer must pass."""

    kind: str  # tune | form | words
    prompt: str
    check: Callable[[str], bool] = field(repr=False)


def answer_title(answer: str) -> str:
    """The first non-empty line of an answer: where a poem's title stands."""
    return next((line.strip() for line in answer.split("\n") if line.strip()), "")


def answer_body(answer: str) -> list[str]:
    """The answer's verse lines: without the title line and an author（dynasty） line, if present."""
    lines = [line.strip() for line in answer.split("\n") if line.strip()][1:]
    if lines and re.fullmatch(r"[^，。？！；]{1,20}（.{1,4}）", lines[0]):
        lines = lines[1:]
    return lines


def check_tune(tune: str) -> Callable[[str], bool]:
    """The answer's title is the tune, or the tune followed by ·subtitle."""
    return lambda answer: answer_title(answer).split("·")[0] == tune


def check_form(form: str) -> Callable[[str], bool]:
    """The answer's body has the requested form: 4 (绝句) or 8 (律诗) clauses of 5 (五言) or 7 (七言) characters."""
    return lambda answer: verse_form(answer_body(answer)) == form


def check_line_length(form: str) -> Callable[[str], bool]:
    """Every clause of the answer's body has the requested 5 or 7 characters (however many clauses)."""
    size = 5 if form.startswith("五") else 7

    def check(answer: str) -> bool:
        parts = clauses("\n".join(answer_body(answer)))
        return bool(parts) and all(len(c) == size for c in parts)
    return check


def check_words(w1: str, w2: str) -> Callable[[str], bool]:
    """Both requested words occur in the answer's body."""
    return lambda answer: all(w in "".join(answer_body(answer)) for w in (w1, w2))


def known_tunes(sft_records: list[dict]) -> set[str]:
    """The tunes the SFT set asks for in "请以《X》为词牌" prompts."""
    tunes = set()
    for record in sft_records:
        turns = record.get("conversations") or []
        if turns and (m := _TUNE_REQUEST.match(turns[0].get("content", ""))):
            tunes.add(m.group(1))
    return tunes


def poem_words(poem: Poem, frequency: Counter) -> tuple[str, str] | None:
    """The two open-vocabulary words the held-out evaluation asks for with this poem (heldout.open_words)."""
    return open_words(poem.lines, frequency, set(IMAGERY), seed=cjk("".join(poem.lines)))


def heldout_words(poems: list[Poem], frequency: Counter) -> set[str]:
    """Every word the held-out evaluation can ask for, whatever its --limit: dataset/build.py keeps them out of
    every training request."""
    return {w for poem in poems if (pair := poem_words(poem, frequency)) for w in pair}


def requests(poems: list[Poem], tunes: set[str], limit: int, frequency: Counter | None = None) -> list[Request]:
    """Up to `limit` prompts of each kind, from the held-out poems in file order (deterministic).

    frequency None: the training distribution (the SFT set's wording, words from IMAGERY). Given (the training
    corpus's document frequencies, heldout.document_frequency): held out, in the wordings of eval/heldout.py
    that no training file holds, cycled per request, and with words from each poem's own lines (open_words).
    """
    out: dict[str, list[Request]] = {"tune": [], "form": [], "length": [], "words": []}
    seen: set[str] = set()
    held = frequency is not None

    def wording(kind: str, default: str) -> str:
        return heldout_wording(kind, len(out[kind])) if held else default

    for poem in poems:
        tune = poem.title.split("·")[0]
        is_ci = tune in tunes
        if is_ci and tune not in seen and len(out["tune"]) < limit:
            seen.add(tune)
            out["tune"].append(Request("tune", wording("tune", TUNE_PROMPT).format(tune=tune), check_tune(tune)))
        form = verse_form(poem.lines)
        if form and not is_ci and len(out["form"]) < limit:
            prompt = wording("form", FORM_PROMPT).format(dynasty=poem.dynasty or "唐", form=form)
            out["form"].append(Request("form", prompt, check_form(form)))
            out["length"].append(Request("length", prompt, check_line_length(form)))
        if held:
            pair = poem_words(poem, frequency)
        else:
            found = [w for w in IMAGERY if w in "".join(poem.lines)]
            pair = tuple(random.Random(cjk("".join(poem.lines))).sample(found, 2)) if len(found) >= 2 else None
        if pair and len(out["words"]) < limit:
            w1, w2 = pair
            prompt = wording("words", WORDS_PROMPT).format(kind="词" if is_ci else "诗", w1=w1, w2=w2)
            out["words"].append(Request("words", prompt, check_words(w1, w2)))
    return [r for kind in out.values() for r in kind]


def degeneration(answers: list[str]) -> dict[str, float]:
    """The share of answers that repeat a line or a phrase (heldout.repeats, on the verse body), and distinct-2."""
    repetitive = sum(repeats(answer_body(a)) for a in answers)
    return {"repeats": repetitive / len(answers) if answers else math.nan, "n": len(answers),
            "distinct_2": distinct_2(answers)}


@torch.inference_mode()
def answer_all(model: MiniLLM, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int,
               progress: Callable[[int], None] | None = None, temperature: float = 0.0, samples: int = 1,
               generator: torch.Generator | None = None) -> dict[str, list[str]]:
    """Answers to single-turn chat prompts: greedy (one each) or `samples` each at `temperature`, batched by
    prompt length (rows of a batch are equal-length)."""
    if samples > 1 and temperature == 0:
        raise ValueError("several samples per prompt need a temperature > 0 (greedy answers are all the same)")
    encoded = {p: tokenizer.render_conversation([{"role": "user", "content": p}], add_generation_prompt=True)[0]
               for p in dict.fromkeys(prompts)}
    by_length: dict[int, list[str]] = {}
    for p, ids in encoded.items():
        by_length.setdefault(len(ids), []).append(p)
    answers: dict[str, list[str]] = {}
    stops = [*tokenizer.turn_end_ids, tokenizer.eos_id]
    for group in by_length.values():
        rows = [p for p in group for _ in range(samples)]
        out_BT = generate(model, [encoded[p] for p in rows], max_new_tokens=max_new_tokens,
                          temperature=temperature, eos_token_id=stops, generator=generator)
        for p, row in zip(rows, out_BT.tolist()):
            new = row[len(encoded[p]):]
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            answers.setdefault(p, []).append(tokenizer.decode(new[:cut]))
        if progress:
            progress(len(group))
    return answers


def copies_training_text(answer: str, corpus_key: str, min_chars: int = 10) -> bool:
    """The answer's verse (its Chinese characters, >= min_chars of them) appears verbatim in the training text."""
    key = cjk("".join(answer_body(answer)))
    return len(key) >= min_chars and key in corpus_key


def training_key(train_path: str | Path, sft_path: str | Path) -> str:
    """The Chinese characters of every training poem and SFT answer, "|" between texts (for copy checks)."""
    texts = read_documents(train_path)
    for _, record in iter_records(sft_path):
        texts += [m.get("content", "") for m in record.get("conversations") or [] if m.get("role") == "assistant"]
    return "|".join(cjk(t) for t in texts)
