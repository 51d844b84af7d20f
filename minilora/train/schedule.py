"""The learning-rate schedule: a pure function of the optimizer step.

With W warmup steps, T total steps, base rate η and floor ratio m, step s
(0-based, the number of optimizer steps already taken) uses

    warmup   s < W:   η · (s + 1) / W
    then     p = (s − W) / max(1, T − W)                     progress in [0, 1)
             linear:   η · (m + (1 − m) · (1 − p))
             cosine:   η · (m + (1 − m) · ½ · (1 + cos(π p)))   (Loshchilov & Hutter, SGDR, eq. 5)
             constant: η

Warmup (Goyal et al., 2017) keeps the first updates small while Adam's moment
estimates are still noise. Being a pure function, the schedule needs no state to
save: a resumed run recomputes the rate from the step.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant")


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "linear",
    min_lr_ratio: float = 0.0,
) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Explicit warmup steps win; otherwise a fraction of the run, rounded up."""
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)
