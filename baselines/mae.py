"""MAE — Masked Autoencoders Are Scalable Vision Learners.

Paper: He et al., arXiv 2111.06377. Official code: facebookresearch/mae (``models_mae.py``,
``main_pretrain.py``); the README/PRETRAIN.md recipe (batch 4096, blr 1.5e-4, 40 warmup epochs,
norm_pix_loss) is the reference, not the script's argument defaults (METHODS.md, "MAE").

Encoder on the visible 25% of patches (fixed sin-cos positions, cls prepended) -> 8-block, 512-wide decoder
with learned mask tokens and its own sin-cos positions -> per-patch pixel prediction; loss = MSE against
the per-patch normalised pixels, averaged over the masked patches only.

Deviations: none in the objective. The encoder is the shared timm ViT, which is the same block design
the official code imports from timm (fused qkv, LayerNorm eps 1e-6), initialised as MAE does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from repro.backbone import BackboneOptions, patchify
from repro.config import ConfigError
from repro.flops import TRAIN, embed_train_flops, encoder_flops, linear_flops
from repro.heads import MAEDecoder
from repro.losses import masked_mse, normalized_pixel_target
from repro.masking import draw_noise, len_keep_mae, random_masking
from repro.method import MAE_DECAY, Batch, MethodConfig, PretrainMethod, StepInfo, StepOutput
from repro.views import ViewSpec


@dataclass(frozen=True, kw_only=True)
class MAEConfig(MethodConfig):
    mask_ratio: float = 0.75
    """Fraction of patches removed (paper Sec. 4, Fig. 5)."""
    decoder_dim: int = 512
    """Decoder width (paper Table 1b default, models_mae.mae_vit_base_patch16_dec512d8b)."""
    decoder_depth: int = 8
    """Decoder blocks (paper Table 1a default)."""
    decoder_heads: int = 16
    """Decoder attention heads (models_mae)."""
    norm_pix_loss: bool = True
    """Per-patch normalised pixel target (paper Table 1c; README recipe)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop scale (main_pretrain.py)."""
    batch_size: int = 4096
    """Global batch (README / PRETRAIN.md)."""
    base_lr: float = 1.5e-4
    """Base lr, scaled by batch / 256 (PRETRAIN.md)."""
    weight_decay: float = 0.05
    """AdamW weight decay (PRETRAIN.md)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (main_pretrain.py)."""
    warmup_epochs: float = 40.0
    """Warmup epochs (PRETRAIN.md)."""
    epochs: float = 800.0
    """Pre-training epochs (PRETRAIN.md; 1600 for the headline numbers)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_dim % self.decoder_heads != 0 or self.decoder_dim % 4 != 0:
            raise ConfigError("method.decoder_dim must be divisible by decoder_heads and by 4")
        if self.decoder_depth < 1:
            raise ConfigError("method.decoder_depth must be >= 1")


class MAE(PretrainMethod):
    name = "mae"
    config_cls = MAEConfig
    weight_decay_rule = MAE_DECAY
    cfg: MAEConfig

    def __init__(self, cfg: MAEConfig, backbone) -> None:
        super().__init__(cfg, backbone)
        self.len_keep = len_keep_mae(backbone.num_patches, cfg.mask_ratio)
        if self.len_keep < 1:
            raise ConfigError(f"method.mask_ratio={cfg.mask_ratio} keeps no patch of {backbone.num_patches}")
        self.decoder = MAEDecoder.for_backbone(backbone, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                                               num_heads=cfg.decoder_heads)

    @classmethod
    def backbone_options(cls, cfg: MethodConfig) -> BackboneOptions:
        return BackboneOptions(pos_embed="sincos", init="mae")

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(count=1, scale=self.cfg.crop_scale)

    def forward(self, batch: Batch, step: StepInfo, *, noise: Tensor | None = None) -> StepOutput:
        imgs = batch.views[0]
        bb = self.backbone
        b, n = imgs.shape[0], bb.num_patches
        m = random_masking(draw_noise(b, n, imgs.device, noise), self.len_keep)
        latent = bb.forward_visible(imgs, m.ids_keep)  # (B, K+1, D)
        pred = self.decoder(latent, m.ids_restore)  # (B, N, P)
        target = patchify(imgs, bb.patch_size)
        if self.cfg.norm_pix_loss:
            target = normalized_pixel_target(target)
        loss = masked_mse(pred, target, m.mask)
        return StepOutput(loss, {"mse_masked": loss.detach()})

    def controlled_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        return {"noise": torch.rand(batch_size, self.backbone.num_patches, generator=generator)}

    def flops_per_image(self) -> float:
        bb, c = self.backbone, self.cfg
        n, d, e = bb.num_patches, bb.embed_dim, c.decoder_dim
        enc = encoder_flops(self.len_keep + 1, d, bb.depth)
        dec = (linear_flops(self.len_keep + 1, d, e) + encoder_flops(n + 1, e, c.decoder_depth)
               + linear_flops(n, e, bb.patch_size ** 2 * 3))
        return embed_train_flops(bb) + TRAIN * (enc + dec)
