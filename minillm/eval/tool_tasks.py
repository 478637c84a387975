"""Tool use on held-out requests (issue 46): does the model call the right tool with valid arguments, is its final
answer right against the corpus, and does it leave the tools alone when a request needs none?

- quote: "《title》的第二句是什么？" needs search_poems; right when the answer holds that clause exactly.
- tone: "“霜”字是平声还是仄声？" needs rhyme; right when the answer names the character's class (平 or 仄, today's
  Mandarin, as the tool says) and not the other.
- none: the writing requests of eval/tasks.py (tunes, forms, words) with the tools offered; right without a call.

Each kind is asked twice, as every request kind is (issue 45): in the SFT set's own wording about training poems
(the training distribution), and in held-out wordings (eval/heldout.py) about held-out poems, whose titles no
tool conversation asked for. The quote requests are also asked with the tools off: what the model knows by heart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minillm.data.poems import Poem, clauses
from minillm.data.tokenizer import Tokenizer
from minillm.eval.heldout import heldout_wording
from minillm.infer.poem_tools import PoemIndex, rhyme
from minillm.infer.tool_loop import ToolRun, run_with_tools
from minillm.infer.tools import Tool, check_arguments
from minillm.model.model import MiniLLM

NTH = "一二三四"
# The SFT set's canonical wording of each tool request (dataset/tool_chats.py builds from these).
TOOL_TEMPLATES = {
    "tool_quote": "《{title}》的第{nth}句是什么？",
    "tool_source": "“{line}”出自哪首诗？",
    "tool_tone": "“{char}”字是平声还是仄声？",
    "tool_chain": "《{title}》第{nth}句的最后一个字是平声还是仄声？",
}
KINDS = {"quote": "search_poems", "tone": "rhyme", "none": None}


@dataclass
class ToolRequest:
    """One prompt, the tool it needs (None: no call) and the check of the final answer."""

    kind: str
    prompt: str
    tool: str | None
    check: Callable[[str], bool]


def tone_class(char: str) -> str:
    """平 or 仄 of one character as the rhyme tool gives it ('' for a neutral tone)."""
    line = rhyme(char)
    return line[-1] if line[-1] in "平仄" else ""


def tool_requests(poems: list[Poem], index: PoemIndex, limit: int, heldout: bool,
                  writing: list[str]) -> list[ToolRequest]:
    """Up to `limit` requests of each kind from `poems` in order: the canonical wording (heldout False) or the
    held-out ones; `writing`: prompts of writing requests for the no-call kind."""
    out: list[ToolRequest] = []
    quotes = tones = 0
    for poem in poems:
        parts = clauses("\n".join(poem.lines))[:len(NTH)]
        if not parts:
            continue
        if quotes < limit and index.count(poem.title) == 1:
            n = quotes % len(parts)
            template = heldout_wording("quote", quotes) if heldout else TOOL_TEMPLATES["tool_quote"]
            out.append(ToolRequest("quote", template.format(title=poem.title, nth=NTH[n]), "search_poems",
                                   lambda answer, clause=parts[n]: clause in answer))
            quotes += 1
        char = parts[-1][-1]
        level = tone_class(char) if tones < limit else ""
        if level:
            template = heldout_wording("tone", tones) if heldout else TOOL_TEMPLATES["tool_tone"]
            other = "仄" if level == "平" else "平"
            out.append(ToolRequest("tone", template.format(char=char), "rhyme",
                                   lambda answer, a=level, b=other: f"{a}声" in answer and f"{b}声" not in answer))
            tones += 1
    out += [ToolRequest("none", p, None, lambda answer: True) for p in writing[:limit]]
    return out


@dataclass
class ToolScore:
    """One request's outcome."""

    request: ToolRequest
    run: ToolRun

    @property
    def right_tool(self) -> bool:
        """A call was needed: the first call names the right tool with arguments that fit its schema.
        No call was needed: none was made."""
        if self.request.tool is None:
            return not self.run.calls
        return bool(self.run.calls) and self.run.calls[0].name == self.request.tool

    def valid_call(self, tools: dict[str, Tool]) -> bool:
        """The right tool, with arguments its parameters schema accepts."""
        call = self.run.calls[0] if self.run.calls else None
        return self.right_tool and (call is None or check_arguments(call.arguments, tools[call.name].parameters)
                                    is None)

    @property
    def correct(self) -> bool:
        """The final answer passes the request's check (for the no-call kind: no call made)."""
        return self.right_tool if self.request.tool is None else self.request.check(self.run.answer)


def run_tool_requests(model: MiniLLM, tokenizer: Tokenizer, todo: list[ToolRequest], tools: dict[str, Tool],
                      max_new_tokens: int, context: int | None = None,
                      progress: Callable[[], None] | None = None) -> list[ToolScore]:
    """Greedy answers with `tools` offered (none: the tools off), the calls run by the tool loop."""
    scores = []
    with torch.inference_mode():
        for request in todo:
            run = run_with_tools(model, tokenizer, [{"role": "user", "content": request.prompt}], tools,
                                 max_new_tokens=max_new_tokens, context=context)
            scores.append(ToolScore(request, run))
            if progress is not None:
                progress()
    return scores


def summarise(scores: list[ToolScore], tools: dict[str, Tool]) -> dict[str, dict]:
    """Per kind: n, right tool with valid arguments, answer correct (rates in [0, 1])."""
    out = {}
    for kind in KINDS:
        mine = [s for s in scores if s.request.kind == kind]
        if mine:
            out[kind] = {"n": len(mine), "valid_call": sum(s.valid_call(tools) for s in mine) / len(mine),
                         "correct": sum(s.correct for s in mine) / len(mine)}
    return out
