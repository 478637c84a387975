"""The batched engine: several prompts, n sampled completions each, decoded together (GRPO's rollouts).

Each prompt is read once, into the first of its n rows of a SlotKVCache, and its keys and values are copied into
the other n - 1 rows, so that a group's prefill costs one prompt, not n. Then one decode step samples a token for
every unfinished row of every prompt at once; rows that end (a stop id, their token budget) leave the batch once a
quarter of the rows it covers are done (the live rows' caches move to the first slots, so that every step reads
contiguous buffers), and the last long completions do not carry the finished ones. The model samples in eval mode
(no dropout) and gets its own mode back.
Attention is one masked product over the rows (SlotKVCache(exact=False)): a row's tokens may differ in the last
bits from decoding it alone, which sampling does not care about; serve.py keeps the exact row-by-row path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minillm.infer.generation import next_token
from minillm.model.kv_cache import SlotKVCache
from minillm.model.model import MiniLLM


def sample_groups(model: MiniLLM, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int,
                  temperature: float = 1.0, stop_ids: Sequence[int] = (), top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
    """n completions of each prompt, prompt by prompt (row i * n + j is prompt i's j-th), each cut after its first
    stop id, which it keeps; at most max_new_tokens each, and never past the model's context."""
    was_training = model.training
    model.eval()
    try:
        return _sample(model, prompts, n, max_new_tokens, temperature, stop_ids, top_k, top_p, generator)
    finally:
        model.train(was_training)


@torch.inference_mode()
def _sample(model: MiniLLM, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float,
            stop_ids: Sequence[int], top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> list[list[int]]:
    if not prompts or n < 1 or max_new_tokens < 1 or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_groups needs prompts of at least one token, n >= 1 and max_new_tokens >= 1")
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the context of {limit} positions")
    param = next(model.parameters())
    rows = len(prompts) * n
    cache = SlotKVCache(model.config, rows, min(longest + max_new_tokens, limit), device=param.device,
                        dtype=param.dtype, exact=False)
    budget = [min(max_new_tokens, limit - len(p)) for p in prompts for _ in range(n)]
    first = []
    for i, prompt in enumerate(prompts):  # read once, copied into the group's other rows
        top = i * n
        logits_1V = model(torch.tensor([list(prompt)], device=param.device), kv_cache=cache.slot(top),
                          logits_to_keep=1).logits[:, -1]
        for k, v in zip(cache.cache.k, cache.cache.v):
            k[top + 1:top + n, :, :len(prompt)] = k[top, :, :len(prompt)]
            v[top + 1:top + n, :, :len(prompt)] = v[top, :, :len(prompt)]
        for row in range(top, top + n):
            cache.lengths[row], cache.active[row] = len(prompt), True
        first.append(logits_1V.expand(n, -1))
    logits_BV = torch.cat(first)
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(rows)]
    slot_rows = list(range(rows))  # the completion each slot holds; slots [0, len) are the ones a step covers
    live = list(range(rows))  # slots whose completion goes on
    while True:
        tokens = next_token(logits_BV[live], temperature, top_k, top_p, generator).tolist()
        still = []
        for slot, token in zip(live, tokens):
            row = slot_rows[slot]
            out[row].append(token)
            if token in stops or len(out[row]) >= budget[row]:
                cache.active[slot] = False  # its length stays; what a covered dead slot writes is never read
            else:
                still.append(slot)
        live = still
        if not live:
            return out
        if len(live) <= 0.75 * len(slot_rows):  # move the live rows to the first slots: later steps cover fewer
            slot_rows = _compact(cache, live, slot_rows)
            live = list(range(len(slot_rows)))
        cache.cover(list(range(len(slot_rows))))
        feed_B1 = torch.tensor([[out[row][-1]] for row in slot_rows], device=param.device)
        logits_BV = model(feed_B1, kv_cache=cache).logits[:, -1]


def _compact(cache: SlotKVCache, live: list[int], slot_rows: list[int]) -> list[int]:
    """Copy the live slots' keys, values, lengths to slots 0, 1, ... (in order, so no source is overwritten before
    it is read); returns the completion each new slot holds."""
    for new, old in enumerate(live):
        if new != old:
            n = cache.lengths[old]
            for k, v in zip(cache.cache.k, cache.cache.v):
                k[new, :, :n] = k[old, :, :n]
                v[new, :, :n] = v[old, :, :n]
        cache.lengths[new], cache.active[new] = cache.lengths[old], True
    return [slot_rows[old] for old in live]
