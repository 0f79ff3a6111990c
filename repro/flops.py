"""Analytic training FLOPs (2 FLOPs per multiply-add) for FLOP budgets and model-FLOPs utilisation.

Per transformer block of width D on N tokens, forward: ``24 N D^2`` (qkv 6, proj 2, MLP 16 with ratio 4)
plus ``4 N^2 D`` (QK^T and AV). Training a part costs 3x its forward (forward + 2x backward); a frozen or
momentum part that only runs forward costs 1x. Norms, softmax and elementwise ops are ignored, as usual.
"""

from __future__ import annotations

TRAIN = 3.0
"""Forward + backward multiplier for trained parts."""
FORWARD = 1.0
"""Multiplier for parts that only run forward (frozen teachers, momentum encoders)."""


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
