"""The learning-rate schedule: linear warmup, then cosine decay to a floor of lr / 10."""

from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, lr: float, warmup_steps: int = 0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Steps 0..warmup_steps rise linearly from 0 to lr; the cosine then starts at exactly lr and reaches
    exactly lr / 10 at the last step (total_steps - 1). The result never leaves [lr / 10, lr] after warmup.
    """
    min_lr = lr / 10
    if step < warmup_steps:
        return lr * step / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
