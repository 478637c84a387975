"""The choices of one API request in flight: their scheduler requests, their text, their tool calls, and the
mailbox that carries tokens from the scheduler thread to the server's event loop."""

from __future__ import annotations

import asyncio
import threading

from minillm.data.conversation import TOOL_CALL
from minillm.data.tokenizer import Tokenizer
from minillm.infer.chat import TextStream
from minillm.infer.constrain import Constraint
from minillm.infer.openai_api import ApiError, CompletionSpec, usage
from minillm.infer.openai_tools import reply_calls
from minillm.infer.serving import GenerationRequest


class Mailbox:
    """Carries tokens from the scheduler thread to the event loop, waking the loop once per burst.

    A decode step emits a token for every running sequence; one wake-up for all of them (instead of one
    per token) leaves the scheduler thread more of the interpreter.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, tuple]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        """Queue `item` for `queue` (any thread)."""
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Choices:
    """The choices of one request in flight: their scheduler requests, text streams and one event queue."""

    def __init__(self, spec: CompletionSpec, tokenizer: Tokenizer, mailbox: Mailbox) -> None:
        self.events: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()
        stop_ids = tuple(tokenizer.stop_ids)
        self.requests, self.texts, self.prompt_len = [], [], []
        for prompt in spec.prompts:
            for _ in range(spec.n):
                i = len(self.requests)

                def emit(token: int | None, i: int = i) -> None:  # scheduler thread -> event loop
                    mailbox.post(self.events, (i, token))

                constraint = Constraint(spec.grammar, tokenizer) if spec.grammar else None
                self.requests.append(GenerationRequest(prompt, spec.max_tokens, spec.choice_sampling(i % spec.n),
                                                       stop_ids, emit, spec.forced, spec.banned, constraint))
                self.texts.append(TextStream(tokenizer, spec.stop))
                self.prompt_len.append(len(prompt))
        self.open = len(self.requests)
        self.counted = [0] * len(self.requests)  # tokens of each choice up to where its text ended
        # Tool calls: each choice's ids, the text held back from its first call marker on (a call is not
        # content; a malformed one turns out to be), and its calls once it has ended.
        self.spec, self.tokenizer = spec, tokenizer
        self.marker = tokenizer.tool_ids.get(TOOL_CALL) if spec.tools else None
        self.ids: list[list[int]] = [[] for _ in self.requests]
        self.held = [""] * len(self.requests)
        self.calls: list[list[dict]] = [[] for _ in self.requests]

    async def next(self) -> tuple[int, str, str | None]:
        """(choice index, new text, finish reason or None) for the next event of any choice."""
        i, token = await self.events.get()
        text, r = self.texts[i], self.requests[i]
        if token is not None:
            if text.stopped:  # tokens decoded after the stop string, before the slot was freed
                return i, "", None
            self.counted[i] += 1
            self.ids[i].append(token)
            piece = text.push(token)
            if self.marker is not None and (self.held[i] or self.marker in self.ids[i]):
                self.held[i] += piece  # inside a call: held until the reply ends
                piece = ""
            if text.stopped:
                r.cancel()  # a stop string: the text is complete, free the slot at the next step
                return i, piece + self._release(i, text.finish()), "stop"
            return i, piece, None
        self.open -= 1
        self.counted[i] += r.finish_reason == "stop" and not text.stopped  # the end-of-turn id produced
        if r.finish_reason == "error":
            raise ApiError(500, f"generation failed: {r.error}", kind="server_error")
        if text.stopped:  # already reported when the stop string was found
            return i, "", None
        if self.marker is not None and self.marker in self.ids[i]:
            found = reply_calls(self.ids[i], self.tokenizer, self.spec.tools, self.spec.parallel_tool_calls)
            if found is not None and r.finish_reason == "stop":
                self.calls[i] = found[1]
                return i, "", "tool_calls"
        return i, self._release(i, text.finish()), "stop" if r.finish_reason == "stop" else "length"

    def _release(self, i: int, tail: str) -> str:
        """The held text (a call that turned out malformed is plain content) and the rest."""
        held, self.held[i] = self.held[i], ""
        return held + tail

    def content(self, i: int, text: str) -> str:
        """A choice's content as the API gives it: the text before its calls when it made calls."""
        return text.removesuffix("\n") if self.calls[i] else text

    def usage(self, spec: CompletionSpec) -> dict[str, int]:
        """Prompt tokens (each prompt once) and the tokens generated for the text of all choices.

        A choice counts its tokens up to the end of its text: the end-of-turn id when it stopped on one,
        the token that completed a stop string when it stopped on that.
        """
        return usage(sum(self.prompt_len[::spec.n]), sum(self.counted))

    def cancel(self) -> None:
        """Stop every choice (a client that went away)."""
        for r in self.requests:
            r.cancel()
