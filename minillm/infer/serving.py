"""Continuous batching: sequences in, tokens out, many sequences sharing each decode step.

A `Scheduler` owns the model on one background thread. Between decode steps it retires finished or
cancelled sequences and admits waiting ones: each is prefilled alone (a batch of one) into a free slot
of a `SlotKVCache` and then joins the running batch, where every slot decodes at its own position.
A prompt longer than `prefill_chunk` tokens is prefilled a chunk per step, so the running sequences
keep getting tokens while it is read instead of waiting for the whole prompt.

A decode step covers the active slots only (a lone sequence costs a batch-1 step), or every slot where the
machine's matrix products give a row other bits at other row counts (model/linear.py rows_independent), so that a
sequence's tokens never depend on what shares its step; attention runs row by row over each slot's own length. With a `Speculation` (serve.py --draft_model or --prompt_lookup), every step is a
speculative round for each sequence that can draft: its own drafter proposes up to K tokens, and the one batched
forward pass feeds each row its last token and its drafts (a row without drafts feeds one token), so each
sequence's drafts are checked with its own acceptance (infer/speculative.py): greedy text unchanged, sampled text
in the same distribution. A row's rejections move only its own slot back; the others pay the wider step only.

minillm/infer/chat.py's `TextStream` turns a sequence's tokens into text pieces and applies stop strings.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minillm.device import available_memory
from minillm.infer.generation import next_token
from minillm.infer.speculative import Proposal, Sampler, Speculation, judge
from minillm.model.kv_cache import KVCache, SlotKVCache
from minillm.model.linear import rows_independent as linear_rows_independent
from minillm.model.model import MiniLLM


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens."""

    temperature: float = 1.0
    """0 is greedy; otherwise logits are divided by it before sampling."""
    top_p: float | None = None
    """Nucleus sampling threshold in (0, 1]; None or 1 samples from the whole distribution."""
    seed: int | None = None
    """Seed of this sequence's own random generator; None draws a fresh one."""

    @property
    def nucleus(self) -> float | None:
        """top_p when it cuts anything (below 1), else None."""
        return self.top_p if self.top_p is not None and self.top_p < 1 else None


class QueueFull(Exception):
    """More sequences are waiting than the scheduler accepts; the client should retry later."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new sequences."""


class GenerationRequest:
    """One sequence to generate (one choice of an API request), and what happened to it.

    `emit(token)` is called on the scheduler thread for every generated token that is not a stop id, and
    `emit(None)` once at the end, after `finish_reason` ("stop", "length", "cancelled" or "error") is set.
    """

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling,
                 stop_ids: Sequence[int], emit: Callable[[int | None], None], forced: Sequence[int] = (),
                 banned: Sequence[int] = (), constraint=None) -> None:
        if not prompt_ids:
            raise ValueError("a request needs a prompt of at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop_ids = frozenset(stop_ids)
        self.emit = emit
        self.forced = list(forced)  # the first tokens, whatever the logits (a call tool_choice forces)
        self.banned = list(banned)  # tokens never picked (the call marker under tool_choice "none")
        self.constraint = constraint  # a grammar's state (minillm/infer/constrain.py): masks, then advances
        self.picked = 0
        self.generator: torch.Generator | None = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed)
        self.generated = 0  # tokens the model produced, a final stop id included
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.last_token = -1
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.tokens: list[int] = []  # the tokens generated so far (a speculative round's drafter reads them)
        self.drafter = None  # its speculative drafter, made at its first round
        self.speculating = True  # False once its drafter failed: it decodes plainly to its end
        self.prefill_cache: KVCache | None = None  # the slot's cache while the prompt is read

    def cancel(self) -> None:
        """Ask the scheduler to stop this sequence; its slot is freed at the next step."""
        self.cancelled = True

    def sampler(self) -> Sampler:
        """Its sampling settings and generator as speculative decoding's Sampler (drafter and judge)."""
        return Sampler(self.sampling.temperature, None, self.sampling.nucleus, self.generator)

    def pick(self, logits_1V: torch.Tensor) -> int:
        """The next token from this sequence's logits, with its own sampling settings and generator."""
        self.picked += 1
        if self.picked <= len(self.forced):
            return self.forced[self.picked - 1]
        if self.banned:
            logits_1V = logits_1V.clone()
            logits_1V[:, self.banned] = float("-inf")
        if self.constraint is not None:
            logits_1V = self.constraint.mask(logits_1V)
        s = self.sampling
        token = int(next_token(logits_1V.float(), s.temperature, None, s.nucleus, self.generator)[0])
        if self.constraint is not None:
            self.constraint.advance(token)
        return token


