"""Token masking. One convention everywhere: a boolean mask of shape (B, N), ``True`` = masked (hidden).

Random masking follows MAE: per-sample ``noise ~ U(0, 1)``, ``ids_shuffle = argsort(noise)`` (the
smallest noise is kept), ``ids_restore = argsort(ids_shuffle)``, keep ``ids_shuffle[:, :len_keep]``.
Callers may pass their own ``noise`` so a test can fix the mask exactly.
"""

from __future__ import annotations

import math
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


def to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU-made mask to ``device`` without a host sync: from pinned memory, non-blocking, on CUDA.

    A plain ``.to(cuda)`` of pageable memory waits for the copy, so the host could no longer run ahead of the
    GPU while it builds the next step (ConMIM's block masks take ~30 ms of CPU per batch of 128).
    """
    if device.type != "cuda" or t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.to(device)  # under torch.compile the copy is traced as a plain transfer (no pinning in a graph)
    return t.pin_memory().to(device, non_blocking=True)


def draw_noise(batch: int, num_tokens: int, device: torch.device, noise: Tensor | None = None) -> Tensor:
    """The caller's ``noise`` when given (shape-checked), else fresh U(0, 1) noise from the global RNG."""
    if noise is None:
        return torch.rand(batch, num_tokens, device=device)
    if tuple(noise.shape) != (batch, num_tokens):
        raise ValueError(f"noise must have shape {(batch, num_tokens)}, got {tuple(noise.shape)}")
    return noise.to(device)


@torch.compiler.disable  # a Python loop of scalar draws: torch.compile must not trace it
def block_mask(batch: int, grid: int, num_masking: int, *, min_patches: int = 16, max_patches: int | None = None,
               min_aspect: float = 0.3, generator: torch.Generator | None = None) -> Tensor:
    """BEiT's block-wise mask generator (``MaskingGenerator``), one (grid, grid) mask per sample -> (B, N) bool.

    Repeatedly places a rectangle of area ~U(min_patches, remaining) and aspect ratio log-uniform in
    [min_aspect, 1 / min_aspect] at a uniform position, accepting it when it adds between 1 and ``remaining``
    new patches (10 tries per rectangle), until ``num_masking`` patches are masked or no rectangle fits.
    Draws from torch's RNG (``generator`` or the global CPU one) so the trainer's per-step seed fixes it.
    """
    if not 0 < num_masking <= grid * grid:
        raise ValueError(f"num_masking must be in [1, {grid * grid}], got {num_masking}")
    max_patches = num_masking if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def u(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=generator))

    def randint(lo: int, hi: int) -> int:  # inclusive, like random.randint
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    out = torch.zeros(batch, grid, grid, dtype=torch.bool)
    for s in range(batch):
        mask = out[s]
        count = 0
        while count < num_masking:
            remaining = min(num_masking - count, max_patches)
            delta = 0
            for _ in range(10):
                area = u(min_patches, remaining)
                aspect = math.exp(u(*log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < grid and h < grid:
                    top, left = randint(0, grid - h), randint(0, grid - w)
                    window = mask[top:top + h, left:left + w]
                    new = h * w - int(window.sum())
                    if 0 < new <= remaining:
                        window.fill_(True)
                        delta = new
                    if delta > 0:
                        break
            if delta == 0:
                break
            count += delta
    return out.reshape(batch, grid * grid)


@torch.compiler.disable  # host-side mask drawing, not part of the compiled graph
def random_block_mask(batch: int, grid: int, block: int, mask_ratio: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """Random masking of ``block`` x ``block``-patch squares (ConMIM ViT-L: 32-px blocks of 16-px patches).

    ``ceil(cells * mask_ratio)`` of the (grid / block)^2 cells are masked per sample (ConMIM's ``MaskGenerator``:
    ``int(np.ceil(token_count * mask_ratio))``) -> (B, N) bool.
    """
    if grid % block:
        raise ValueError(f"patch grid {grid} is not divisible by the mask block {block}")
    cells = grid // block
    n_mask = math.ceil(cells * cells * mask_ratio)
    order = torch.argsort(torch.rand(batch, cells * cells, generator=generator), dim=1)
    coarse = torch.zeros(batch, cells * cells, dtype=torch.bool).scatter_(1, order[:, :n_mask], True)
    fine = coarse.view(batch, cells, 1, cells, 1).expand(batch, cells, block, cells, block)
    return fine.reshape(batch, grid * grid)
