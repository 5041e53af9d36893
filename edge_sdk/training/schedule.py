"""Learning-rate schedule: linear warmup, then cosine decay to a floor (Loshchilov & Hutter 2017).

A pure function of the step, so a resumed run needs nothing but the step count.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    Warmup ramps linearly from base_lr/warmup (step 0) to base_lr (step warmup-1); the remaining
    steps follow half a cosine from base_lr down to min_ratio * base_lr at the last step.
    """
    if total <= 0:
        raise ValueError(f"`total` should be a positive integer, got {total}")
    if not 0 <= step < total:
        raise ValueError(f"`step` should be in [0, {total}), got {step}")
    if warmup < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"bad schedule: warmup={warmup}, min_ratio={min_ratio}")
    warmup = min(warmup, total)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = total - warmup
    if decay_steps <= 1:
        return base_lr
    progress = (step - warmup) / (decay_steps - 1)  # 0 .. 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_ratio + (1.0 - min_ratio) * cosine)
