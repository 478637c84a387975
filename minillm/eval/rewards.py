"""Verifiable rewards for GRPO: eval_tasks.py's checks of a reply, as functions (request, answer) -> float.

`request` is the user's message (data/prompts.py request_of); what it asks for is read from the prompt line's
"request" field when the data gives one (dataset/dpo.jsonl does: its prompts come in many wordings), else from
eval_tasks.py's own wording of the request. `answer` is the sampled completion decoded
as text, ending with "<|im_end|>" when the model closed its turn within the token budget. Any Python
function of that signature is a reward; these read what eval/tasks.py checks, so a reward that rises is a
rate eval_tasks.py reports:

    request   the answer passes the check of the request's kind (names the tune, has the 五言/七言 form,
              uses both words; one of the two words earns half, a denser signal than eval's both-or-nothing);
              0 for a request of another kind
    length    a form request: every clause has the requested 5 or 7 characters (eval's line length)
    ended     the model closed its turn with <|im_end|> within the budget
    poem      the answer is shaped as a poem: a title line (not a line of verse), then two or more lines of
              Chinese verse, none
              repeated, no 4-character phrase three times (eval/heldout.py repeats), at least half of its
              characters distinct, and no stretch of 6 characters of the request restated
    novel     the verse is not a verbatim copy (10+ characters) of the training poems or SFT answers
    tool      with tools (GRPO --tools): for a tool request (quote a clause, a character's tone) 1 when the
              final answer is right against the corpus; minus 0.5 for a malformed call or one whose result is an
              error (no such tool, bad arguments), and minus 0.5 for a call where the request needs none
    composite poem x novel x (request + 0.25 ended) / 1.25: the request's check counts only in a new
              poem, so neither the words without a poem nor a memorised poem pays; a tool request gets `tool`,
              and a writing request loses 0.5 for a needless or broken call

With tools, `answer` is a ToolAnswer: the last turn's text, with the trajectory's calls, their results and whether
a call was malformed attached; a reward that reads only the text sees the plain string.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from minillm.eval.heldout import repeats
from minillm.eval.tasks import (
    FORM_PROMPT,
    TUNE_PROMPT,
    WORDS_PROMPT,
    answer_body,
    answer_title,
    check_form,
    check_line_length,
    check_tune,
    check_words,
    cjk,
    copies_training_text,
    training_key,
)

RewardFn = Callable[[str, str], float]
TOOL_KINDS = ("quote", "tone")  # requests a tool answers (eval/tool_tasks.py); the others are writing requests
MISUSE = 0.5  # what a broken or needless call costs


class RewardError(ValueError):
    """A reward function raised, or returned something other than a finite number, on a completion."""


class ToolAnswer(str):
    """An answer's text with the trajectory that led to it: its calls, their results, a malformed call or not."""

    def __new__(cls, text: str, calls: list | tuple = (), results: list | tuple = (), malformed: bool = False
                ) -> ToolAnswer:
        answer = super().__new__(cls, text)
        answer.calls, answer.results, answer.malformed = list(calls), list(results), malformed
        return answer


def broken_call(answer: str) -> bool:
    """A call that did not parse, or one whose result is an error (no such tool, bad arguments, a failure)."""
    return bool(getattr(answer, "malformed", False)) or any(r.startswith("error:") for r in getattr(answer, "results", ()))
END = "<|im_end|>"
_VERSE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff，。、？！：；“”‘’《》·…—]+")


def _pattern(template: str) -> re.Pattern:
    """A regex that matches the template's prompts and captures its fields."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts)))


def _words_used(w1: str, w2: str) -> Callable[[str], float]:
    """The share of the two requested words in the answer's body: check_words, with half credit for one."""
    return lambda answer: (check_words(w1, w1)(answer) + check_words(w2, w2)(answer)) / 2


