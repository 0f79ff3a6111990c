"""Reusable heads: MAE-style decoder, MoCo v3-style BN MLPs (projector / predictor), per-token application.

Shapes: B batch, N patches, K kept, D encoder width, E decoder width, P = p*p*3.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from repro.backbone import init_mae_, mae_sincos_pos_embed


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder (``models_mae.MaskedAutoencoderViT`` decoder part).

    "The MAE decoder is only used during pre-training": Linear D->E, learned mask tokens appended for the
    removed patches, unshuffle with ``ids_restore``, fixed sin-cos position embedding, ``depth`` timm Blocks,
    LayerNorm, Linear E -> P; the cls token is dropped from the output.
    """

    def __init__(self, *, num_patches: int, grid_size: int, in_dim: int, patch_dim: int, dim: int = 512,
                 depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.embed = nn.Linear(in_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", mae_sincos_pos_embed(grid_size, dim).unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))  # type: ignore[arg-type]
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim, bias=True)
        init_mae_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def for_backbone(cls, backbone, *, dim: int, depth: int, num_heads: int) -> MAEDecoder:
        """A decoder sized for ``backbone`` (a MaskedViT): its patch grid, width and pixels per patch."""
        return cls(num_patches=backbone.num_patches, grid_size=backbone.grid_size, in_dim=backbone.embed_dim,
                   patch_dim=backbone.patch_size ** 2 * 3, dim=dim, depth=depth, num_heads=num_heads)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (B, K+1, D) with cls first; ids_restore (B, N) -> predictions (B, N, P)."""
        x = self.embed(latent)
        b, k1, e = x.shape
        n = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n + 1 - k1, e)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, N, E) in ids_shuffle order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, e))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.pos_embed.to(x.dtype)  # type: ignore[operator]
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, 1:, :]


def bn_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, *, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: bias-free Linear layers, BN + ReLU between them, and an affine-free BN last.

    3 layers (D -> 4096 -> 4096 -> 256) is MoCo v3's and ConMIM's projector, 2 layers (256 -> 4096 -> 256)
    MoCo v3's predictor. PyTorch's default Linear init (the official heads are built after the ViT init).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def per_token(head: nn.Module, tokens: Tensor) -> Tensor:
    """Apply a (N, C) head to every token of (B, T, C): BN statistics are taken over all B*T tokens."""
    b, t, c = tokens.shape
    out = head(tokens.reshape(b * t, c))
    return out.reshape(b, t, -1)
