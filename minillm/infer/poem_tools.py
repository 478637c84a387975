"""The tools a poetry model calls: a search over the shipped corpus (so that it can quote poems it cannot
memorise) and a pronunciation lookup (pinyin, final, tone, level or oblique) by pypinyin, a well-kept library.

    tools = poem_tools()                      # {"search_poems": Tool, "rhyme": Tool}
    run_call(Call("rhyme", {"text": "霜"}), tools)   # '霜：shuāng，韵母 uang，第1声，平'
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from minillm.data.jsonl import iter_texts
from minillm.data.poems import Poem, cjk, parse_poem
from minillm.infer.tools import Tool

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = (REPO / "dataset" / "pretrain.jsonl", REPO / "dataset" / "eval.jsonl")
MAX_RESULTS = 3
MAX_CHARACTERS = 12  # characters a rhyme lookup describes


class PoemIndex:
    """The corpus's poems, found by title, by a line they hold, or by author."""

    def __init__(self, poems: list[Poem]) -> None:
        self.poems = poems
        self.titles: dict[str, list[int]] = {}
        for i, poem in enumerate(self.poems):
            for name in dict.fromkeys([poem.title, *poem.title.split("·")]):
                self.titles.setdefault(name, []).append(i)

    @classmethod
    def load(cls, paths: tuple[Path, ...] = DEFAULT_CORPUS) -> PoemIndex:
        """The poems of JSON-lines files of rendered poems ({"text": ...}), in file order."""
        poems: list[Poem] = []
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"the poem search tool reads {path}, which is not there (a checkout of the "
                                        "repository ships it; pass the corpus files another way otherwise)")
            poems += [p for text in iter_texts(path, "text") if (p := parse_poem(text))]
        return cls(poems)

    def find(self, query: str, limit: int = 1) -> list[Poem]:
        """The best matches: the exact title, a part of a title ("浣溪沙" of "浣溪沙·春情"), a title holding the
        query, a poem holding it as text, then the author's poems; in corpus order within each."""
        query = query.strip().strip("《》「」“”\"'")
        if not query:
            return []
        exact = [i for i in self.titles.get(query, []) if self.poems[i].title == query]
        ranks = [exact, self.titles.get(query, []),
                 [i for i, p in enumerate(self.poems) if query in p.title],
                 [i for i, p in enumerate(self.poems) if query in "\n".join(p.lines)],
                 [i for i, p in enumerate(self.poems) if p.header.split("（")[0] == query]]
        found = list(dict.fromkeys(i for rank in ranks for i in rank))[:limit]
        return [self.poems[i] for i in found]

    def count(self, title: str) -> int:
        """How many poems bear exactly this title."""
        return sum(self.poems[i].title == title for i in self.titles.get(title, []))


def show_poem(poem: Poem) -> str:
    """A poem as the search tool returns it: 《title》author（dynasty）, then its lines."""
    return "\n".join([f"《{poem.title}》{poem.header}", *poem.lines])


def search_poems(index: PoemIndex, query: str, limit: int = 1) -> str:
    """The poems matching `query` (a title, a line, an author), or a sentence saying there are none."""
    poems = index.find(query, max(1, min(limit, MAX_RESULTS)))
    return "\n\n".join(show_poem(p) for p in poems) if poems else f"没有找到与“{query}”相关的诗词。"


RHYME_NEEDS = 'the rhyme tool needs pypinyin: pip install -e ".[tools]"'


def rhyme_available() -> bool:
    """Whether pypinyin (the tools extra) is installed, so that the rhyme tool can answer."""
    return importlib.util.find_spec("pypinyin") is not None


def rhyme(text: str) -> str:
    """Each Chinese character of `text`: its pinyin, its final, its tone and whether it is level (平: tones 1-2)
    or oblique (仄: tones 3-4), in today's Mandarin."""
    try:
        from pypinyin import Style, pinyin
    except ImportError as e:
        raise RuntimeError(RHYME_NEEDS) from e
    chars = cjk(text)[:MAX_CHARACTERS]
    if not chars:
        return "没有汉字可查。"
    marks = [r[0] for r in pinyin(chars, style=Style.TONE)]
    numbered = [r[0] for r in pinyin(chars, style=Style.TONE3, neutral_tone_with_five=True)]
    finals = [r[0] for r in pinyin(chars, style=Style.FINALS)]
    out = []
    for char, mark, digits, final in zip(chars, marks, numbered, finals):
        tone = int(digits[-1]) if digits[-1:].isdigit() else 5
        level = "平" if tone in (1, 2) else "仄" if tone in (3, 4) else "轻声"
        out.append(f"{char}：{mark}，韵母 {final.replace('v', 'ü')}，第{tone}声，{level}")
    return "\n".join(out)


def poem_tools(corpus: tuple[Path, ...] | PoemIndex = DEFAULT_CORPUS) -> dict[str, Tool]:
    """The poetry tools by name, searching `corpus` (files, read on the first search, or an index)."""
    index: list[PoemIndex] = [corpus] if isinstance(corpus, PoemIndex) else []

    def search(query: str) -> str:
        if not index:
            index.append(PoemIndex.load(corpus))
        return search_poems(index[0], query)

    tools = [
        Tool("search_poems", "按题目、作者或诗句查找诗词",
             {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}, search),
        Tool("rhyme", "查汉字的拼音、韵母、声调与平仄",
             {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
             rhyme),
    ]
    return {t.name: t for t in tools}


def select_tools(names: str, corpus: tuple[Path, ...] | PoemIndex = DEFAULT_CORPUS) -> dict[str, Tool]:
    """The poetry tools a comma-separated list names ("all": every one); ValueError naming an unknown name."""
    tools = poem_tools(corpus)
    wanted = list(tools) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in tools]
    if unknown or not wanted:
        raise ValueError(f"no tool named {unknown[0] if unknown else names!r}; the tools are {', '.join(tools)} "
                         "(or all)")
    return {n: tools[n] for n in wanted}
