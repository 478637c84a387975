"""Preference pairs for DPO: a prompt, a chosen and a rejected response, rendered as two training rows.

Accepted lines (TRL's formats and minimind's):
    {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}   conversational
    {"chosen": [messages], "rejected": [messages]}   the prompt is the turns both share (minimind's dpo.jsonl)
    {"prompt": "text", "chosen": "text", "rejected": "text"}   plain text: the response ends with <|endoftext|>

A conversational pair renders as ChatML through Tokenizer.render_conversation: the prompt with the generation
prompt, then the reply, learned with its <|im_end|> (as SFT learns it). TRL also learns the newline its template
writes after <|im_end|>; minillm does not (generation stops at <|im_end|>), so TRL's log-probs carry one more
token, log p("\\n" | <|im_end|>), in each sequence. tests/test_dpo.py checks both against TRL.

Each example is (X, Y, loss_mask) of shape [2, max_length - 1], row 0 chosen and row 1 rejected, so a batch
is [B, 2, T] and both responses go through one forward pass; with reference log-probs computed before training
(`reference_logps`, [N, 2]) a fourth tensor of shape [2] follows.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from minillm.data.datasets import JsonlExamples, make_example, parse_messages
from minillm.data.jsonl import DataError, Where

if TYPE_CHECKING:
    from minillm.data.tokenizer import Tokenizer

EXPECTED = ('{"prompt": [messages], "chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}, '
            '{"chosen": [messages], "rejected": [messages]} or {"prompt": "...", "chosen": "...", "rejected": "..."}')
Rendered = tuple[list[int], list[int]]  # token ids and the 0/1 learn mask of one prompt + response


def pair_messages(obj: dict, where: str | Where) -> tuple[list[dict] | str, list[dict] | str, list[dict] | str]:
    """(prompt, chosen, rejected) of one line: three message lists (conversational) or three strings."""
    if not isinstance(obj.get("chosen"), (list, str)) or not isinstance(obj.get("rejected"), (list, str)):
        raise DataError(f'{where}: "chosen" and "rejected" must both be given, as strings or lists of messages; '
                        f"expected {EXPECTED}")
    if isinstance(obj["chosen"], str) or isinstance(obj["rejected"], str):
        if not all(isinstance(obj.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise DataError(f'{where}: a plain-text pair needs "prompt", "chosen" and "rejected" all strings; '
                            f"expected {EXPECTED}")
        for key in ("prompt", "chosen", "rejected"):
            if not obj[key]:  # an empty prompt has nothing to condition on, an empty response nothing to score
                raise DataError(f'{where}: field "{key}" is empty; a plain-text pair needs text in all three')
        return obj["prompt"], obj["chosen"], obj["rejected"]
    chosen, rejected = parse_messages(obj["chosen"], where, "chosen"), parse_messages(obj["rejected"], where, "rejected")
    if "prompt" in obj:
        prompt = parse_messages(obj["prompt"], where, "prompt")
    else:  # implicit prompt: every turn before the last, which both responses must share
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise DataError(f'{where}: without a "prompt" field, "chosen" and "rejected" must share every turn but '
                            "the last (the prompt) and differ in that last assistant reply")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise DataError(f'{where}: "{key}" must be one assistant message after the prompt, got roles '
                            f"{[m['role'] for m in reply]}")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f'{where}: the prompt ends with an assistant turn; it should end with the user turn the '
                        "responses answer")
    return prompt, chosen, rejected


def render_pair(tokenizer: Tokenizer, prompt: list[dict] | str, chosen: list[dict] | str,
                rejected: list[dict] | str) -> tuple[int, Rendered, Rendered]:
    """(prompt length in tokens, chosen rendered, rejected rendered): both start with the same prompt ids and
    learn only their own response."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer.encode(prompt)
        rows = []
        for text in (chosen, rejected):
            reply = [*tokenizer.encode(text), tokenizer.eos_id]
            rows.append(([*prompt_ids, *reply], [0] * len(prompt_ids) + [1] * len(reply)))
        return len(prompt_ids), rows[0], rows[1]
    prompt_ids, _ = tokenizer.render_conversation(prompt, add_generation_prompt=True)
    rows = []
    for reply in (chosen, rejected):
        ids, learn = tokenizer.render_conversation(prompt + reply)
        if ids[:len(prompt_ids)] != prompt_ids:  # render_conversation encodes the reply apart: cannot happen
            raise AssertionError("the rendered prompt is not a prefix of the rendered prompt + response")
        rows.append((ids, [0] * len(prompt_ids) + learn[len(prompt_ids):]))
    return len(prompt_ids), rows[0], rows[1]


class PreferenceDataset(JsonlExamples):
    """Preference pairs -> [2, T] (X, Y, loss_mask) examples, chosen first; pairs with no room are dropped.

    Every line is parsed and rendered when the dataset is built (a malformed line is a DataError naming
    file:line); pairs whose prompt alone fills max_length leave no response token to compare and are dropped,
    counted in `dropped`.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, max_length: int = 512) -> None:
        super().__init__(path, tokenizer, max_length)
        self.pairs: list[tuple[Rendered, Rendered]] = []
        self.line_of: list[int] = []  # the file line (0-based) of each kept pair
        for i in range(len(self.lines)):
            prompt_len, chosen, rejected = render_pair(tokenizer, *self.parse(i))
            if prompt_len < max_length:
                self.pairs.append((chosen, rejected))
                self.line_of.append(i)
        self.dropped = len(self.lines) - len(self.pairs)
        if not self.pairs:
            raise DataError(f"{self.path}: every one of the {len(self.lines):,} pairs has a prompt of max_length "
                            f"{max_length} tokens or more, leaving no response to learn; raise --max_length")
        self.reference_logps: torch.Tensor | None = None
        """[N, 2] float32 summed log-probs of (chosen, rejected) under the reference, when computed up front."""

    def __len__(self) -> int:
        return len(self.pairs)

    def parse(self, i: int) -> tuple[Any, Any, Any]:
        """Line `i` of the file (not pair i: see line_of) as (prompt, chosen, rejected)."""
        return pair_messages(self.lines.record(i), self.lines.where(i))

    def validate(self) -> int:
        """Every line was parsed when the dataset was built; the number of pairs kept."""
        return len(self)

    def identity(self) -> dict[str, Any]:
        """The file, the pairs kept and dropped and the length (a resumed run must train on the same)."""
        return {**super().identity(), "examples": len(self), "dropped": self.dropped}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        rows = [make_example(ids, learn, self.max_length, self.tokenizer.pad_id) for ids, learn in self.pairs[i]]
        x_2T, y_2T, m_2T = (torch.stack(parts) for parts in zip(*rows))
        if self.reference_logps is None:
            return x_2T, y_2T, m_2T
        return x_2T, y_2T, m_2T, self.reference_logps[i]
