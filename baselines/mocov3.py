"""MoCo v3 — An Empirical Study of Training Self-Supervised Vision Transformers.

Paper: Chen, Xie, He, arXiv 2104.02057. Official code: facebookresearch/moco-v3 (``moco/builder.py``
``MoCo_ViT``, ``vits.py``, ``main_moco.py``); METHODS.md "MoCo v3" is the spec.

Two BYOL-augmented views -> online ViT (fixed sin-cos positions, frozen random patch projection) -> cls ->
3-layer BN projector -> 2-layer BN predictor = queries q1, q2; momentum ViT + projector (no predictor) on the
same views = keys k1, k2, gathered across devices. Loss ``ctr(q1, k2) + ctr(q2, k1)`` with
``ctr(q, k) = CE(q k_all^T / T, arange(B) + B rank) * 2T``, T = 0.2. Momentum follows a half-cycle cosine
from 0.99 to 1. BatchNorm is synchronised across devices (the trainer converts it under DDP).

Deviations:
1. Momentum timing. The official forward updates the momentum encoder with iteration i's momentum
   m(i) just before computing iteration i's keys; here the update runs right after the optimizer step of
   iteration i-1 and uses m(i) (``StepInfo.step + 1``), which yields the same weights at the same point.
   The one difference: the official update at iteration 0 (a no-op, both copies are equal) is skipped.
2. The position table is MoCo v3's own (row index in the first half, float32), stored in timm's
   ``pos_embed`` with a zero cls row, exactly as ``vits.py`` does; not a deviation in values.
3. Heads of the shared backbone: MoCo v3's ViT-S (``vits.vit_small``) has 12 heads of width 32; timm's
   ``vit_small_patch16_224``, which every method here shares so that their exports are comparable, has 6 of
   width 64. Same width, depth and parameter count; ViT-B (12 heads) is identical.

As the official code: RandomResizedCrop with torchvision's default bilinear interpolation (``main_moco.py``
passes none), not MAE's bicubic; every trainable tensor weight-decayed (``AdamW(model.parameters())``);
BatchNorm synchronised across devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from repro import distributed
from repro.backbone import BackboneOptions, MaskedViT
from repro.config import ConfigError
from repro.flops import TRAIN, embed_train_flops, encoder_flops, linear_flops, patch_embed_flops
from repro.heads import bn_mlp
from repro.losses import moco_contrastive
from repro.method import ALL_DECAY, Batch, MethodConfig, PretrainMethod, StepInfo, StepOutput
from repro.momentum import cosine_momentum, ema_update_, momentum_copy
from repro.views import BYOL_VIEW1, BYOL_VIEW2, ViewSpec


@dataclass(frozen=True, kw_only=True)
class MoCoV3Config(MethodConfig):
    temperature: float = 0.2
    """Softmax temperature T (main_moco.py --moco-t, ViT recipe)."""
    momentum: float = 0.99
    """Momentum at step 0; half-cycle cosine to 1 (main_moco.py --moco-m, --moco-m-cos)."""
    mlp_dim: int = 4096
    """Hidden width of projector and predictor (--mlp-dim)."""
    dim: int = 256
    """Output width (--moco-dim)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop scale (--crop-min 0.08)."""
    batch_size: int = 4096
    """Global batch (paper Sec. 4, ViT recipe)."""
    base_lr: float = 1.5e-4
    """AdamW base lr, scaled by batch / 256 (CONFIG.md, ViT-B)."""
    weight_decay: float = 0.1
    """AdamW weight decay (CONFIG.md, ViT)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (torch defaults, as main_moco.py)."""
    warmup_epochs: float = 40.0
    """Warmup epochs (CONFIG.md, ViT)."""
    epochs: float = 300.0
    """Pre-training epochs (CONFIG.md, ViT-B 300)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError("method.temperature must be > 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError("method.momentum must be in [0, 1]")
        if self.mlp_dim < 1 or self.dim < 1:
            raise ConfigError("method.mlp_dim and method.dim must be >= 1")


class MoCoV3(PretrainMethod):
    name = "mocov3"
    config_cls = MoCoV3Config
    weight_decay_rule = ALL_DECAY
    cfg: MoCoV3Config

    def __init__(self, cfg: MoCoV3Config, backbone: MaskedViT) -> None:
        super().__init__(cfg, backbone)
        d = backbone.embed_dim
        self.projector = bn_mlp(3, d, cfg.mlp_dim, cfg.dim)
        self.predictor = bn_mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim)
        # the momentum encoder starts as an exact copy (official: param_m.data.copy_(param_b.data))
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)

    @classmethod
    def backbone_options(cls, cfg: MethodConfig) -> BackboneOptions:
        # DEVIATION(2): MoCo v3's own sin-cos table in timm's pos_embed (zero cls row), values as vits.py
        # DEVIATION(3): the shared timm ViT's head count (ViT-S: 6, MoCo v3's vits.py: 12)
        return BackboneOptions(pos_embed="sincos_moco", init="moco", freeze_patch_embed=True)

    @property
    def views(self) -> ViewSpec:
        # main_moco.py: transforms.RandomResizedCrop(224, scale=(crop_min, 1.)), torchvision's bilinear default
        return ViewSpec(count=2, scale=self.cfg.crop_scale, interpolation="bilinear",
                        photometric=(BYOL_VIEW1, BYOL_VIEW2))

    def queries(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        # both views in one encoder call (the ViT has no batch statistics); the BN heads see each view alone,
        # as in the official code
        f1, f2 = self.backbone.forward_features(torch.cat([x1, x2]))[:, 0].chunk(2)
        return self.predictor(self.projector(f1)), self.predictor(self.projector(f2))

    @torch.no_grad()
    def keys(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        f1, f2 = self.momentum_backbone.forward_features(torch.cat([x1, x2]))[:, 0].chunk(2)
        return self.momentum_projector(f1), self.momentum_projector(f2)

    def forward(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        q1, q2 = self.queries(x1, x2)
        k1, k2 = (distributed.all_gather(k) for k in self.keys(x1, x2))
        offset = q1.shape[0] * distributed.rank()  # labels arange(B) + B * rank
        t = self.cfg.temperature
        l12, l21 = moco_contrastive(q1, k2, t, offset), moco_contrastive(q2, k1, t, offset)
        return StepOutput(l12 + l21, {"ctr_q1k2": l12.detach(), "ctr_q2k1": l21.detach()})

    def momentum_at(self, step: StepInfo) -> float:
        """Momentum applied after optimizer step ``s``: the schedule's value at iteration s + 1 (Deviation 1)."""
        # DEVIATION(1): updated after step s with m(s + 1) instead of before step s + 1's keys
        return cosine_momentum(self.cfg.momentum, (step.step + 1) / max(1, step.total_steps))

    def after_optimizer_step(self, step: StepInfo) -> None:
        m = self.momentum_at(step)
        ema_update_(self.momentum_backbone, self.backbone, m)
        ema_update_(self.momentum_projector, self.projector, m)

    def controlled_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        return {}  # no masking: the two views are the only randomness, and they are given tensors

    def extra_exports(self) -> dict[str, dict[str, Tensor]]:
        return {"projector": {k: v.detach() for k, v in self.projector.state_dict().items()}}

    def flops_per_image(self) -> float:
        bb, c = self.backbone, self.cfg
        n, d = bb.num_patches, bb.embed_dim
        blocks = encoder_flops(n + 1, d, bb.depth)
        proj = linear_flops(1, d, c.mlp_dim) + linear_flops(1, c.mlp_dim, c.mlp_dim) + linear_flops(1, c.mlp_dim, c.dim)
        pred = linear_flops(1, c.dim, c.mlp_dim) + linear_flops(1, c.mlp_dim, c.dim)
        # two views: online forward + backward (TRAIN x; the patch embedding is frozen: 1 x), momentum forward only
        return 2 * (embed_train_flops(bb) + TRAIN * (blocks + proj + pred)
                    + patch_embed_flops(n, bb.patch_size, d) + blocks + proj)
