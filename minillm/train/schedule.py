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


# A --max_minutes run without --max_steps times this many steps (after its first, which pays for warm-up work), and
# at least this share of its budget, before it fixes its horizon in steps: steps differ (SFT's length-grouped
# batches: the first five of a 10-minute run took 0.23 s each, the run's mean was 0.61 s) and a few seconds of other
# work on the machine skew a short window (a 10-minute pretraining fixed 597 steps and ended at 380 s).
TIMED_STEPS = 5
TIMED_SHARE = 0.05


class RunSchedule:
    """How long a run lasts and its learning-rate factor per step: a function of the step alone, so that a
    resumed run follows the uninterrupted one exactly. A time budget (--max_minutes) decides when to stop, never
    the rate: with --max_steps the cosine spans those steps; without, the run times its first steps (at least
    TIMED_SHARE of the budget), fixes the horizon (the steps the budget then holds) once, and saves it with every
    checkpoint (TrainState.horizon_steps).
    """

    def __init__(self, total_steps: int, budget_seconds: float, warmup_steps: int, warn: bool = False) -> None:
        self.budget_seconds = budget_seconds
        self.total_steps = total_steps  # 0: none given, the time budget alone ends the run
        self.warmup = warmup_steps
        self.horizon = total_steps  # 0 until a time-budgeted run without --max_steps fixes it
        self._timing: tuple[int, float] | None = None  # (step, seconds) where this process started timing
        self._warn = warn
        if total_steps and warmup_steps >= total_steps:
            self.warmup = total_steps // 10
            if warn:
                print(f"warning: --warmup_steps {warmup_steps} >= the run's {total_steps} steps, so the "
                      f"peak learning rate would never be reached; warming up for {self.warmup} steps instead",
                      file=sys.stderr)

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int, warn: bool) -> RunSchedule:
        """The schedule of a TrainConfig: --max_steps, else --epochs unless --max_minutes (which cycles the data)."""
        budget = cfg.max_minutes * 60
        return cls(cfg.max_steps or (0 if budget else cfg.epochs * steps_per_epoch), budget, cfg.warmup_steps, warn)

    def restore(self, horizon_steps: int) -> None:
        """Take the horizon a resumed run fixed before (0: none yet)."""
        if not self.total_steps and horizon_steps:
            self.horizon = horizon_steps

    def lr_factor(self, step: int) -> float:
        """The peak learning rate's multiplier for step `step` (0-based)."""
        if self.horizon:
            return cosine_lr(step, self.horizon, 1.0, self.warmup)
        return step / self.warmup if step < self.warmup else 1.0  # timing the first steps at the peak

    def observe(self, step: int, seconds: float) -> None:
        """After `step` steps and `seconds` of training: fix the horizon once enough steps are timed."""
        if self.horizon or not self.budget_seconds:
            return
        if self._timing is None:
            self._timing = (step, seconds)
            return
        first, start = self._timing
        if step - first < TIMED_STEPS or step < self.warmup or seconds - start < TIMED_SHARE * self.budget_seconds:
            return
        per_step = (seconds - start) / (step - first)
        left = int((self.budget_seconds - seconds) / per_step) if per_step > 0 else 0
        self.horizon = step + max(1, left)
        if self._warn:
            print(f"note: {per_step:.2f} s per step: the {self.budget_seconds / 60:g}-minute budget holds about "
                  f"{self.horizon} steps; the learning-rate schedule spans them (saved with each checkpoint)",
                  file=sys.stderr)

    def done(self, step: int, seconds: float) -> bool:
        """True once the horizon's steps or the time budget are used up."""
        return bool(self.horizon and step >= self.horizon) or bool(
            self.budget_seconds and seconds >= self.budget_seconds)
