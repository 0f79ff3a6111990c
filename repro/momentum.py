"""Momentum (EMA) encoders: a frozen copy updated from the online weights after every optimizer step.

``cosine_momentum`` is the half-cycle cosine from ``base`` to 1 that MoCo v3 (0.99) and ConMIM (0.996) use;
``ema_update_`` is ``theta_k <- m theta_k + (1 - m) theta_q`` over parameters only (buffers such as BN
running statistics stay the copy's own), with foreach kernels.
"""

from __future__ import annotations

import copy
import math
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def cosine_momentum(base: float, progress: float) -> float:
    """``1 - (1 - base) (1 + cos(pi t)) / 2`` at progress t in [0, 1]: ``base`` at the start, 1 at the end."""
    t = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * t))


def momentum_copy(module: M) -> M:
    """A deep copy whose parameters take no gradient (updated only by :func:`ema_update_`)."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: every parameter of ``target`` becomes ``m target + (1 - m) online`` (same structure).

    Parameters the online module does not train (fixed sin-cos positions, MoCo v3's frozen patch projection)
    are equal in both and skipped, so rounding cannot make the copies drift apart.
    """
    pairs = list(zip(target.parameters(), online.parameters(), strict=True))
    t: list[Tensor] = [pt for pt, po in pairs if po.requires_grad]
    o: list[Tensor] = [po.detach() for pt, po in pairs if po.requires_grad]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)
