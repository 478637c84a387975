"""Prompts for reinforcement learning (GRPO): the requests a policy answers with sampled completions.

Accepted lines: TRL's prompt-only format {"prompt": [messages]} or {"prompt": "text"}, and any preference-pair
line (data/preference.py; the pair's prompt is used, its responses ignored), so dataset/dpo.jsonl serves
both stages. A conversational prompt renders in ChatML with the generation prompt, as generation sees it.

Each example is (ids, ids, mask) of length max_length: the prompt's ids right-padded, and a mask that is 1
on the prompt's tokens, so the loop's length grouping and padding trim work on prompts as on SFT examples.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from minillm.data.datasets import JsonlExamples, parse_messages
from minillm.data.jsonl import DataError
from minillm.data.preference import pair_messages

if TYPE_CHECKING:
    from minillm.data.tokenizer import Tokenizer


USER_HEADER, END = "<|im_start|>user\n", "<|im_end|>"


def request_of(prompt: str) -> str:
    """What a reward function reads as the request: the last user message of a decoded ChatML prompt, or the
    whole text of a plain one."""
    start = prompt.rfind(USER_HEADER)
    if start < 0:
        return prompt
    body = prompt[start + len(USER_HEADER):]
    return body[:body.find(END)] if END in body else body


def prompt_requests(dataset: PromptDataset) -> dict[str, dict]:
    """The "request" field of each line that has one, keyed by its request text (request_of): what the prompt asks
    for, given by the data so that a reward can check it in any wording (eval/rewards.py)."""
    known = {}
    for i in range(len(dataset.lines)):
        obj = dataset.lines.record(i)
        if "request" in obj:
            prompt = dataset.parse(i)
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            if not isinstance(obj["request"], dict):
                raise DataError(f'{dataset.lines.where(i)}: "request" must be an object, got {obj["request"]!r}')
            known[text] = obj["request"]
    return known


class PromptDataset(JsonlExamples):
    """Prompt lines -> (ids, ids, prompt mask) rows; prompts longer than max_length are dropped and counted."""

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, max_length: int = 256,
                 tools: list[dict] | None = None) -> None:
        super().__init__(path, tokenizer, max_length)
        self.prompts: list[list[int]] = []
        for i in range(len(self.lines)):
            prompt = self.parse(i)
            if isinstance(prompt, str):
                if tools:
                    raise DataError(f"{self.lines.where(i)}: a plain-text prompt cannot offer tools; give messages")
                ids = tokenizer.encode(prompt)
            else:  # conversational prompts offer `tools` in the system turn, as generation does
                ids, _ = tokenizer.render_conversation(prompt, add_generation_prompt=True, tools=tools)
            if len(ids) <= max_length:
                self.prompts.append(ids)
        self.dropped = len(self.lines) - len(self.prompts)
        if not self.prompts:
            raise DataError(f"{self.path}: every one of the {len(self.lines):,} prompts is longer than max_length "
                            f"{max_length} tokens; raise --max_length")

    def __len__(self) -> int:
        return len(self.prompts)

    def parse(self, i: int) -> list[dict] | str:
        """The prompt of line `i`: a message list (ending with a user turn) or a plain string."""
        obj, where = self.lines.record(i), self.lines.where(i)
        if "chosen" in obj or "rejected" in obj:
            return pair_messages(obj, where)[0]
        if isinstance(obj.get("prompt"), str):
            if not obj["prompt"]:  # nothing to continue: sampling from no tokens at all is not a rollout
                raise DataError(f'{where}: field "prompt" is empty; give the text to continue, or a message list')
            return obj["prompt"]
        if "prompt" not in obj:
            raise DataError(f'{where}: no "prompt" field; expected {{"prompt": [{{"role": "user", "content": "..."}}]}}'
                            ' or {"prompt": "..."} (or a preference pair)')
        prompt = parse_messages(obj["prompt"], where, "prompt")
        if prompt[-1]["role"] != "user":
            raise DataError(f'{where}: the prompt must end with a user turn, got {prompt[-1]["role"]!r}')
        return prompt

    def validate(self) -> int:
        """Every line was parsed when the dataset was built; the number of prompts kept."""
        return len(self)

    def identity(self) -> dict[str, Any]:
        """The file, the prompts kept and dropped, and the length."""
        return {**super().identity(), "examples": len(self), "dropped": self.dropped}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.prompts[i]
        ids_T = torch.full((self.max_length,), self.tokenizer.pad_id, dtype=torch.long)
        ids_T[:len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask_T = torch.zeros(self.max_length, dtype=torch.float32)
        mask_T[:len(ids)] = 1.0
        return ids_T, ids_T.clone(), mask_T
