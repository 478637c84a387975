import math

import pytest

from minillm.train.schedule import cosine_lr


def test_warmup_then_cosine_to_a_tenth():
    lr, total, warm = 1e-3, 101, 10
    assert cosine_lr(0, total, lr, warm) == 0.0
    assert cosine_lr(5, total, lr, warm) == pytest.approx(5e-4)
    assert cosine_lr(warm, total, lr, warm) == lr  # the cosine starts at exactly lr
    mid = warm + (total - 1 - warm) // 2  # progress 0.5 -> halfway between lr and lr/10
    assert cosine_lr(mid, total, lr, warm) == pytest.approx((lr + lr / 10) / 2)
    assert cosine_lr(total - 1, total, lr, warm) == pytest.approx(lr / 10, rel=1e-12)
    values = [cosine_lr(s, total, lr, warm) for s in range(warm, total + 5)]
    assert all(lr / 10 - 1e-15 <= v <= lr for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup_and_degenerate_lengths():
    assert cosine_lr(0, 50, 2.0) == 2.0
    assert cosine_lr(49, 50, 2.0) == pytest.approx(0.2)
    assert cosine_lr(0, 1, 2.0) == 2.0
    quarter = cosine_lr(1, 5, 1.0)  # progress 1/4
    assert quarter == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
