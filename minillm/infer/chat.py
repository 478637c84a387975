"""Talking to a model: streaming text out of token ids (stop strings held back), and a chat history kept within
the context."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import torch

from minillm.data.tokenizer import Tokenizer
from minillm.infer.generation import check_sampling, generate
from minillm.infer.speculative import Sampler, Speculation
from minillm.model.model import MiniLLM

REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode writes for bytes that are not (yet) a whole character


class ContextError(ValueError):
    """A prompt that does not fit in the tokens the context leaves for it."""


class StreamDecoder:
    """Turn token ids into text one id at a time, holding back the bytes of a character not yet complete.

    A byte-level BPE token may end in the middle of a multi-byte UTF-8 character, so decoding tokens one
    by one would print replacement characters. Each push decodes a short window: the ids since the last
    point where the text was settled, after the settled piece before it as context (so that decoders that
    treat the first token specially, such as a leading space, decode the window as they decode the whole).
    The cost per id is constant, not the answer's length, and the pieces join to ``tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._written = 0  # characters of the decoded text already handed out
        self._prefix = 0  # window start: the context ids, already handed out in full
        self._read = 0  # where the window's new ids start
        self._partial = 0  # characters of the new ids' text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; returns the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        context = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        # A trailing replacement character may be the start of a character whose other bytes are still
        # to come; everything before it can no longer change when more bytes are appended.
        pending = text.endswith(REPLACEMENT)
        settled = text[:-1] if pending else text
        piece = settled[len(context) + self._partial:]
        self._partial += len(piece)
        self._written += len(piece)
        if not pending:  # settled: the next window starts after these ids, with them as its context
            self._prefix, self._read, self._partial = self._read, len(self.ids), 0
        return piece

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end decodes as U+FFFD)."""
        text = self.text
        piece = text[self._written:]
        self._written = len(text)
        return piece

    @property
    def text(self) -> str:
        """The whole text of the ids pushed so far."""
        return self._decode(self.ids)


class TextStream:
    """A sequence's tokens as text pieces, cut at the first stop string (which is not part of the text).

    Text that could be the start of a stop string is held back until it is known not to be one, so a
    streamed answer never shows part of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""  # settled text so far (before any stop string)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        """Add one token; the text that can be shown now (possibly empty)."""
        if self.stopped:
            return ""
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, once the sequence has ended."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            longest = max(map(len, self.stop))
            start = max(0, self.sent - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held(self.text)
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        for n in range(min(len(text), max(map(len, self.stop), default=0) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
    """Decode `ids` incrementally; the pieces join to ``tokenizer.decode(ids)``."""
    decoder = StreamDecoder(tokenizer, skip_special_tokens)
    for i in ids:
        piece = decoder.push(i)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


class StreamingAnswer:
    """One generation as an iterator of text pieces; afterwards .text, .token_ids, .seconds, .stopped.

    Stops at the first of `stop_ids` (not part of the text) or after max_new_tokens; `stopped` tells
    which. Sampling arguments are those of minillm.infer.generation.generate.
    """

    def __init__(self, model: MiniLLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, stop_ids: Sequence[int] | None = None,
                 generator: torch.Generator | None = None, compile: bool = False,
                 speculation: Speculation | None = None) -> None:
        self.stop_ids = list(tokenizer.stop_ids if stop_ids is None else stop_ids)
        if speculation is not None:  # a draft proposes, the model checks (speculative.py); never compiled
            if repetition_penalty != 1.0:
                raise ValueError("a repetition penalty does not combine with speculative decoding")
            check_sampling(temperature, top_p)
            sampler = Sampler(temperature, top_k, top_p, generator)
            self._steps = (torch.tensor([t]) for t in speculation.stream(model, list(prompt_ids), max_new_tokens,
                                                                          sampler, self.stop_ids))
        else:
            self._steps = generate(model, list(prompt_ids), max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                   eos_token_id=self.stop_ids, stream=True, generator=generator,
                                   compile=compile)
        self._decoder = StreamDecoder(tokenizer)
        self.generated = 0  # tokens the model produced, the stop token included
        self.stopped = False
        self.seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        t0 = time.perf_counter()
        try:
            for token_B in self._steps:
                token = int(token_B[0])
                self.generated += 1
                if token in self.stop_ids:
                    self.stopped = True
                    break
                piece = self._decoder.push(token)
                if piece:
                    yield piece
            tail = self._decoder.flush()
            if tail:
                yield tail
        finally:
            self.seconds = time.perf_counter() - t0

    @property
    def text(self) -> str:
        """The answer so far, without the stop token."""
        return self._decoder.text

    @property
    def token_ids(self) -> list[int]:
        """The answer's ids so far, without the stop token."""
        return list(self._decoder.ids)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the wall time of the generation (prefill included)."""
        return self.generated / self.seconds if self.seconds > 0 else float("nan")


class ChatSession:
    """A conversation rendered with the ChatML template, trimmed so that the prompt fits `budget` tokens.

    `budget` is what the context leaves for the prompt (max_position_embeddings minus the tokens reserved
    for the answer). When a new user message does not fit, whole turns (a user message and the replies to
    it) are dropped, oldest first; the system message always stays.
    """

    def __init__(self, tokenizer: Tokenizer, budget: int, system: str | None = None,
                 tools: list[dict] | None = None) -> None:
        if budget < 1:
            raise ValueError(f"the prompt budget must be >= 1 token, got {budget}")
        self.tokenizer = tokenizer
        self.budget = budget
        self.system = system
        self.tools = tools or None  # the functions offered (OpenAI schemas), rendered in the system turn
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _head(self) -> list[dict[str, str]]:
        return self.messages[:1] if self.system else []

    def _turns(self) -> list[list[dict[str, str]]]:
        """The messages after the system one, grouped into turns that each start at a user message."""
        turns: list[list[dict[str, str]]] = []
        for m in self.messages[len(self._head()):]:
            if m["role"] == "user" or not turns:
                turns.append([])
            turns[-1].append(m)
        return turns

    def encode(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Prompt ids of `messages` (default: the history) followed by the assistant generation prompt.

        Turns are tokenized as in SFT training (Tokenizer.render_conversation), so the model sees at
        generation the same split it learnt from, and message contents are always plain text.
        """
        messages = self.messages if messages is None else messages
        return self.tokenizer.render_conversation(messages, add_generation_prompt=True, tools=self.tools)[0]

    def add_user(self, content: str) -> int:
        """Append a user message, dropping the oldest turns until the prompt fits; returns how many were dropped.

        Raises ContextError (history unchanged) when the message does not fit even on its own.
        """
        message = {"role": "user", "content": content}
        alone = len(self.encode(self._head() + [message]))
        if alone > self.budget:
            raise ContextError(f"the message is {alone} tokens with the template"
                               f"{' and system prompt' if self.system else ''}, but only {self.budget} "
                               f"fit in the context")
        turns = self._turns() + [[message]]
        dropped = 0
        while len(self.encode(self._head() + [m for t in turns for m in t])) > self.budget:
            turns.pop(0)
            dropped += 1
        self.messages = self._head() + [m for t in turns for m in t]
        return dropped

    def add_assistant(self, content: str) -> None:
        """Append the model's answer."""
        self.messages.append({"role": "assistant", "content": content})

    def add_messages(self, messages: list[dict]) -> None:
        """Append what a tool loop added: the calls, their results and the answer."""
        self.messages += messages

    def prompt_ids(self) -> list[int]:
        """The ids to generate the next answer from."""
        return self.encode()

    def render(self, add_generation_prompt: bool = False) -> str:
        """The history as ChatML text."""
        return self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=add_generation_prompt,
                                                  tools=self.tools)
