"""An outside model's own chat template (Jinja, as transformers renders it), rendered where it cannot hurt.

minillm's own tokenizer speaks ChatML, rendered in Python (Tokenizer.render_conversation). A checkpoint from
elsewhere (Llama 3, Gemma, Qwen3, SmolLM2) carries its template in tokenizer_config.json or chat_template.jinja,
and a template is a program that came with a download. ChatTemplate renders it in worker processes
(minillm/data/template_render.py, which also holds the rendering rules): each render is bounded in time
(RENDER_SECONDS), memory (RENDER_MEMORY) and output (MAX_CHARS); a template that exceeds a bound fails that
render with a TemplateLimit, and the caller (a server thread, a training script) carries on. Syntax errors name
the file and the line; a template that rejects a conversation (raise_exception) is a TemplateRefused.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from minillm.data.conversation import check_messages

RENDER_SECONDS = float(os.environ.get("MINILLM_TEMPLATE_SECONDS", 5.0))
RENDER_MEMORY = 1 << 30  # bytes of address space a worker may map, the interpreter's own included
MAX_CHARS = 16 << 20  # characters of rendered text
STARTUP_SECONDS = 60.0  # a worker's interpreter and jinja2 starting on a busy machine
MAX_WORKERS = 8  # renders at once; more callers wait for a free worker
_WORKER = Path(__file__).resolve().with_name("template_render.py")


class TemplateError(ValueError):
    """A chat template minillm cannot render faithfully, or its renderer (jinja2) is missing."""


class TemplateRefused(TemplateError):
    """The template rejected this conversation (its raise_exception, an error in it, or text it rewrites)."""


class TemplateLimit(TemplateError):
    """Rendering passed a bound: time, memory or length."""


def _require_jinja() -> None:
    try:
        import jinja2  # noqa: F401  (the worker imports it; a missing one is said here, in the caller's words)
    except ImportError as e:
        raise TemplateError("this tokenizer's own chat template needs jinja2: pip install -e \".[jinja]\"") from e


class _Worker:
    """One renderer process: JSON lines in, JSON lines out, answered within a deadline or killed."""

    def __init__(self, setup: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", str(_WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buffer = b""
        self.ready = self.ask(setup, STARTUP_SECONDS)  # {"ok": true}, or why the template did not compile

    def ask(self, request: dict, seconds: float) -> dict:
        """Send one request and wait for its answer; TemplateLimit (and the process killed) past `seconds`."""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            raise TemplateLimit("the chat template's renderer stopped (it ran out of memory)") from None
        deadline = time.monotonic() + seconds
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                self.kill()
                raise TemplateLimit(f"the chat template took longer than {seconds:g} s to render")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.kill()
                raise TemplateLimit("the chat template's renderer stopped (it ran out of memory)")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def kill(self) -> None:
        """End the process now (a render that overran cannot be trusted to stop)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class ChatTemplate:
    """A Jinja chat template with the special-token strings it may use (bos_token, eos_token, ...) and the file it
    came from; rendered in bounded worker processes, several at once for concurrent callers."""

    def __init__(self, source: str, special: dict[str, object], origin: str = "the chat template") -> None:
        self.source, self.special, self.origin = source, special, origin
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_WORKERS)
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # Workers belong to the process that started them; a copy (a DataLoader worker) starts its own.
        return {"source": self.source, "special": self.special, "origin": self.origin}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["source"], state["special"], state["origin"])

    def __del__(self) -> None:
        try:
            if self._pid == os.getpid():
                for worker in self._idle:
                    worker.kill()
        except Exception:  # at interpreter exit modules may be gone; the workers see their pipe close and exit
            pass

    def _take(self) -> _Worker:
        if self._pid != os.getpid():  # forked: the parent's pipes are not ours to use
            self.__init__(self.source, self.special, self.origin)
        with self._lock:
            if self._idle:
                return self._idle.pop()
        _require_jinja()
        try:
            worker = _Worker({"source": self.source, "special": self.special, "seconds": RENDER_SECONDS,
                              "memory_bytes": RENDER_MEMORY, "max_chars": MAX_CHARS, "parent": os.getpid()})
        except TemplateLimit as e:
            raise TemplateLimit(f"{self.origin}: {e} (while compiling)") from None
        if worker.ready.get("error") == "syntax":
            worker.kill()
            raise TemplateError(f"{self.origin}: the chat template has a syntax error at line {worker.ready['line']} "
                                f"of the template: {worker.ready['message']}")
        if "error" in worker.ready:
            worker.kill()
            kind = TemplateLimit if worker.ready["error"] in ("time", "memory") else TemplateError
            raise kind(f"{self.origin}: the chat template cannot be loaded: {worker.ready['message']}")
        return worker

    def _call(self, op: str, *args: object) -> object:
        with self._slots:
            worker = self._take()
            try:
                reply = worker.ask({"op": op, "args": args}, RENDER_SECONDS + 2.0)
            except TemplateLimit as e:
                raise TemplateLimit(f"{self.origin}: {e}") from None
            with self._lock:
                self._idle.append(worker)
        if "error" in reply:
            kind = {"refused": TemplateRefused}.get(reply["error"], TemplateLimit)
            raise kind(f"{self.origin}: {reply['message']}")
        return reply["ok"]

    def check(self) -> None:
        """Compile the template now (in a worker): TemplateError naming the file and line of a syntax error."""
        with self._slots:
            worker = self._take()
            with self._lock:
                self._idle.append(worker)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
               ) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False, tools=...)."""
        check_messages(messages, tools)
        return self._call("render", messages, add_generation_prompt, tools)

    def conversation(self, messages: list[dict], add_generation_prompt: bool, specials: list[str] | None,
                     tools: list[dict] | None = None) -> tuple[list[tuple[str, bool]], list[tuple[int, int]]]:
        """([(piece, is_message_text)], learned character spans): the rendered conversation cut into the
        template's pieces and the messages' text, and (with `specials`, the control tokens' strings) the spans
        SFT learns: each assistant reply and its end marker. See template_render.Renderer."""
        check_messages(messages, tools)
        out = self._call("conversation", messages, add_generation_prompt, specials, tools)
        return [(p, bool(t)) for p, t in out["pieces"]], [(a, b) for a, b in out["spans"]]

    def turn(self, messages: list[dict], specials: list[str]) -> str:
        """The learned text of the one assistant turn in `messages`: its reply and the template's end marker."""
        return self._call("turn", messages, specials)


def refuse_control_text(messages: list[dict], tools: list[dict] | None, specials: list[str]) -> None:
    """Tool schemas and call arguments are rendered by the template itself, so they cannot be kept apart as
    message text: one that spells a control token (\"<|im_start|>\") is refused, naming where."""
    def walk(value: object, where: str) -> None:
        if isinstance(value, str):
            bad = [s for s in specials if s in value]
            if bad:
                raise ValueError(f"{where} holds the control token {bad[0]!r}: tool definitions and call arguments "
                                 "may not spell control tokens")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key, where)
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for k, item in enumerate(value):
                walk(item, f"{where}[{k}]")

    walk(tools or [], "tools")
    for i, m in enumerate(messages):
        walk(m.get("tool_calls") or [], f"messages[{i}].tool_calls")


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
