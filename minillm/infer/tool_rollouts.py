"""Multi-turn sampling with tools on the batched engine (GRPO's agentic rollouts).

Every row samples an assistant turn (infer/engine.py: all rows of all prompts together). A row whose turn ends with
tool calls pauses: its calls run (bounded in time, the result cut to a budget; an error is the result), the tool
turn the chat template renders for them is appended, and the row samples its next assistant turn with the other
rows that called, up to `max_turns` turns that may call. The trajectory keeps every token (the tool results
included, so the model reads them) and says which spans the model sampled: only those are learned, so the tool
results stay out of the loss, the KL and the length normalisation, as user turns stay out of SFT's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from minillm.data.tokenizer import Tokenizer
from minillm.infer.engine import sample_groups
from minillm.infer.tools import Call, MalformedCall, Tool, run_call, split_calls
from minillm.model.model import MiniLLM


@dataclass
class Trajectory:
    """One row's prompt and turns: all its ids, the spans the model sampled, its calls and their results."""

    ids: list[int]
    prompt_length: int
    sampled: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn's tokens
    calls: list[Call] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    malformed: bool = False  # a turn opened a call it did not close, or wrote one that does not parse
    exhausted: bool = False  # still calling when the turns or the context ran out
    answer: list[int] = field(default_factory=list)  # the last turn's tokens (its end marker included)

    @classmethod
    def single(cls, prompt: Sequence[int], completion: list[int]) -> Trajectory:
        """A completion of one turn, sampled whole (no tools)."""
        return cls([*prompt, *completion], len(prompt), [(len(prompt), len(prompt) + len(completion))],
                   answer=completion)

    def to_dict(self) -> dict:
        """Plain lists, numbers and strings (a checkpoint's state loads with weights_only)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        """The trajectory to_dict() wrote."""
        return cls(**{**d, "sampled": [tuple(span) for span in d["sampled"]],
                      "calls": [Call(**c) for c in d["calls"]]})

    @property
    def sampled_tokens(self) -> int:
        """Tokens the model sampled over all its turns."""
        return sum(end - start for start, end in self.sampled)


def tool_turn_ids(tokenizer: Tokenizer, calls: list[Call], results: list[str], schemas: list[dict] | None
                  ) -> list[int]:
    """The ids that follow an assistant turn's end marker when its calls return `results`: what the chat template
    renders between that marker and the next assistant turn's first token (the tool turn, then the generation
    prompt). Found as the difference of two renderings of a minimal conversation, so that any template that
    renders a conversation's history as a prefix of its continuation works; ValueError for one that does not."""
    ids = [f"call_{k + 1}" for k in range(len(calls))]
    head = [{"role": "user", "content": "?"},
            {"role": "assistant", "content": "", "tool_calls": [c.message(i) for c, i in zip(calls, ids)]}]
    answered = head + [{"role": "tool", "tool_call_id": i, "content": r} for i, r in zip(ids, results)]
    before = tokenizer.render_conversation(head, tools=schemas)[0]
    after = tokenizer.render_conversation(answered, add_generation_prompt=True, tools=schemas)[0]
    ends = [k for k, i in enumerate(before) if i in tokenizer.turn_end_ids]
    if after[:len(before)] != before or not ends:
        raise ValueError("the chat template does not render a tool turn after the assistant's calls as a "
                         "continuation of the conversation, so tool results cannot be appended during sampling")
    return before[ends[-1] + 1:] + after[len(before):]


def sample_with_tools(model: MiniLLM, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], n: int,
                      max_new_tokens: int, temperature: float, tools: dict[str, Tool], max_turns: int,
                      generator: torch.Generator | None = None) -> list[Trajectory]:
    """n trajectories of each prompt (row i * n + j is prompt i's j-th): assistant turns of at most max_new_tokens
    each, calls run and answered between them, up to max_turns turns that call before one must answer."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    stops = [*tokenizer.turn_end_ids, tokenizer.eos_id]
    schemas = [t.schema() for t in tools.values()] or None
    limit = model.config.max_position_embeddings
    rows = [Trajectory(list(p), len(p)) for p in prompts for _ in range(n)]
    turns = sample_groups(model, prompts, n, max_new_tokens, temperature, stops, generator=generator)
    active = rows
    for turn in range(max_turns + 1):
        calling = []
        for row, completion in zip(active, turns):
            start = len(row.ids)
            row.ids += completion
            row.sampled.append((start, len(row.ids)))
            row.answer = completion
            ended = bool(completion) and completion[-1] in tokenizer.turn_end_ids
            try:
                _, calls = split_calls(completion[:-1] if ended else completion, tokenizer)
            except MalformedCall:
                row.malformed, calls = True, []
            if not calls:
                continue
            if not ended or turn == max_turns:  # cut inside its calls, or out of turns: the trajectory ends here
                row.exhausted = True
                continue
            results = [run_call(call, tools) for call in calls]
            row.calls += calls
            row.results += results
            row.ids += tool_turn_ids(tokenizer, calls, results, schemas)
            if len(row.ids) >= limit:
                row.ids, row.exhausted = row.ids[:limit - 1], True  # the results filled the context
                continue
            calling.append(row)
        if not calling:
            break
        turns = sample_groups(model, [row.ids for row in calling], 1, max_new_tokens, temperature, stops,
                              generator=generator)
        active = calling
    return rows
