"""The learning-rate schedule: linear warmup, then cosine decay to a floor of lr / 10, over steps or over time."""

from __future__ import annotations

import math
import sys

from minillm.train.config import TrainConfig


def cosine_decay(progress: float, lr: float) -> float:
    """The cosine from lr at progress 0 down to lr / 10 at progress 1 (clamped to [0, 1])."""
    min_lr = lr / 10
    progress = min(1.0, max(0.0, progress))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def cosine_lr(step: int, total_steps: int, lr: float, warmup_steps: int = 0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Steps 0..warmup_steps rise linearly from 0 to lr; the cosine then starts at exactly lr and reaches
    exactly lr / 10 at the last step (total_steps - 1). The result never leaves [lr / 10, lr] after warmup.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    return cosine_decay((step - warmup_steps) / decay_steps, lr)


def timed_lr(step: int, seconds: float, budget_seconds: float, lr: float, warmup_steps: int = 0) -> float:
    """Learning rate for a run with a time budget: the cosine follows the elapsed fraction of the budget.

    `seconds` is the training time spent before this step. The first warmup_steps steps are also scaled
    by step / warmup_steps, so the rate rises from 0 as it does in cosine_lr.
    """
    decayed = cosine_decay(seconds / budget_seconds, lr)
    return decayed * step / warmup_steps if step < warmup_steps else decayed


class RunSchedule:
    """How long a run lasts (steps, or training time with --max_minutes) and its learning-rate factor per step."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, warn: bool) -> None:
        self.budget_seconds = cfg.max_minutes * 60
        # With a time budget, epochs do not bound the run (it cycles the data); --max_steps still does.
        self.total_steps = cfg.max_steps or (0 if self.budget_seconds else cfg.epochs * steps_per_epoch)
        self.warmup = cfg.warmup_steps
        if self.total_steps and not self.budget_seconds and self.warmup >= self.total_steps:
            self.warmup = self.total_steps // 10
            if warn:
                print(f"warning: --warmup_steps {cfg.warmup_steps} >= the run's {self.total_steps} steps, so the "
                      f"peak learning rate would never be reached; warming up for {self.warmup} steps instead",
                      file=sys.stderr)

    def lr_factor(self, step: int, seconds: float) -> float:
        """The peak learning rate's multiplier for step `step` (0-based), after `seconds` of training."""
        if self.budget_seconds:
            return timed_lr(step, seconds, self.budget_seconds, 1.0, self.warmup)
        return cosine_lr(step, self.total_steps, 1.0, self.warmup)

    def done(self, step: int, seconds: float) -> bool:
        """True once `step` steps or the time budget are used up."""
        return bool(self.total_steps and step >= self.total_steps) or bool(
            self.budget_seconds and seconds >= self.budget_seconds)
