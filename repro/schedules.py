"""The learning-rate shape every optimisation here uses: linear warmup from 0, then a half-cycle cosine (MAE's
``adjust_learning_rate``; pre-training in ``repro.trainer``, the linear probe in ``evals.linear``; the fine-tune
uses timm's scheduler, which computes the same curve per epoch fraction)."""

from __future__ import annotations

import math


def cosine_after_warmup(step: int, warmup: int, peak: float, progress: float, floor: float = 0.0) -> float:
    """``peak * step / warmup`` during the ``warmup`` steps, then ``floor + (peak - floor) * (1 + cos(pi *
    progress)) / 2`` with ``progress`` in [0, 1] counted from the end of the warmup."""
    if step < warmup:
        return peak * step / warmup
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
