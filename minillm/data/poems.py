"""A rendered poem of the shipped corpus ("title\\nauthor（dynasty）\\nbody lines") and its clauses: what the
evaluation checks answers against and the corpus search tool returns."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Clause separators inside a line of verse, and Chinese characters (what a copy check compares).
CLAUSE_END = "，。？！；、："
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f〇]")


@dataclass
class Poem:
    """A rendered poem split into its parts."""

    title: str
    header: str  # author（dynasty）
    lines: list[str]

    @property
    def dynasty(self) -> str:
        """The dynasty in the header's brackets, or ''."""
        m = re.search(r"（(.+?)）$", self.header)
        return m.group(1) if m else ""


def parse_poem(text: str) -> Poem | None:
    """Title, header and body lines of a rendered poem; None when it has no body."""
    parts = [line for line in text.split("\n") if line.strip()]
    return Poem(parts[0], parts[1], parts[2:]) if len(parts) >= 3 else None


def clauses(text: str) -> list[str]:
    """The clauses of verse text: split at Chinese punctuation and newlines, empty ones dropped."""
    return [c for c in re.split(f"[{CLAUSE_END}\n]", text) if c]


def cjk(text: str) -> str:
    """The Chinese characters of text, in order (punctuation and layout ignored)."""
    return "".join(_CJK.findall(text))