class Scheduler:
    """Runs `model` on a background thread, batching up to `max_batch` sequences per decode step."""

    def __init__(self, model: MiniLLM, max_batch: int, context: int, max_waiting: int = 256,
                 prefill_chunk: int = 256, speculation: Speculation | None = None,
                 rows_independent: bool | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: whole prompts), got {prefill_chunk}")
        if not 2 <= context <= model.config.max_position_embeddings:
            raise ValueError(f"context must be in [2, {model.config.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {context}")
        param = next(model.parameters())
        need, have = KVCache.nbytes(model.config, max_batch, context, param.dtype), available_memory(param.device)
        if have is not None and need > have:
            raise ValueError(f"max_batch {max_batch} x context {context} needs a KV cache of {need / 2**30:.1f} GiB; "
                             f"{have / 2**30:.1f} GiB are available: lower --max_batch or --context")
        self.model = model.eval()
        self.device = param.device
        self.max_batch, self.context, self.max_waiting = max_batch, context, max_waiting
        self.prefill_chunk = prefill_chunk or context  # prompt tokens read per step, at most (one chunk at least)
        self.cache = SlotKVCache(model.config, max_batch, context, device=param.device, dtype=param.dtype)
        self.slots: list[GenerationRequest | None] = [None] * max_batch
        self.waiting: deque[GenerationRequest] = deque()
        self.wakeup = threading.Condition()
        self.stopping = False
        self.finished: Counter[str] = Counter()  # sequences ended, by finish reason
        self.max_running = 0  # most sequences that shared one decode step
        self.speculation = speculation  # every sequence's speculative rounds (None: plain decode steps)
        # Where the products' bits depend on how many rows they multiply (MKL on Intel CPUs), every step feeds all
        # max_batch slots, so that a sequence gets the same tokens alone and beside others; elsewhere a step feeds
        # the active slots only, and a lone sequence costs a batch-1 step. None: ask the model's linear layers.
        self.rows_independent = (rows_independent if rows_independent is not None else
                                 max_batch == 1 or linear_rows_independent(model, max_batch))
        self.thread = threading.Thread(target=self._run, name="minillm-scheduler", daemon=True)

    # --- the client side (any thread) -----------------------------------------------------------------
    def start(self) -> Scheduler:
        """Start the background thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Finish the thread; sequences still running or waiting end as cancelled."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue sequences (all or none); QueueFull when the waiting line would exceed max_waiting."""
        for r in requests:
            if len(r.prompt_ids) + r.max_tokens > self.context:
                raise ValueError(f"{len(r.prompt_ids)} prompt tokens + max_tokens {r.max_tokens} exceed the "
                                 f"context of {self.context}")
        with self.wakeup:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(requests) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} sequences are already waiting (limit {self.max_waiting})")
            self.waiting.extend(requests)
            self.wakeup.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequence counts."""
        with self.wakeup:
            return sum(s is not None for s in self.slots), len(self.waiting)

    # --- the scheduler thread -------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wakeup:
                    while not self.stopping and not self.waiting and not any(self.slots):
                        self.wakeup.wait()
                    if self.stopping:
                        break
                try:
                    self.step()
                except Exception as e:  # a failed batch forward fails the sequences in it, not the server
                    for b, r in enumerate(self.slots):
                        if r is not None:
                            self._fail(b, e)
        for b, r in enumerate(self.slots):
            if r is not None:
                self._finish(b, "cancelled")
        with self.wakeup:
            waiting, self.waiting = list(self.waiting), deque()
        for r in waiting:
            r.finish_reason = "cancelled"
            r.emit(None)

    def step(self) -> None:
        """Retire cancelled sequences, admit waiting ones, read up to prefill_chunk prompt tokens, then one
        decode step for all slots."""
        for b, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._finish(b, "cancelled")
        for b in range(self.max_batch):
            if self.slots[b] is None:
                r = self._next_waiting()
                if r is None:
                    break
                self.slots[b] = r
                r.prefill_cache = self.cache.slot(b)  # an empty cache over the slot's buffers, length 0
        budget = self.prefill_chunk
        for b, r in enumerate(self.slots):
            if r is not None and r.prefill_cache is not None:
                n = min(len(r.prompt_ids) - r.prefilled, self.prefill_chunk)  # the first chunk always fits
                if n > budget:
                    break  # this chunk waits for the next step
                budget -= n
                self._confined(b, r, lambda b=b, r=r, n=n: self._prefill(b, r, n))
        if not any(self.cache.active):
            return
        active = [b for b, on in enumerate(self.cache.active) if on]
        self.max_running = max(self.max_running, len(active))
        rows = active if self.rows_independent else list(range(self.max_batch))  # idle rows: computed, ignored
        drafts = {b: p for b in active if (p := self._propose(b)) is not None} if self.speculation else {}
        widths = [1 + len(drafts[b].tokens) if b in drafts else 1 for b in rows]
        self.cache.cover(rows, widths)
        # Each row feeds its last token and its drafts, padded (with its last token) to the widest row.
        feed = [[self.slots[b].last_token if self.cache.active[b] else 0, *(drafts[b].tokens if b in drafts else ())]
                for b in rows]
        tokens_BT = torch.tensor([f + f[:1] * (max(widths) - len(f)) for f in feed], device=self.device)
        logits_BTV = self.model(tokens_BT, kv_cache=self.cache).logits
        for i, b in enumerate(rows):
            r = self.slots[b]
            if not self.cache.active[b]:
                continue
            if b in drafts:
                self._confined(b, r, lambda b=b, r=r, i=i: self._settle(b, r, logits_BTV[i], drafts[b]))
            else:
                self._confined(b, r, lambda b=b, r=r, i=i: self._deliver(b, r.pick(logits_BTV[i, :1])))

    def _propose(self, b: int) -> Proposal | None:
        """Slot b's drafts for this step; None (it feeds one token) when it is constrained or forced, has no room
        or no proposal, or its drafter failed (then it stops speculating)."""
        r = self.slots[b]
        if not r.speculating or r.constraint is not None or r.banned or r.picked < len(r.forced):
            return None
        ids = [*r.prompt_ids, *r.tokens]  # the slot holds all but the last one
        k = min(self.speculation.num_draft_tokens, r.max_tokens - r.generated - 1, self.context - len(ids))
        if k <= 0:
            return None
        try:
            r.drafter = r.drafter or self.speculation.drafter(self.context, r.sampler())
            proposal = r.drafter.propose(ids, k)
        except Exception:  # a failing draft costs its sequence the speculation, never the sequence or the batch
            r.speculating = False
            return None
        proposal.tokens = proposal.tokens[:k]
        return proposal if proposal.tokens else None

    def _settle(self, b: int, r: GenerationRequest, logits_TV: torch.Tensor, proposal: Proposal) -> None:
        """Judge slot b's drafts by its own rule, move its length back past the rejected ones, deliver."""
        k = len(proposal.tokens)
        kept, following = judge(logits_TV[:k + 1].float(), proposal, r.sampler())
        self.cache.lengths[b] -= k - kept  # the step counted all k + 1 fed tokens
        r.drafter.keep(self.cache.lengths[b])
        stats = self.speculation.stats
        stats.rounds, stats.proposed, stats.accepted = stats.rounds + 1, stats.proposed + k, stats.accepted + kept
        self._deliver_all(b, r, [*proposal.tokens[:kept], following])

    def _deliver_all(self, b: int, r: GenerationRequest, tokens: list[int]) -> None:
        for token in tokens:
            self._deliver(b, token)
            if self.slots[b] is not r:  # it stopped (a stop id, max_tokens)
                return

    def _confined(self, b: int, r: GenerationRequest, work: Callable[[], None]) -> None:
        """Run one sequence's own work (prefill, sampling, delivery); if it fails, only that sequence ends."""
        try:
            work()
        except Exception as e:
            if self.slots[b] is r:
                self._fail(b, e)

    def _fail(self, b: int, e: Exception) -> None:
        self.slots[b].error = f"{type(e).__name__}: {e}"
        self._finish(b, "error")

    def _next_waiting(self) -> GenerationRequest | None:
        with self.wakeup:
            while self.waiting:
                r = self.waiting.popleft()
                if not r.cancelled:
                    return r
                self.finished["cancelled"] += 1
                r.finish_reason = "cancelled"
                r.emit(None)
        return None

    def _prefill(self, b: int, r: GenerationRequest, n: int) -> None:
        """Run the next n prompt tokens alone into slot b; after the last ones, deliver the first new token."""
        chunk_1T = torch.tensor([r.prompt_ids[r.prefilled:r.prefilled + n]], device=self.device)
        logits_1V = self.model(chunk_1T, kv_cache=r.prefill_cache, logits_to_keep=1).logits[:, -1]
        r.prefilled += n
        # Until it is active, decode steps leave the slot out (SlotKVCache.cover).
        self.cache.lengths[b] = r.prefilled
        if r.prefilled == len(r.prompt_ids):
            r.prefill_cache = None
            self.cache.active[b] = True
            self._deliver(b, r.pick(logits_1V))

    def _deliver(self, b: int, token: int) -> None:
        r = self.slots[b]
        r.generated += 1
        r.last_token = token
        r.tokens.append(token)
        if token in r.stop_ids:
            self._finish(b, "stop")
            return
        r.emit(token)
        if r.generated >= r.max_tokens:
            self._finish(b, "length")

    def _finish(self, b: int, reason: str) -> None:
        r = self.slots[b]
        self.slots[b] = None
        self.cache.active[b] = False
        self.cache.lengths[b] = 0
        self.finished[reason] += 1
        r.finish_reason = reason
        r.emit(None)
