"""Conversations that call the poetry tools (issue 46), for sft.jsonl: built from the training poems, with the
tools' real results (minillm/infer/poem_tools.py run over the whole shipped corpus, as at run time).

- tool_quote: "《title》的第二句是什么？" -> search_poems(title) -> the clause, quoted exactly.
- tool_source: "“a line”出自哪首诗？" -> search_poems(line) -> author and title.
- tool_tone: "“霜”字是平声还是仄声？" -> rhyme(char) -> its pinyin and level or oblique tone.
- tool_chain (two calls): "《title》第二句的最后一个字是平声还是仄声？" -> search_poems, then rhyme of that character.
- tool_none: writing requests (tunes, forms, words) with the tools offered, answered without a call: a model must
  learn when not to call as much as when to.

rl_prompts() makes dataset/rl_tools.jsonl, GRPO's prompts for the tools (train_grpo.py --tools): quote and tone
requests about other training poems, each with the fields its reward checks, beside writing requests that need
no call.

Every conversation offers both tools. Titles asked are unique in the corpus (the search finds that poem first) and
come from training poems only: eval_tasks.py asks for held-out poems' titles, in wordings kept apart as for the
other requests (minillm/eval/heldout.py).
"""

from __future__ import annotations

import random
import re

from minillm.data.poems import Poem, clauses
from minillm.eval.tool_tasks import NTH, TOOL_TEMPLATES, tone_class  # canonical wordings (the evaluation's)
from minillm.infer.poem_tools import PoemIndex, poem_tools
from minillm.infer.tools import Call, run_call

TOOL_QUOTA = {"tool_quote": 900, "tool_source": 300, "tool_tone": 400, "tool_chain": 300, "tool_none": 600}
RL_QUOTA = {"quote": 300, "tone": 200, "none": 200}  # rl_tools.jsonl: prompts per kind
CANONICAL_SHARE = 1 / 3
# The writing requests answered without a call when tools are offered (build.py's pattern names).
NO_TOOL_PATTERNS = ("tune_write", "tune_open", "form", "words", "word_line", "theme")
_READING = re.compile(r"^(.)：(\S+)，韵母 (\S+)，第(\d)声，(平|仄)$")


def answer_tone(result: str) -> str | None:
    """'“霜”读 shuāng，平声。' from the rhyme tool's line about one character; None for a neutral tone."""
    m = _READING.match(result.split("\n")[0])
    return f"“{m.group(1)}”读 {m.group(2)}，{m.group(5)}声。" if m else None


