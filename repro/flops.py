"""Analytic training FLOPs (2 FLOPs per multiply-add) for FLOP budgets and model-FLOPs utilisation (MFU).

Per transformer block of width D on N tokens, forward: ``24 N D^2`` (qkv 6, proj 2, MLP 16 with ratio 4)
plus ``4 N^2 D`` (QK^T and AV). Training a part costs 3x its forward (forward + input gradient + weight
gradient); a frozen or momentum part that only runs forward costs 1x. The patch embedding is the first layer:
its input needs no gradient, so training it costs 2x (and 1x when it is frozen, as in MoCo v3). Norms,
softmax, elementwise ops and the O(B) loss matmuls (logits against a batch or a bank are counted where a
method's file says so) are ignored, as is usual for MFU.

Each method's ``flops_per_image`` is built from these pieces; ``tests/unit/test_flops.py`` checks every one
against :func:`measure_step_flops` (PyTorch's FlopCounterMode on a real forward + backward), and
:func:`vit_forward_flops` against timm's published GMACs for ViT-S/B/L at 224 px.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

TRAIN = 3.0
"""Forward + backward multiplier for trained parts."""
FORWARD = 1.0
"""Multiplier for parts that only run forward (frozen teachers, momentum encoders)."""
TRAIN_FIRST_LAYER = 2.0
"""Forward + weight gradient: a trained first layer (the patch embedding) has no input gradient to compute."""


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-norm ViT block on ``tokens`` tokens of width ``dim``."""
    dense = (8.0 + 4.0 * mlp_ratio) * tokens * dim * dim  # qkv + proj + 2 MLP layers (24 N D^2 at ratio 4)
    attn = 4.0 * tokens * tokens * dim
    return dense + attn


def encoder_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``depth`` blocks on one sequence."""
    return depth * block_flops(tokens, dim, mlp_ratio)


def patch_embed_flops(num_patches: int, patch_size: int, dim: int, channels: int = 3) -> float:
    return linear_flops(num_patches, channels * patch_size * patch_size, dim)


def vit_forward_flops(img_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12,
                      num_classes: int = 1000, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of a classification ViT (patch embedding, ``depth`` blocks on N+1 tokens, linear head)."""
    n = (img_size // patch_size) ** 2
    head = linear_flops(1, dim, num_classes) if num_classes else 0.0
    return patch_embed_flops(n, patch_size, dim) + encoder_flops(n + 1, dim, depth, mlp_ratio) + head


def embed_train_flops(backbone: Any) -> float:
    """Training FLOPs of a backbone's patch embedding for one image: 2x forward if trained, 1x if frozen."""
    fwd = patch_embed_flops(backbone.num_patches, backbone.patch_size, backbone.embed_dim)
    trained = any(p.requires_grad for p in backbone.vit.patch_embed.parameters())
    return (TRAIN_FIRST_LAYER if trained else FORWARD) * fwd


def mfu(flops_per_image: float, images_per_second: float, peak_flops_per_second: float) -> float:
    """Model-FLOPs utilisation: achieved analytic FLOP/s over the peak."""
    return flops_per_image * images_per_second / peak_flops_per_second


def set_fused_attention(module: nn.Module, fused: bool) -> list[tuple[Any, bool]]:
    """Switch every timm attention layer in ``module`` between SDPA (fused) and explicit softmax(QK^T)V;
    returns the previous (layer, flag) pairs."""
    layers: list[Any] = [m for m in module.modules() if hasattr(m, "fused_attn")]
    before = [(m, bool(m.fused_attn)) for m in layers]
    for m in layers:
        m.fused_attn = fused
    return before


@contextlib.contextmanager
def _unfused_attention(module: nn.Module) -> Iterator[None]:
    """timm's fused attention runs as one SDPA kernel that FlopCounterMode cannot see on CPU; count the
    explicit matmuls instead (same FLOPs, same result)."""
    saved = set_fused_attention(module, False)
    try:
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


def count_flops(fn: Callable[[], Any], module: nn.Module | None = None) -> float:
    """FLOPs PyTorch's FlopCounterMode sees while ``fn()`` runs (matmuls, convolutions and their backwards)."""
    from torch.utils.flop_counter import FlopCounterMode

    ctx = _unfused_attention(module) if module is not None else contextlib.nullcontext()
    with ctx, FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measure_step_flops(method: nn.Module, batch: Any, step: Any, **controlled: Any) -> float:
    """Counted FLOPs per image of one training step's forward + backward (gradients are left in place)."""
    def run() -> None:
        method(batch, step, **controlled).loss.backward()

    n = batch.views[0].shape[0]
    return count_flops(run, method) / n


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                      repeats: int = 20, trials: int = 3) -> float:
    """Measured dense-matmul FLOP/s of ``device`` (the roof MFU is reported against): the best of ``trials``
    timings of ``repeats`` back-to-back (n x n) @ (n x n) products, after a warm-up."""
    import time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            for _ in range(repeats):
                torch.matmul(a, b, out=out)
            seconds = time.perf_counter() - t0
        best = max(best, 2.0 * n ** 3 * repeats / seconds)
    return best
