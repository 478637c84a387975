"""Rendering an outside chat template, inside a worker process that bounds its time, memory and output.

A chat template (Jinja) comes with a model directory, so it is untrusted input: Jinja's sandbox stops it from
reaching Python's internals, but not from looping for hours (nested ``range`` loops) or building a string of
gigabytes. minillm/data/chat_template.py therefore renders in worker processes that run this file as a script
(``python -I template_render.py``; it imports only the standard library and jinja2): each worker limits its
address space (RLIMIT_AS), stops a render at a deadline (an interval timer) and caps the rendered text, and the
parent kills a worker that does not answer in time. The messages go in and the text comes out as JSON lines.

The rendering itself follows transformers (Jinja2's ImmutableSandboxedEnvironment with trim_blocks,
lstrip_blocks, loop controls, its tojson and raise_exception), so the text is byte for byte what
``apply_chat_template`` gives. Two rules hold under any template:

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
import sys
from datetime import datetime

_MARK = "\ue000{}\ue001"  # private-use characters: no template or message holds them
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_CONTENT_FORMS = (lambda c: c, str.strip, str.rstrip, str.lstrip, lambda c: c.lstrip("\n"))


class Refused(Exception):
    """The template cannot render this conversation faithfully, or refused it (its raise_exception)."""


class TooLong(Exception):
    """The rendered text passed the worker's character cap."""


class Deadline(BaseException):
    """The interval timer fired: a BaseException, so that no `except Exception` inside Jinja swallows it."""


def environment():
    """transformers' Jinja environment: sandboxed, trim_blocks and lstrip_blocks, its filters and globals."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Renderer:
    """One compiled template with its special-token strings; every operation the parent asks for."""

    def __init__(self, source: str, special: dict[str, object], max_chars: int) -> None:
        self.template = environment().from_string(source)
        self.special, self.max_chars = special, max_chars

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False) renders it."""
        out, size = [], 0
        try:
            for chunk in self.template.generate(messages=messages, tools=tools,
                                                add_generation_prompt=add_generation_prompt, **self.special):
                size += len(chunk)
                if size > self.max_chars:
                    raise TooLong(f"the chat template rendered more than {self.max_chars:,} characters")
                out.append(chunk)
        except (TooLong, MemoryError):
            raise
        except Exception as e:  # the template's own raise_exception, or an error in it
            raise Refused(f"the chat template refused the conversation: {e}") from None
        return "".join(out)

    def pieces(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None
               ) -> tuple[str, list[tuple[str, bool]]]:
        """(rendered text, [(piece, is_message_text)]): the text cut into the template's pieces and the messages'.
        A null content (an assistant turn of tool calls only) stays null: the template decides what it shows."""
        text = self.render(messages, add_generation_prompt, tools)
        marked = self.render([{**m, "content": _MARK.format(i)} if m.get("content") is not None else m
                              for i, m in enumerate(messages)], add_generation_prompt, tools)
        parts = _MARK_RE.split(marked)  # template, index, template, index, ..., template
        out, pos = [], 0
        for k in range(0, len(parts), 2):
            template_part = parts[k]
            if not text.startswith(template_part, pos):
                raise Refused("the chat template renders differently depending on the message text; minillm "
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
                raise Refused("the chat template rewrites message text beyond trimming it; minillm cannot keep "
                              "message text apart from control tokens under it")
            out.append((shown, True))
            pos = after
        if pos != len(text):
            raise Refused("the chat template's output could not be split into its pieces")
        return text, [(p, is_text) for p, is_text in out if p]

    def learned_spans(self, messages: list[dict], specials: list[str], tools: list | None = None
                      ) -> list[tuple[int, int]]:
        """Character spans of the rendered conversation that SFT learns: each assistant reply (its tool calls too)
        and its end marker; never a tool's result."""
        full = self.render(messages, tools=tools)
        spans = []
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:k], True, tools)
            upto = self.render(messages[:k + 1], tools=tools)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise Refused(f"the chat template renders assistant turn {k} differently once the conversation "
                              "goes on (or the generation prompt is not how the turn starts), so its loss mask "
                              "cannot be found by rendering prefixes; train on single-turn chats, or use ChatML")
            turn = upto[len(before):]
            ends = [turn.rfind(s) + len(s) for s in specials if s in turn]
            spans.append((len(before), len(before) + (max(ends) if ends else len(turn))))
        return spans

    def conversation(self, messages: list[dict], add_generation_prompt: bool, specials: list[str] | None,
                     tools: list | None = None) -> dict:
        """What Tokenizer.render_conversation needs in one round trip: the pieces, and the learned spans."""
        _, pieces = self.pieces(messages, add_generation_prompt, tools)
        spans = [] if specials is None else self.learned_spans(messages, specials, tools)
        return {"pieces": pieces, "spans": spans}


