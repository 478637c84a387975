"""Constrained decoding: a grammar masks the logits of one sequence so that its output always parses and validates.

Used by the server when tool_choice forces a call (the name is one of the functions given, the arguments validate
against that function's parameters schema) or response_format asks for JSON (any object, or one that validates
against a json_schema). The grammar library is llguidance (`pip install -e ".[grammar]"`), chosen by measurement
(bench/RESULTS.md, "Constrained decoding"): its mask costs microseconds per token on this vocabulary, it compiles
JSON Schema (with its own checks of what it cannot enforce) and it speaks Lark, which names our control tokens.

A call is written as the model learned it (minillm/data/conversation.py): `<tool_call>` "\\n" {"name": ...,
"arguments": {...}} "\\n" `</tool_call>`, with the separators the template uses (", " and ": ").
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from minillm.data.conversation import TOOL_CALL, TOOL_CALL_END
from minillm.data.tokenizer import Tokenizer

# The JSON the template writes: ", " between items and ": " after keys, no other whitespace.
_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema or grammar the library cannot compile (or the library is not installed)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise GrammarError('constrained decoding needs llguidance: pip install -e ".[grammar]"') from e
    return llguidance


def available() -> bool:
    """Whether the grammar library is installed."""
    try:
        _llguidance()
    except GrammarError:
        return False
    return True


@lru_cache(maxsize=4)
def _ll_tokenizer(spec: str, vocab_size: int, end_id: int):
    """The library's view of a tokenizer (built once per tokenizer: it walks the vocabulary)."""
    return _llguidance().LLTokenizer(spec, n_vocab=vocab_size, eos_token=end_id)


def _schema(schema: dict) -> dict:
    """A JSON schema with the template's layout of separators."""
    return {**schema, "x-guidance": {**schema.get("x-guidance", {}), **_LAYOUT}}


def call_grammar(tools: list[dict], tokenizer: Tokenizer) -> str:
    """A Lark grammar for exactly one call to one of `tools` (OpenAI function tools), arguments per its schema."""
    options = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = _schema(options[0] if len(options) == 1 else {"anyOf": options})
    opening, closing = tokenizer.tool_ids[TOOL_CALL], tokenizer.tool_ids[TOOL_CALL_END]
    return f'start: <[{opening}]> "\\n" call "\\n" <[{closing}]>\ncall: %json {json.dumps(schema)}'


def json_grammar(schema: dict | None) -> str:
    """A Lark grammar for one JSON value: an object (schema None) or one that validates against `schema`."""
    return f"start: %json {json.dumps(_schema(schema if schema is not None else {'type': 'object'}))}"


class Constraint:
    """One sequence's grammar state: masks its logits, advances with each token it picks."""

    def __init__(self, grammar: str, tokenizer: Tokenizer) -> None:
        llg = _llguidance()
        self.vocab_size = tokenizer.vocab_size
        ll_tok = _ll_tokenizer(tokenizer.backend.to_str(), tokenizer.vocab_size, tokenizer.turn_end_ids[0])
        self.matcher = llg.LLMatcher(ll_tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self._bits = torch.arange(32, dtype=torch.int32)

    def mask(self, logits_1V: torch.Tensor) -> torch.Tensor:
        """The logits with every token the grammar does not allow next set to -inf."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        allowed_V = ((words[:, None] >> self._bits) & 1).flatten()[:logits_1V.shape[-1]].bool()
        return logits_1V.masked_fill(~allowed_V.to(logits_1V.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Take the picked token (the end of the turn once the grammar is complete)."""
        self.matcher.consume_token(token)


def check_grammar(grammar: str, tokenizer: Tokenizer) -> None:
    """GrammarError with the library's message when `grammar` does not compile (a schema it cannot enforce)."""
    Constraint(grammar, tokenizer)