_WORDINGS = {"tune": _pattern(TUNE_PROMPT), "form": _pattern(FORM_PROMPT), "words": _pattern(WORDS_PROMPT)}
_CHECKS = {"tune": lambda f: check_tune(f["tune"]), "form": lambda f: check_form(f["form"]),
           "words": lambda f: _words_used(f["w1"], f["w2"]),
           "quote": lambda f: lambda answer: f["clause"] in answer,
           "tone": lambda f: lambda answer: f"{f['level']}声" in answer and f"{'仄' if f['level'] == '平' else '平'}声"
           not in answer}
REQUEST_FIELDS = {"tune": {"tune"}, "form": {"form"}, "words": {"w1", "w2"}, "quote": {"clause"},
                  "tone": {"char", "level"}}


def _text(answer: str) -> str:
    return answer.removesuffix(END)


def check_request_fields(fields: object, where: str) -> dict:
    """A data line's "request" field, checked: {"kind": tune | form | words, and that kind's fields as strings}."""
    kind = fields.get("kind") if isinstance(fields, dict) else None
    if kind not in REQUEST_FIELDS or not REQUEST_FIELDS[kind] <= fields.keys() or not all(
            isinstance(fields[k], str) and fields[k] for k in REQUEST_FIELDS[kind]) or (
            kind == "tone" and fields["level"] not in ("平", "仄")):
        raise ValueError(f'{where}: "request" must be {{"kind": "tune", "tune": ...}}, {{"kind": "form", "form": '
                         f'...}}, {{"kind": "words", "w1": ..., "w2": ...}}, {{"kind": "quote", "clause": ...}} or '
                         f'{{"kind": "tone", "char": ..., "level": "平" or "仄"}}; got {fields!r}')
    return fields


class Requests:
    """What each request asks for: the fields given with its prompt (`known`: request text -> fields), or read
    from eval_tasks.py's wording of the three request kinds."""

    def __init__(self, known: dict[str, dict] | None = None) -> None:
        self.known = known or {}

    def fields(self, request: str) -> dict | None:
        """{"kind": ..., fields} of the request, or None when it asks for none of the checked kinds."""
        if request in self.known:
            return self.known[request]
        for kind, pattern in _WORDINGS.items():
            if m := pattern.fullmatch(request):
                return {**m.groupdict(), "kind": kind}  # the words wording has a field "kind" (诗 or 词) too
        return None

    def request_reward(self, request: str, answer: str) -> float:
        """1 when the answer passes the check of the request's kind (tune, form, words; one word of two: 0.5), else 0."""
        fields = self.fields(request)
        return float(_CHECKS[fields["kind"]](fields)(_text(answer))) if fields else 0.0

    def tool_reward(self, request: str, answer: str) -> float:
        """A tool request: 1 when the final answer is right; minus MISUSE for a broken call, and for any call where
        the request needs none."""
        fields = self.fields(request)
        penalty = MISUSE * broken_call(answer)
        if fields and fields["kind"] in TOOL_KINDS:
            return float(_CHECKS[fields["kind"]](fields)(_text(answer))) - penalty
        return -penalty - MISUSE * bool(getattr(answer, "calls", ()))

    def length_reward(self, request: str, answer: str) -> float:
        """For a 五言/七言 request: 1 when every clause has the requested length; 0 otherwise."""
        fields = self.fields(request)
        return float(bool(fields) and fields["kind"] == "form" and check_line_length(fields["form"])(_text(answer)))


_EVAL_WORDING = Requests()
request_reward = _EVAL_WORDING.request_reward  # the rewards for prompts in eval_tasks.py's own wording
length_reward = _EVAL_WORDING.length_reward


def ended_reward(request: str, answer: str) -> float:
    """1 when the answer closed its turn with <|im_end|> within the budget."""
    return float(answer.endswith(END))


