"""An outside model's own chat template (Jinja, as transformers renders it), its ids, loss mask and end markers.

minillm's own tokenizer speaks ChatML, rendered in Python (Tokenizer.render_conversation). A checkpoint from
elsewhere (Llama 3, Gemma, Qwen3, SmolLM2) carries its template in tokenizer_config.json or chat_template.jinja;
this module renders it in Jinja2's sandbox with the settings transformers uses, so the text is byte for byte
what `apply_chat_template` gives. Two rules hold under any template:

- Message text stays text. The template is rendered a second time with each message's content replaced by a
  marker; the pieces between markers are the template's own (encoded with control tokens), the rest is the
  messages' text (encoded as plain text). A template that rewrites message text beyond trimming is refused.
- The loss mask comes from prefix rendering: the conversation up to an assistant turn with the generation
  prompt must be a prefix of the conversation including that turn; the difference, up to and including the
  turn's last control token (its end marker), is learned. A template where that fails is refused.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

_MARK = "\ue000{}\ue001"  # private-use characters: no template or message holds them
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_CONTENT_FORMS = (lambda c: c, str.strip, str.rstrip, str.lstrip, lambda c: c.lstrip("\n"))


class TemplateError(ValueError):
    """A chat template minillm cannot render faithfully, or its renderer (jinja2) is missing."""


def _environment():
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise TemplateError("this tokenizer's own chat template needs jinja2: pip install -e \".[jinja]\"") from e

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A Jinja chat template with the special-token strings it may use (bos_token, eos_token, ...)."""

    def __init__(self, source: str, special: dict[str, object]) -> None:
        self.source = source
        self.special = special
        self._compiled = None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False) renders it."""
        if self._compiled is None:
            self._compiled = _environment().from_string(self.source)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must have 'role' and 'content' keys, got {m!r}")
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except Exception as e:  # the template's own raise_exception, or an error in it
            raise TemplateError(f"the chat template refused the conversation: {e}") from e

    def pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[str, bool]]]:
        """(rendered text, [(piece, is_message_text)]): the text cut into the template's pieces and the messages'."""
        text = self.render(messages, add_generation_prompt)
        marked = self.render([{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)],
                             add_generation_prompt)
        parts = _MARK_RE.split(marked)  # template, index, template, index, ..., template
        out, pos = [], 0
        for k in range(0, len(parts), 2):
            template_part = parts[k]
            if not text.startswith(template_part, pos):
                raise TemplateError("the chat template renders differently depending on the message text; minillm "
                                    "cannot keep message text apart from control tokens under it")
            out.append((template_part, False))
            pos += len(template_part)
            if k + 1 == len(parts):
                break
            content, following = messages[int(parts[k + 1])]["content"], parts[k + 2]
            for form in _CONTENT_FORMS:
                shown = form(content)
                after = pos + len(shown)
                if text.startswith(shown, pos) and text.startswith(following, after):
                    break
            else:
                raise TemplateError("the chat template rewrites message text beyond trimming it; minillm cannot "
                                    "keep message text apart from control tokens under it")
            out.append((shown, True))
            pos = after
        if pos != len(text):
            raise TemplateError("the chat template's output could not be split into its pieces")
        return text, [(p, is_text) for p, is_text in out if p]

    def learned_spans(self, messages: list[dict], specials: list[str]) -> list[tuple[int, int]]:
        """Character spans of the rendered conversation that SFT learns: each assistant reply and its end marker."""
        full = self.render(messages)
        spans = []
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            upto = self.render(messages[:k + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(f"the chat template renders assistant turn {k} differently once the conversation "
                                    "goes on (or the generation prompt is not how the turn starts), so its loss mask "
                                    "cannot be found by rendering prefixes; train on single-turn chats, or use "
                                    "ChatML")
            turn = upto[len(before):]
            ends = [turn.rfind(s) + len(s) for s in specials if s in turn]
            spans.append((len(before), len(before) + (max(ends) if ends else len(turn))))
        return spans


def cut_at(pieces: list[tuple[str, bool]], cuts: set[int]) -> list[tuple[str, bool, int]]:
    """Split template pieces at the character positions `cuts`; [(piece, is_message_text, start)]."""
    out, pos = [], 0
    for piece, is_text in pieces:
        inner = sorted(c - pos for c in cuts if pos < c < pos + len(piece))
        if is_text and inner:
            raise TemplateError("the chat template's assistant turn starts or ends inside message text")
        for a, b in zip([0, *inner], [*inner, len(piece)]):
            out.append((piece[a:b], is_text, pos + a))
        pos += len(piece)
    return out
