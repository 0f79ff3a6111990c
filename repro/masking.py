"""Token masking. One convention everywhere: a boolean mask of shape (B, N), ``True`` = masked (hidden).

Random masking follows MAE: per-sample ``noise ~ U(0, 1)``, ``ids_shuffle = argsort(noise)`` (the
smallest noise is kept), ``ids_restore = argsort(ids_shuffle)``, keep ``ids_shuffle[:, :len_keep]``.
Callers may pass their own ``noise`` so a test can fix the mask exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RandomMask(NamedTuple):
    ids_shuffle: Tensor
    """(B, N) token order; the first ``len_keep`` are kept."""
    ids_restore: Tensor
    """(B, N) inverse permutation of ``ids_shuffle`` (MAE's unshuffle)."""
    ids_keep: Tensor
    """(B, K) indices of the kept tokens, in ``ids_shuffle`` order."""
    mask: Tensor
    """(B, N) bool, True = masked."""


def len_keep_mae(num_tokens: int, mask_ratio: float) -> int:
    """MAE: ``int(L * (1 - mask_ratio))`` (truncation, as in ``models_mae.random_masking``)."""
    _check_ratio(mask_ratio)
    return int(num_tokens * (1 - mask_ratio))


def len_keep_even(num_tokens: int, mask_ratio: float) -> int:
    """MiCL: the kept count rounded down to an even number so the two disjoint views have equal length.

    r = 0.9 at N = 196 gives 18 (two views of 9), 0.8 gives 38, 0.75 gives 48.
    """
    return len_keep_mae(num_tokens, mask_ratio) // 2 * 2


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def random_masking(noise: Tensor, len_keep: int) -> RandomMask:
    """Noise-argsort random masking over (B, N) ``noise``; keeps ``len_keep`` tokens per sample."""
    if noise.dim() != 2:
        raise ValueError(f"noise must be (B, N), got shape {tuple(noise.shape)}")
    b, n = noise.shape
    if not 0 < len_keep <= n:
        raise ValueError(f"len_keep must be in [1, {n}], got {len_keep}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(b, n, dtype=torch.bool, device=noise.device).scatter_(1, ids_keep, False)
    return RandomMask(ids_shuffle, ids_restore, ids_keep, mask)


def draw_noise(batch: int, num_tokens: int, device: torch.device, noise: Tensor | None = None) -> Tensor:
    """The caller's ``noise`` when given (shape-checked), else fresh U(0, 1) noise from the global RNG."""
    if noise is None:
        return torch.rand(batch, num_tokens, device=device)
    if tuple(noise.shape) != (batch, num_tokens):
        raise ValueError(f"noise must have shape {(batch, num_tokens)}, got {tuple(noise.shape)}")
    return noise.to(device)
