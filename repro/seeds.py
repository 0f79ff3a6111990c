"""Every seed derived from a run's seed, in one place: randomness is a pure function of (seed, position), which is
what makes resumed runs bit-identical and results independent of worker counts."""

from __future__ import annotations

_STRIDE = 1_000_003  # a prime larger than any epoch or step count a run reaches


def epoch_seed(seed: int, epoch: int) -> int:
    """The data order of epoch ``epoch`` (pre-training's StepSampler, the fine-tune's batches)."""
    return seed * _STRIDE + epoch


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global torch RNG at the start of optimizer step ``step`` on ``rank`` (masks, noise, augmentation)."""
    return (seed * _STRIDE + step) * 1009 + rank


def image_seed(seed: int, step: int, position: int) -> int:
    """The crops of the image at global ``position`` of step ``step``'s batch (streamed data, any worker)."""
    return ((seed * _STRIDE + step) * 4099 + position) % (2**63 - 1)
