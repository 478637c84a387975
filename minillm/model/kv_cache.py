"""KV caches for incremental decoding: KVCache (one sequence length for the batch) and SlotKVCache (a server's
batch, each slot at its own length). Shapes: B batch, K key/value heads, T new tokens, D head dim."""

from __future__ import annotations

import torch

from minillm.model.config import LMConfig


class KVCache:
    """Preallocated key/value buffers for incremental decoding: one [B, K, max_len, D] pair per layer."""

    def __init__(self, config: LMConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_len = max_len or config.max_position_embeddings
        if max_len > config.max_position_embeddings:
            raise ValueError(f"KV cache length {max_len} exceeds max_position_embeddings "
                             f"({config.max_position_embeddings})")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions already filled

    @staticmethod
    def nbytes(config: LMConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the buffers of such a cache take."""
        per_layer = batch_size * config.num_key_value_heads * max_len * config.head_dim * 2
        return per_layer * config.num_hidden_layers * dtype.itemsize

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> KVCache:
        """An empty cache writing into existing per-layer buffers (e.g. one slot of a SlotKVCache)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.pos = k, v, k[0].shape[2], 0
        return cache

    def rope_index(self, T: int) -> slice:
        """Positions of the next T tokens, as an index into the RoPE tables."""
        return slice(self.pos, self.pos + T)

    def advance(self, T: int) -> None:
        """Count T more filled positions (after every layer has written them)."""
        self.pos += T

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values after the cached ones; return all of them so far."""
        end = self.pos + k_BKTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.pos:end] = k_BKTD
        self.v[layer][:, :, self.pos:end] = v_BKTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class SlotKVCache:
    """KV buffers for a server's batch: B slots, each holding one sequence at its own length.

    A decode step feeds one token for each slot it covers (`rows`: all slots, or only the active ones, so that
    a lone sequence decodes at batch-1 cost). Each slot writes at its own position and attends over its own
    length only, row by row, so a sequence's arithmetic is the same whatever shares the batch; idle slots
    (`active` False) compute nothing in attention and their outputs are ignored. A speculative step feeds T
    tokens a row, each row its own `widths[i]` of them (the rest is padding: computed, never written or kept).
    """

    def __init__(self, config: LMConfig, slots: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, exact: bool = True):
        self.cache = KVCache(config, slots, max_len, device=device, dtype=dtype)
        # exact: attention row by row, each over its own length (a row's bits never depend on its neighbours, as a
        # server promises its clients); else one masked product over the covered rows' longest length (rollouts).
        self.exact = exact
        self.lengths = [0] * slots  # filled positions per slot
        self.active = [False] * slots
        self.rows = list(range(slots))  # the slots the next forward pass covers: batch row i is slot rows[i]
        self.widths: list[int] | None = None  # tokens row i feeds in a multi-token pass (None: every one)

    def cover(self, rows: list[int], widths: list[int] | None = None) -> None:
        """Run the next forward passes over these slots only, in this order; a pass of T tokens a row writes the
        first widths[i] of row i's (all T when widths is None)."""
        if widths is not None and len(widths) != len(rows):
            raise ValueError(f"{len(widths)} widths for {len(rows)} rows")
        self.rows, self.widths = list(rows), None if widths is None else list(widths)

    def slot(self, b: int) -> KVCache:
        """A batch-of-one cache over slot b's buffers, empty, for prefilling a new sequence there."""
        self.lengths[b] = 0
        return KVCache.over([k[b:b + 1] for k in self.cache.k], [v[b:b + 1] for v in self.cache.v])

    def rope_index(self, T: int) -> torch.Tensor:
        """Each slot's positions for its T new tokens, [B, T] (padding past the cache held at its last)."""
        device = self.cache.k[0].device
        start_B1 = torch.tensor([self.lengths[b] for b in self.rows], device=device)[:, None]
        if T == 1:
            return start_B1
        return (start_B1 + torch.arange(T, device=device)).clamp_max(self.cache.max_len - 1)

    def advance(self, T: int) -> None:
        """Count the tokens each covered active slot has just written (its width of the T)."""
        for i, b in enumerate(self.rows):
            self.lengths[b] += self.active[b] * (T if self.widths is None else min(T, self.widths[i]))

    def attend(self, layer: int, q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> torch.Tensor:
        """Write each slot's new key/value at its position; attention output [B, H, T, D] row by row."""
        B, T = q_BHTD.shape[0], q_BHTD.shape[2]
        if B != len(self.rows):
            raise ValueError(f"a batch of {B} rows for a cache that covers {len(self.rows)} slots")
        if T > 1:
            return self._attend_tokens(layer, q_BHTD, k_BKTD, v_BKTD)
        lengths = [self.lengths[b] for b in self.rows]
        if max(lengths) >= self.cache.max_len:
            raise ValueError(f"KV cache is full: a slot needs position {max(lengths)}, "
                             f"{self.cache.max_len} allocated")
        rows = torch.tensor(self.rows, device=q_BHTD.device)
        pos_B = torch.tensor(lengths, device=q_BHTD.device)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        # An index put does not convert (a slice assignment does): under bf16 autocast the keys are bf16.
        k_cache[rows, :, pos_B] = k_BKTD[:, :, 0].to(k_cache.dtype)
        v_cache[rows, :, pos_B] = v_BKTD[:, :, 0].to(v_cache.dtype)
        if not self.exact:
            return self._attend_masked(layer, q_BHTD, pos_B)
        H, D = q_BHTD.shape[1], q_BHTD.shape[3]
        K = k_BKTD.shape[1]
        # The loop below is the cost of exactness: a few small kernels per active row and layer. The scale
        # is applied once for all rows (elementwise, so row-invariant).
        q_BKGD = (q_BHTD * D**-0.5).reshape(B, K, H // K, D)
        y_BHTD = torch.zeros_like(q_BHTD)
        for i, b in enumerate(self.rows):
            if self.active[b]:
                S = self.lengths[b] + 1
                probs_KGS = (q_BKGD[i] @ k_cache[b, :, :S].transpose(-1, -2)).softmax(-1, dtype=torch.float32)
                y_BHTD[i] = (probs_KGS.to(v_cache.dtype) @ v_cache[b, :, :S]).reshape(H, 1, D)
        return y_BHTD

    def _attend_tokens(self, layer: int, q_BHTD: torch.Tensor, k_BKTD: torch.Tensor,
                       v_BKTD: torch.Tensor) -> torch.Tensor:
        """Several tokens a row (a speculative step): row i writes its first w = widths[i] keys and values at
        its length L, and its query t attends causally over positions 0..L + t; padding queries give zeros."""
        if not self.exact:
            raise ValueError("several tokens a row need the exact (row by row) attention")
        B, H, T, D = q_BHTD.shape
        K = k_BKTD.shape[1]
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        q_BKGTD = (q_BHTD * D**-0.5).reshape(B, K, H // K, T, D)
        y_BHTD = torch.zeros_like(q_BHTD)
        for i, b in enumerate(self.rows):
            if not self.active[b]:
                continue
            L, w = self.lengths[b], T if self.widths is None else min(T, self.widths[i])
            if L + w > self.cache.max_len:
                raise ValueError(f"KV cache is full: a slot needs position {L + w - 1}, {self.cache.max_len} allocated")
            k_cache[b, :, L:L + w] = k_BKTD[i, :, :w]
            v_cache[b, :, L:L + w] = v_BKTD[i, :, :w]
            S = L + w
            scores_KGwS = q_BKGTD[i, :, :, :w] @ k_cache[b, :, :S].transpose(-1, -2)[:, None]
            later_wS = torch.arange(S, device=q_BHTD.device)[None, :] > L + torch.arange(w, device=q_BHTD.device)[:, None]
            probs_KGwS = scores_KGwS.masked_fill(later_wS, float("-inf")).softmax(-1, dtype=torch.float32)
            y_BHTD[i, :, :w] = (probs_KGwS.to(v_cache.dtype) @ v_cache[b, :, :S][:, None]).reshape(H, w, D)
        return y_BHTD

    def _attend_masked(self, layer: int, q_BHTD: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """Every covered row at once over the longest covered length, the positions past a row's own masked."""
        B, H, _, D = q_BHTD.shape
        S = int(pos_B.max()) + 1
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        if self.rows == list(range(len(self.rows))):  # the first rows, in order: views, no copy
            k_BKSD, v_BKSD = k_cache[:B, :, :S], v_cache[:B, :, :S]
        else:
            index = torch.tensor(self.rows, device=q_BHTD.device)
            k_BKSD, v_BKSD = k_cache[index, :, :S], v_cache[index, :, :S]
        K = k_BKSD.shape[1]
        q_BKGD = q_BHTD.reshape(B, K, H // K, D)
        scores_BKGS = q_BKGD @ k_BKSD.transpose(-1, -2) * D**-0.5
        past_BS = torch.arange(S, device=q_BHTD.device)[None, :] > pos_B[:, None]
        scores_BKGS = scores_BKGS.masked_fill(past_BS[:, None, None, :], float("-inf"))
        probs_BKGS = scores_BKGS.softmax(-1, dtype=torch.float32).to(v_BKSD.dtype)
        return (probs_BKGS @ v_BKSD).reshape(B, H, 1, D)
