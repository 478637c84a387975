"""The tool loop: the model answers, its calls are run and their results fed back, until it answers without a call
or the turns run out. generate.py, the chat and eval_tasks.py use it; the server never runs tools (its client does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minillm.data.tokenizer import Tokenizer
from minillm.infer.generation import generate
from minillm.infer.tools import Call, MalformedCall, Tool, run_call, split_calls
from minillm.model.model import MiniLLM

MAX_TOOL_TURNS = 4  # model turns that may call tools before it must answer


@dataclass
class ToolRun:
    """What one request produced: the messages added to the history, the final answer and every call made."""

    messages: list[dict] = field(default_factory=list)
    answer: str = ""
    calls: list[Call] = field(default_factory=list)
    exhausted: bool = False  # still calling when the turns ran out


def reply_ids(model: MiniLLM, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int,
              temperature: float = 0.0, generator: torch.Generator | None = None, **sampling) -> list[int]:
    """One assistant turn's ids, up to (not including) its end marker; `sampling`: generate's top_k, top_p,
    repetition_penalty."""
    out = generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                   eos_token_id=tokenizer.stop_ids, generator=generator, **sampling)[0, len(prompt):].tolist()
    stops = [k for k, i in enumerate(out) if i in tokenizer.stop_ids]
    return out[:stops[0]] if stops else out


def run_with_tools(model: MiniLLM, tokenizer: Tokenizer, history: list[dict], tools: dict[str, Tool],
                   max_new_tokens: int = 128, max_turns: int = MAX_TOOL_TURNS, temperature: float = 0.0,
                   context: int | None = None, on_call: Callable[[Call, str], None] | None = None,
                   generator: torch.Generator | None = None, **sampling) -> ToolRun:
    """Answer the last message of `history` with `tools` offered: generate, run each call (bounded in time, the
    result cut to a budget, an error returned as the result), feed the results back, and go on. A malformed call
    is the answer as plain text. `context`: the most tokens a prompt and its reply may take; `sampling`: top_k,
    top_p, repetition_penalty."""
    schemas = [t.schema() for t in tools.values()] or None
    run, messages = ToolRun(), list(history)
    for turn in range(max_turns + 1):
        prompt = tokenizer.render_conversation(messages, add_generation_prompt=True, tools=schemas)[0]
        budget = max_new_tokens if context is None else min(max_new_tokens, context - len(prompt))
        if budget < 1:
            run.answer, run.exhausted = "", True  # the results filled the context
            break
        ids = reply_ids(model, tokenizer, prompt, budget, temperature, generator, **sampling)
        try:
            content, calls = split_calls(ids, tokenizer)
        except MalformedCall:
            content, calls = tokenizer.decode(ids), []
        if not calls or turn == max_turns:
            run.answer, run.exhausted = content, bool(calls)
            run.messages.append({"role": "assistant", "content": content})
            break
        ids_ = [f"call_{len(run.calls) + k + 1}" for k in range(len(calls))]
        step = [{"role": "assistant", "content": content, "tool_calls": [c.message(i) for c, i in zip(calls, ids_)]}]
        for call, call_id in zip(calls, ids_):
            result = run_call(call, tools)
            if on_call is not None:
                on_call(call, result)
            step.append({"role": "tool", "tool_call_id": call_id, "content": result})
        run.calls += calls
        run.messages += step
        messages += step
    return run
