"""Copy blocks: a pretraining curriculum that teaches a small model to copy a span from its context.

Quoting a tool's result, putting a requested word into a poem and copying a title into a call all need the
induction-head ability: having seen "A B ... A", predict "B". A 4.6M model pretrained on 2.1M tokens of poetry
does not learn it (bench/copy_probe.py: it predicts a span written a second time no better than the first), since
a corpus of short poems rarely rewards it. A copy block makes copying the only way to lower the loss: the tokens
of a real block, shuffled (so no n-gram statistic predicts them), cut into spans that are each written twice,
with a few other shuffled tokens between the two copies. Only the second copy is learned, from its second
token on (where the copy starts is unknowable); the first copies and the filler carry no loss.

Each block is a pure function of the block's tokens and its index, so a resumed run sees the same blocks.
"""

from __future__ import annotations

import numpy as np

SPAN_MIN, SPAN_MAX = 4, 16
"""Lengths of a copied span, inclusive: short (a word, a title) to long (a line with its punctuation)."""
GAP_MAX = 8
"""At most this many filler tokens between a span and its copy, so the copy is not always adjacent."""


def copy_block(tokens: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy block as long as ``tokens``, built from them: (ids, mask), mask 1 where the label is learned.

    ``mask[t]`` says whether predicting ``ids[t]`` from ``ids[:t]`` is learned, so a training example is
    ``ids[:-1]`` -> ``ids[1:]`` with loss mask ``mask[1:]``.
    """
    rng = np.random.default_rng([0x636F7079, index])  # "copy"
    pool = rng.permutation(np.asarray(tokens))
    n = len(pool)
    ids, mask = np.empty(n, dtype=pool.dtype), np.zeros(n, dtype=np.float32)
    t = p = 0
    while t < n:
        span = pool[p % n: p % n + int(rng.integers(SPAN_MIN, SPAN_MAX + 1))]
        gap = pool[(p + len(span)) % n: (p + len(span)) % n + int(rng.integers(0, GAP_MAX + 1))]
        p += len(span) + len(gap)
        pieces = (span, gap, span)
        for k, piece in enumerate(pieces):
            take = min(len(piece), n - t)
            ids[t:t + take] = piece[:take]
            if k == 2 and take > 1:
                mask[t + 1:t + take] = 1.0
            t += take
    return ids, mask