def poem_reward(request: str, answer: str) -> float:
    """1 when the answer has a title line and two or more lines of Chinese verse, no line repeated and at least
    half its characters distinct (a GRPO run learned to collect the poem and ended rewards with "忆忆忆忆忆忆忆"
    and "芳草路。" ten times over; bench/RESULTS.md)."""
    text = _text(answer)
    body = answer_body(text)
    chars = cjk("".join(body))
    return float(has_title(text) and len(body) >= 2 and all(_VERSE.fullmatch(line) for line in body)
                 and len(set(body)) == len(body) and len(set(chars)) >= len(chars) / 2 and not repeats(body)
                 and not restates(request, text))


def has_title(answer: str) -> bool:
    """The answer opens with a title: a first line without the clause punctuation a line of verse has (an answer that
    starts with its verse has no title, and its first line would be taken for one)."""
    title = answer_title(answer)
    return bool(title) and not any(ch in title for ch in "，。？！；")


def restates(request: str, answer: str, span: int = 6) -> bool:
    """The answer copies `span` consecutive Chinese characters of the request (it restates it, not answers)."""
    asked, said = cjk(request), cjk(answer)
    return any(asked[i:i + span] in said for i in range(len(asked) - span + 1))


class NovelReward:
    """1 unless the answer's verse copies 10+ characters of the training text verbatim."""

    def __init__(self, train_path: str | Path, sft_path: str | Path) -> None:
        self.key = training_key(train_path, sft_path)

    def __call__(self, request: str, answer: str) -> float:
        """1 for new verse, 0 for a verbatim copy."""
        return float(not copies_training_text(_text(answer), self.key))


def composite(novel: RewardFn, asked: Requests = _EVAL_WORDING) -> RewardFn:
    """A writing request: poem x novel x (request + 0.25 ended) / 1.25, in [0, 1], less MISUSE for a needless or
    broken call; a tool request: the tool reward."""
    def reward(prompt: str, answer: str) -> float:
        fields = asked.fields(prompt)
        if fields and fields["kind"] in TOOL_KINDS:
            return asked.tool_reward(prompt, answer)
        gate = poem_reward(prompt, answer) * novel(prompt, answer)
        value = gate * (asked.request_reward(prompt, answer) + 0.25 * ended_reward(prompt, answer)) / 1.25
        return value + asked.tool_reward(prompt, answer)
    return reward


REWARDS = ("request", "length", "ended", "poem", "novel", "tool", "composite")


def build_rewards(spec: str, train_path: str | Path | None, sft_path: str | Path | None,
                  parse_only: bool = False, known: dict[str, dict] | None = None) -> dict[str, tuple[RewardFn, float]]:
    """Parse --reward ("composite", or "request:1,ended:0.25"): {name: (function, weight)}; parse_only checks the
    spec without loading the corpus (the functions are then None). `known` maps request texts to the fields
    their data lines give (data/prompts.py prompt_requests)."""
    parts = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = item.partition(":")
        if name not in REWARDS:
            raise ValueError(f"--reward: unknown reward {name!r}; choose from {', '.join(REWARDS)}")
        if name in parts:
            raise ValueError(f"--reward: {name} is named twice; give each reward once with its weight")
        try:
            parts[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--reward: the weight of {name} must be a number, got {weight!r}") from None
        if not math.isfinite(parts[name]):
            raise ValueError(f"--reward: the weight of {name} must be a finite number, got {weight!r}")
    if not parts:
        raise ValueError("--reward names no reward; e.g. composite, or request:1,ended:0.25")
    if parse_only:
        return {name: (None, weight) for name, weight in parts.items()}
    novel = NovelReward(train_path, sft_path) if {"novel", "composite"} & set(parts) else None
    asked = Requests({text: check_request_fields(f, f"request {text!r}") for text, f in (known or {}).items()})
    functions = {"request": asked.request_reward, "length": asked.length_reward, "ended": ended_reward,
                 "poem": poem_reward, "novel": novel, "tool": asked.tool_reward,
                 "composite": composite(novel, asked) if novel else None}
    return {name: (functions[name], weight) for name, weight in parts.items()}
