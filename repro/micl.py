"""MiCL — Masked Image Contrastive Learning.

Paper: "Masked Image Contrastive Learning for Efficient Visual Conceptual Pre-training", arXiv 2411.09858
(ICML'25 title "One Leaf Reveals the Season: Occlusion-Based Contrastive Learning", OCL). Official code:
the anonymous OCL release, built from MAE's code; its code defaults (not its leftover PRETRAIN.md) are the
reference (METHODS.md, "MiCL").

One image -> patch-embed all N patches (+ fixed sin-cos positions) -> random-mask with ratio r, keeping an
even count ``len_keep`` -> split the kept tokens (in ``ids_shuffle`` order) into two disjoint halves ->
encode both halves as separate sequences (cls prepended) with the same online encoder -> InfoNCE between
the two cls outputs under the t-distributed spherical similarity. No projector, predictor, EMA, decoder,
reconstruction or colour augmentation.

Deviations:
1. Negatives come from groups of ``loss_group_size`` consecutive images of the global batch (default 1800,
   the official per-GPU batch), so the objective is the official 4 x 1800 one whatever the number of devices:
   8 devices x 900 put each group on 2 devices, whose features are gathered (with gradient) for it; 2 x 3600
   hold 2 groups each. A global batch below the group size is one group; group sizes that would straddle
   devices unevenly (neither the group nor the per-device batch a multiple of the other) are refused. With
   ``loss_group_size=None`` the whole per-device batch is one group. Official: the per-device batch, whatever
   its size. Identical when the per-device batch is 1800.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from repro import distributed
from repro.backbone import BackboneOptions
from repro.config import ConfigError
from repro.flops import TRAIN, embed_train_flops, encoder_flops
from repro.losses import symmetric_tsp_info_nce
from repro.masking import draw_noise, len_keep_even, random_masking
from repro.method import MAE_DECAY, Batch, MethodConfig, PretrainMethod, StepInfo, StepOutput
from repro.views import ViewSpec


@dataclass(frozen=True, kw_only=True)
class MiCLConfig(MethodConfig):
    mask_ratio: float = 0.9
    """Fraction of patches removed; the kept count is rounded down to even (official code, main_pretrain.py)."""
    kappa: float = 1 / 64
    """t-SP tail parameter kappa (paper Sec. 3, official loss)."""
    temperature: float = 0.07
    """t-SP temperature T (official loss)."""
    gather_negatives: bool = False
    """Use every device's images as negatives (not in the official code; default off to match it)."""
    loss_group_size: int | None = 1800
    """Images per InfoNCE group: the official per-GPU batch (batch 1800 x 4 GPUs). None = whole local batch."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop scale (official code, as MAE)."""
    added_after_publication: ClassVar[dict[str, object]] = {"augment": "crop+flip"}
    augment: str = "crop+flip"
    """The view's hand-crafted augmentation: 'crop+flip' (the official code: RandomResizedCrop(crop_scale) and a
    horizontal flip) or 'none' (the full image, resized, never flipped), to test the paper's claim that MiCL needs no
    hand-crafted augmentation. Added after runs were published: omitted from the config hash at its default."""
    # official code defaults (main_pretrain.py of the OCL release): 4 GPUs x 1800, 200 epochs, blr 5e-5
    batch_size: int = 7200
    """Global batch: 1800 per GPU on 4 GPUs (official code)."""
    base_lr: float = 5e-5
    """Base lr, scaled by batch / 256 (official code default)."""
    weight_decay: float = 0.05
    """AdamW weight decay (official code)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (official code, from MAE)."""
    warmup_epochs: float = 10.0
    """Warmup epochs (official code)."""
    epochs: float = 200.0
    """Pre-training epochs (official code)."""
    min_lr: float = 0.0
    """Cosine floor (official code)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.kappa < 0 or self.temperature <= 0:
            raise ConfigError("method.kappa must be >= 0 and method.temperature > 0")
        if self.augment not in ("crop+flip", "none"):
            raise ConfigError(f"method.augment must be 'crop+flip' or 'none', got {self.augment!r}")
        if self.loss_group_size is not None and self.loss_group_size < 2:
            raise ConfigError("method.loss_group_size must be >= 2 (or none)")


class MiCL(PretrainMethod):
    name = "micl"
    config_cls = MiCLConfig
    # OCL is MAE's main_pretrain.py: timm add_weight_decay, no skip list
    weight_decay_rule = MAE_DECAY
    cfg: MiCLConfig

    def __init__(self, cfg: MiCLConfig, backbone) -> None:
        super().__init__(cfg, backbone)
        self.len_keep = len_keep_even(backbone.num_patches, cfg.mask_ratio)
        if self.len_keep < 2:
            raise ConfigError(f"method.mask_ratio={cfg.mask_ratio} keeps {self.len_keep} of {backbone.num_patches} "
                              "patches; MiCL needs at least one per view")

    @classmethod
    def backbone_options(cls, cfg: MethodConfig) -> BackboneOptions:
        return BackboneOptions(pos_embed="sincos", init="mae")

    @property
    def views(self) -> ViewSpec:
        if self.cfg.augment == "none":  # the whole image, resized to the input size: no crop, no flip
            return ViewSpec(count=1, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
        return ViewSpec(count=1, scale=self.cfg.crop_scale)

    def encode_views(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The two cls features (B, D) of one image's disjoint visible halves."""
        bb = self.backbone
        tokens = bb.embed(x)  # (B, N, D)
        b, n, d = tokens.shape
        m = random_masking(draw_noise(b, n, tokens.device, noise), self.len_keep)
        kept = torch.gather(tokens, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, K, D)
        # rows 2i and 2i+1 are image i's first and second half of ids_keep: disjoint views of K/2 tokens
        pairs = kept.reshape(2 * b, self.len_keep // 2, d)
        cls = bb.encode(pairs)[:, 0].reshape(b, 2, d)
        return cls[:, 0], cls[:, 1]

    def forward(self, batch: Batch, step: StepInfo, *, noise: Tensor | None = None) -> StepOutput:
        a, b = self.encode_views(batch.views[0], noise)
        c = self.cfg
        if c.gather_negatives and distributed.world_size() > 1:
            a_all, b_all, offset = distributed.gather_with_grad(a), distributed.gather_with_grad(b), \
                distributed.rank() * a.shape[0]
            loss = symmetric_tsp_info_nce(a, b, kappa=c.kappa, temperature=c.temperature, a_all=a_all, b_all=b_all,
                                          offset=offset)
        else:
            loss = self.grouped_loss(a, b)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
        return StepOutput(loss, {"infonce_tsp": loss.detach(), "aux/pos_cosine": cos})

    def group_size(self, local_batch: int, world: int) -> int:
        """Images per InfoNCE group for this device layout (Deviation 1); raises ConfigError when not exact."""
        total = local_batch * world
        if self.cfg.loss_group_size is None:
            return local_batch
        group = min(self.cfg.loss_group_size, total)
        if total % group or (local_batch % group and group % local_batch):
            raise ConfigError(f"method.loss_group_size={self.cfg.loss_group_size}: the global batch {total} on {world} "
                              f"device(s) ({local_batch} each) does not split into equal groups of {group} that "
                              "each lie on one device or on whole devices; pick a group size dividing both")
        return group

    def grouped_loss(self, a: Tensor, b: Tensor) -> Tensor:
        """Mean over groups of the t-SP InfoNCE, each group's negatives its own images only (Deviation 1)."""
        c, local = self.cfg, a.shape[0]
        world = distributed.world_size()
        group = self.group_size(local, world)
        if group <= local:  # DEVIATION(1): whole groups on this device
            parts = [symmetric_tsp_info_nce(ga, gb, kappa=c.kappa, temperature=c.temperature)
                     for ga, gb in zip(a.split(group), b.split(group), strict=True)]
            return parts[0] if len(parts) == 1 else torch.stack(parts).mean()
        # DEVIATION(1): a group spans group // local devices: gather its rows; this device's rows are the queries
        start = distributed.rank() * local // group * group
        a_all, b_all = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
        return symmetric_tsp_info_nce(a, b, kappa=c.kappa, temperature=c.temperature, a_all=a_all[start:start + group],
                                      b_all=b_all[start:start + group], offset=distributed.rank() * local - start)

    def controlled_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        return {"noise": torch.rand(batch_size, self.backbone.num_patches, generator=generator)}

    def flops_per_image(self) -> float:
        bb = self.backbone
        per_view = encoder_flops(self.len_keep // 2 + 1, bb.embed_dim, bb.depth)
        return embed_train_flops(bb) + TRAIN * 2 * per_view