def _answer(renderer: Renderer, request: dict) -> object:
    op, args = request["op"], request["args"]
    if op == "render":
        return renderer.render(*args)
    if op == "conversation":
        return renderer.conversation(*args)
    if op == "turn":
        messages, specials = args
        (a, b), = renderer.learned_spans(messages, specials)
        return renderer.render(messages)[a:b]
    raise ValueError(f"unknown operation {op!r}")


def serve(stdin, stdout) -> None:
    """The worker's loop: the first line sets the template and the limits, each next line is one request."""
    import resource
    import signal
    import threading

    setup = json.loads(stdin.readline())
    seconds, memory = setup["seconds"], setup["memory_bytes"]

    def expire(signum, frame):
        raise Deadline

    signal.signal(signal.SIGALRM, expire)
    parent = setup["parent"]

    def orphaned() -> None:  # a parent that died without closing the pipe: stop rather than spin on
        import os
        import time

        while True:
            time.sleep(1)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    try:
        from jinja2 import TemplateSyntaxError
    except ImportError as e:
        _write(stdout, {"error": "import", "message": str(e)})
        return
    # Compiling is bounded too: Jinja folds constant expressions ("x" * 10 ** 10) while it compiles.
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        renderer = Renderer(setup["source"], setup["special"], setup["max_chars"])
        reply: dict = {"ok": True}
    except TemplateSyntaxError as e:
        reply = {"error": "syntax", "message": e.message, "line": e.lineno}
    except Deadline:
        reply = {"error": "time", "message": f"the chat template took longer than {seconds:g} s to compile"}
    except MemoryError:
        reply = {"error": "memory", "message": f"compiling the chat template needed more than {memory >> 20} MiB"}
    except Exception as e:  # anything else Jinja raised while compiling
        reply = {"error": "compile", "message": f"{type(e).__name__}: {e}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    _write(stdout, reply)
    if "error" in reply:
        return
    for line in stdin:
        try:
            request = json.loads(line)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                reply = {"ok": _answer(renderer, request)}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Deadline:
            reply = {"error": "time", "message": f"the chat template took longer than {seconds:g} s to render"}
        except (MemoryError, TooLong) as e:
            reply = {"error": "memory", "message": str(e) or "the chat template needed more memory than the "
                                                             f"{memory >> 20} MiB a render may use"}
        except Refused as e:
            reply = {"error": "refused", "message": str(e)}
        except RecursionError:
            reply = {"error": "refused", "message": "the chat template recursed too deeply"}
        except Exception as e:  # anything else the template provoked: this request fails, the worker goes on
            reply = {"error": "refused", "message": f"the chat template failed: {type(e).__name__}: {e}"}
        _write(stdout, reply)


def _write(stdout, reply: dict) -> None:
    try:
        stdout.write(json.dumps(reply) + "\n")  # ASCII: a lone surrogate in a message survives the pipe
        stdout.flush()
    except MemoryError:  # the reply itself did not fit: say so in a few bytes
        stdout.write(json.dumps({"error": "memory", "message": "the rendered text did not fit in memory"}) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
