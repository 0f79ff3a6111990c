"""Loss functions: pure functions of tensors, each documented with the sentence or code it implements.

Shapes: B batch, N tokens, D width, P = p*p*3 pixels per patch.

Precision: every loss runs with autocast off and upcasts half-precision inputs to fp32 first
(:func:`full_precision`). Under bf16 autocast a matmul runs in bf16 even when its inputs were cast to fp32,
which would round MiCL's top logit (~14.3) to steps of 1/16 (METHODS.md, "Numerics"). float64 inputs stay
float64, so a float64 run (the cross-machine golden tests) is float64 end to end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

_F = TypeVar("_F", bound=Callable[..., Tensor])


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 if it is a half-precision tensor, else unchanged (fp32 and fp64 are kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def full_precision(fn: _F) -> _F:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def tsp_similarity(cos: Tensor, kappa: float, temperature: float) -> Tensor:
    """MiCL's t-distributed spherical similarity, ``0.5 (1 + c) / (1 + kappa (1 - c)) / T``.

    Maps a cosine c in [-1, 1] to a logit: 0 at c = -1, ``1 / T`` at c = 1, with heavy tails set by kappa
    (kappa -> 0 recovers the linear map ``(1 + c) / (2 T)``).
    """
    return 0.5 * (1.0 + cos) / (1.0 + kappa * (1.0 - cos)) / temperature


@full_precision
def symmetric_tsp_info_nce(
    a: Tensor, b: Tensor, *, kappa: float, temperature: float, b_all: Tensor | None = None,
    a_all: Tensor | None = None, offset: int = 0,
) -> Tensor:
    """MiCL loss: ``0.5 [CE(tSP(a b^T), i) + CE(tSP(b a^T), i)]`` over L2-normalised (B, D) cls features.

    Negatives are the other rows of the batch. ``a_all``/``b_all`` are optional (B_total, D) gathered
    features whose rows ``offset .. offset + B`` are this process's ``a``/``b`` (cross-device negatives).
    """
    a = F.normalize(at_least_fp32(a), dim=-1)
    b = F.normalize(at_least_fp32(b), dim=-1)
    a_all = a if a_all is None else F.normalize(at_least_fp32(a_all), dim=-1)
    b_all = b if b_all is None else F.normalize(at_least_fp32(b_all), dim=-1)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_ab = tsp_similarity(a @ b_all.t(), kappa, temperature)
    logits_ba = tsp_similarity(b @ a_all.t(), kappa, temperature)
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


@full_precision
def normalized_pixel_target(target: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE ``norm_pix_loss``: per patch, ``(x - mean) / sqrt(var + eps)`` with the unbiased variance."""
    target = at_least_fp32(target)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # torch default is unbiased, as in MAE's code
    return (target - mean) / (var + eps) ** 0.5


@full_precision
def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error. pred, target (B, N, P); mask (B, N) bool."""
    per_patch = (at_least_fp32(pred) - at_least_fp32(target)).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


@full_precision
def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked patches of the per-patch mean absolute error. pred, target (B, N, P); mask (B, N) bool."""
    per_patch = (at_least_fp32(pred) - at_least_fp32(target)).abs().mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


@full_precision
def info_nce(q: Tensor, k: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """Cross-entropy of ``normalize(q) normalize(k)^T / T`` with positives on the diagonal shifted by ``offset``.

    q (B, D); k (B_total, D) — the keys, possibly gathered across devices (row ``offset + i`` pairs with q_i).
    """
    q = F.normalize(at_least_fp32(q), dim=-1)
    k = F.normalize(at_least_fp32(k), dim=-1)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels)


def moco_contrastive(q: Tensor, k_all: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """MoCo v3 ``contrastive_loss``: ``CE(q^ k^_all^T / T, arange(B) + offset) * 2T``.

    q (B, C) this device's queries; k_all (B_total, C) the keys gathered from every device (no gradient),
    row ``offset + i`` = this device's key i (offset = B * rank). The factor 2T is the official code's.
    """
    return info_nce(q, k_all, temperature, offset) * (2.0 * temperature)


@full_precision
def patch_info_nce(student: Tensor, teacher: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """Intra-image, inter-patch InfoNCE (ConMIM; MimCo's patch level), mean over the masked positions.

    student, teacher (B, N, C); mask (B, N) bool. Row j of ``s t^T / T`` (B, N, N) is kept when position j is
    masked; its target is j: the teacher's token at the same position, the image's other tokens are negatives.
    """
    s = F.normalize(at_least_fp32(student), dim=-1)
    t = F.normalize(at_least_fp32(teacher), dim=-1)
    logits = torch.einsum("bic,bjc->bij", s, t) / temperature  # (B, N, N)
    b, n = logits.shape[:2]
    target = torch.arange(n, device=logits.device).repeat(b)
    # the mean over masked rows as a weighted sum: logits[mask] would sync the host to count the rows
    per_row = F.cross_entropy(logits.flatten(0, 1), target, reduction="none")
    m = mask.flatten().to(per_row.dtype)
    return (per_row * m).sum() / m.sum()


@full_precision
def bank_info_nce(q: Tensor, k: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """MoCo (v1/v2) InfoNCE with a memory bank: logits ``[q.k, q.bank^T] / T``, the positive at index 0.

    q, k (B, C) (k without gradient); bank (K, C) of earlier keys, already L2-normalised.
    """
    q = F.normalize(at_least_fp32(q), dim=-1)
    k = F.normalize(at_least_fp32(k), dim=-1)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ bank.to(q.dtype).t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