class ToolChats:
    """The tool conversations of one build: the tools over the whole corpus, the training poems to ask about."""

    def __init__(self, train: list[Poem], corpus: list[Poem], wordings: dict[str, list[str]], seed: int) -> None:
        self.index = PoemIndex(corpus)
        self.tools = poem_tools(self.index)
        self.schemas = [t.schema() for t in self.tools.values()]
        self.train, self.wordings = train, wordings
        self.rng = random.Random(f"{seed}:tools")

    def ask(self, kind: str, **fields: str) -> str:
        """A request of `kind` in its canonical wording for CANONICAL_SHARE of them, else in a composed one."""
        template = TOOL_TEMPLATES[kind] if self.rng.random() < CANONICAL_SHARE else self.rng.choice(self.wordings[kind])
        return template.format(**fields)

    def call(self, name: str, arguments: dict, k: int) -> tuple[dict, dict]:
        """The assistant turn that calls, and the tool turn with the real result."""
        result = run_call(Call(name, arguments), self.tools)
        call_id = f"call_{k}"
        return ({"role": "assistant", "content": "", "tool_calls": [Call(name, arguments).message(call_id)]},
                {"role": "tool", "tool_call_id": call_id, "content": result})

    def chat(self, request: str, turns: list[dict], answer: str) -> dict:
        """One sft.jsonl record offering the tools."""
        return {"conversations": [{"role": "user", "content": request}, *turns,
                                  {"role": "assistant", "content": answer}], "tools": self.schemas}

    def quote(self, poem: Poem, chain: bool) -> dict | None:
        """tool_quote / tool_chain: the n-th clause of a poem whose title is unique, as the search shows it."""
        parts = clauses("\n".join(poem.lines))[:len(NTH)]
        if self.index.count(poem.title) != 1 or not parts:
            return None
        n = self.rng.randrange(len(parts))
        clause, nth = parts[n], NTH[n]
        turns = list(self.call("search_poems", {"query": poem.title}, 1))
        if clause not in turns[1]["content"]:
            return None  # cut off by the result budget
        if not chain:
            return self.chat(self.ask("tool_quote", title=poem.title, nth=nth), turns,
                             f"《{poem.title}》的第{nth}句是“{clause}”。")
        turns += self.call("rhyme", {"text": clause[-1]}, 2)
        tone = answer_tone(turns[-1]["content"])
        if tone is None:
            return None
        return self.chat(self.ask("tool_chain", title=poem.title, nth=nth), turns,
                         f"第{nth}句是“{clause}”，末字{tone}")

    def source(self, poem: Poem) -> dict | None:
        """tool_source: a clause of 5-7 characters that the search finds in this poem first."""
        parts = [c for c in clauses("\n".join(poem.lines)) if 5 <= len(c) <= 7]
        if not parts:
            return None
        line = self.rng.choice(parts)
        found = self.index.find(line)
        if not found or found[0] is not poem or self.index.count(poem.title) != 1:
            return None
        author = poem.header.split("（")[0]
        return self.chat(self.ask("tool_source", line=line), list(self.call("search_poems", {"query": line}, 1)),
                         f"“{line}”出自{author}的《{poem.title}》。")

    def tone(self, poem: Poem) -> dict | None:
        """tool_tone: one character of the poem, looked up."""
        chars = "".join(clauses("\n".join(poem.lines)))
        if not chars:
            return None
        char = self.rng.choice(chars)
        turns = list(self.call("rhyme", {"text": char}, 1))
        tone = answer_tone(turns[1]["content"])
        return self.chat(self.ask("tool_tone", char=char), turns, tone) if tone else None

    def build(self, no_tool: list[dict]) -> tuple[list[dict], dict[str, int]]:
        """Up to TOOL_QUOTA conversations of each kind; `no_tool`: writing chats to offer the tools to unanswered."""
        makers = {"tool_quote": lambda p: self.quote(p, chain=False), "tool_chain": lambda p: self.quote(p, True),
                  "tool_source": self.source, "tool_tone": self.tone}
        out, counts = [], {}
        order = self.train[:]
        for kind, make in makers.items():
            self.rng.shuffle(order)
            made = []
            for poem in order:
                if len(made) == TOOL_QUOTA[kind]:
                    break
                if (record := make(poem)) is not None:
                    made.append(record)
            out += made
            counts[kind] = len(made)
        chosen = self.rng.sample(no_tool, min(TOOL_QUOTA["tool_none"], len(no_tool)))
        out += [{**record, "tools": self.schemas} for record in chosen]
        counts["tool_none"] = len(chosen)
        return out, counts

    def rl_prompts(self, writing: list[dict]) -> tuple[list[dict], dict[str, int]]:
        """rl_tools.jsonl: RL_QUOTA prompts of each kind, as {"prompt": [user message], "request": fields}; quote
        and tone requests about training poems (the search finds the quoted clause), and `writing` lines (prompts
        with their "request") that need no call. Its own random stream: sft.jsonl does not change with it."""
        rng, self.rng = self.rng, random.Random(f"{self.rng.random()}:rl_tools")
        order = self.train[:]
        self.rng.shuffle(order)
        quotes, tones = [], []
        for poem in order:
            parts = clauses("\n".join(poem.lines))[:len(NTH)]
            if not parts:
                continue
            if len(quotes) < RL_QUOTA["quote"] and self.index.count(poem.title) == 1:
                n = self.rng.randrange(len(parts))
                if parts[n] in run_call(Call("search_poems", {"query": poem.title}), self.tools):
                    quotes.append(self.prompt(self.ask("tool_quote", title=poem.title, nth=NTH[n]),
                                              {"kind": "quote", "clause": parts[n]}))
            char = self.rng.choice("".join(parts))
            if len(tones) < RL_QUOTA["tone"] and (level := tone_class(char)):
                tones.append(self.prompt(self.ask("tool_tone", char=char), {"kind": "tone", "char": char,
                                                                            "level": level}))
        chosen = self.rng.sample(writing, min(RL_QUOTA["none"], len(writing)))
        none = [{"prompt": line["prompt"], "request": line["request"]} for line in chosen]
        out = quotes + tones + none
        self.rng.shuffle(out)
        self.rng = rng
        return out, {"quote": len(quotes), "tone": len(tones), "none": len(none)}

    @staticmethod
    def prompt(request: str, fields: dict) -> dict:
        """One rl_tools.jsonl line."""
        return {"prompt": [{"role": "user", "content": request}], "request": fields}
