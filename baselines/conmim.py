"""ConMIM — Masked Image Modeling with Denoising Contrast.

Paper: Yi et al., ICLR'23, arXiv 2205.09616. Official code: TencentARC/ConMIM (BEiT code base);
METHODS.md "ConMIM" is the spec.

One shared RandomResizedCrop + flip. Student: that view, with masked patches (BEiT block-wise generator,
75 of 196) replaced by a learned [MASK] token, all tokens kept -> 3-layer BN projector on every token
(cls included, BN over all B*(N+1) tokens) -> drop cls. Teacher: momentum copy of backbone + projector
(cosine momentum 0.996 -> 1, BN in training mode, BN buffers its own) on the same crop with strong
photometric corruption and no mask. Loss: per image, InfoNCE of each masked student token against the
teacher's N tokens of that image, target = its own position, T = 0.1; mean over all masked positions.
Absolute learning rate (no batch scaling).

What is exported and evaluated: the momentum **teacher** (``method.export_encoder='teacher'``, the default), as
the official release fine-tunes ``checkpoint_copy-*.pth``, the teacher's checkpoint; ``'student'`` exports the
online encoder instead.

As the official code (``modeling_pretrain.py``, ``run_conmim_pretraining.py``, ``optim_factory.py``):
- BEiT's initialisation: Linear layers (the projector's too: it is built before ``apply(_init_weights)``), the
  patch projection, cls, [MASK] and position tables N(0, 0.02) truncated at +-1 sigma; each block's
  ``attn.proj`` / ``mlp.fc2`` divided by sqrt(2 layer_id) (``BackboneOptions(init='beit')``);
- the projector's BatchNorm is per device: the official model is wrapped in DDP without SyncBN conversion;
- weight decay by BEiT's ``get_parameter_groups`` (1-D, biases, ``pos_embed``, ``cls_token`` not decayed);
- no gradient clipping in the ViT-B recipe (``--clip_grad`` default None; the ViT-L recipe clips at 1.0:
  ``--set train.clip_grad=1.0``);
- block-wise masking places rectangles until ``num_mask_patches`` are masked (BEiT ``MaskingGenerator``); the
  random-block variant masks ``ceil(cells * ratio)`` cells (ConMIM ``MaskGenerator``).

Deviations (the shared timm backbone differs from the official BEiT-style ViT; the objective is exact):
1. No relative position bias: timm's learned absolute position embedding instead (BEiT's ``rel_pos_bias``
   is not part of timm's ``VisionTransformer``).
2. No layer-scale (BEiT ``init_values`` 0.1 at ViT-B): timm's default ViT blocks have none.
3. (not a deviation: the teacher update runs after each optimizer step with the momentum of that step, as the
   official loop does (``engine_for_pretraining.py`` ``train_one_epoch``: ``loss_scaler(...)`` steps the
   optimizer, then ``m = momentum_schedule[it]`` and the EMA over the shared parameters); the [MASK] token is a
   method parameter, not part of the export, and the official fine-tuning drops it too.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from repro.backbone import BackboneOptions, MaskedViT, init_beit_
from repro.config import ConfigError
from repro.flops import FORWARD, TRAIN, embed_train_flops, encoder_flops, linear_flops, patch_embed_flops
from repro.heads import bn_mlp, per_token
from repro.losses import patch_info_nce
from repro.masking import block_mask, random_block_mask, to_device_async
from repro.method import BEIT_DECAY, Batch, MethodConfig, PretrainMethod, StepInfo, StepOutput
from repro.momentum import cosine_momentum, ema_update_, momentum_copy
from repro.views import BYOL_VIEW2, NONE, ViewSpec


@dataclass(frozen=True, kw_only=True)
class ConMIMConfig(MethodConfig):
    mask_kind: Literal["block", "random_block"] = "block"
    """'block' = BEiT block-wise generator (ViT-B recipe); 'random_block' = random 32-px squares (ViT-L)."""
    num_mask_patches: int = 75
    """Patches masked by the block-wise generator (ViT-B: 75 of 196, ~38%)."""
    min_mask_patches: int = 16
    """Smallest rectangle of the block-wise generator (BEiT default)."""
    mask_ratio: float = 0.75
    """Masked fraction for 'random_block' (ViT-L recipe)."""
    mask_block_px: int = 32
    """Square size in pixels for 'random_block' (a multiple of the patch size)."""
    temperature: float = 0.1
    """InfoNCE temperature (paper Sec. 3)."""
    momentum: float = 0.996
    """Teacher momentum at step 0, half-cycle cosine to 1."""
    mlp_dim: int = 4096
    """Projector hidden width."""
    dim: int = 256
    """Projector output width."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Shared RandomResizedCrop scale."""
    batch_size: int = 2048
    """Global batch (ViT-L recipe; ViT-B uses 2048 as well)."""
    base_lr: float = 5e-4
    """Absolute learning rate (ViT-B; ViT-L 7.5e-4)."""
    lr_is_absolute: bool = True
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_epochs: float = 10.0
    epochs: float = 800.0
    min_lr: float = 1e-5
    export_encoder: Literal["teacher", "student"] = "teacher"
    """Encoder exported for evaluation: the momentum teacher, as the official release fine-tunes
    (``checkpoint_copy-*.pth``), or the online student."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.export_encoder not in ("teacher", "student"):
            raise ConfigError(f"method.export_encoder must be 'teacher' or 'student', got {self.export_encoder!r}")
        if self.temperature <= 0:
            raise ConfigError("method.temperature must be > 0")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.num_mask_patches < 1 or self.min_mask_patches < 1:
            raise ConfigError("method.num_mask_patches and method.min_mask_patches must be >= 1")


def masks_for(cfg: Any, backbone: MaskedViT, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """The configured mask kind for a batch: (B, N) bool, True = masked (CPU)."""
    g = backbone.grid_size
    if cfg.mask_kind == "block":
        return block_mask(batch_size, g, cfg.num_mask_patches, min_patches=cfg.min_mask_patches, generator=generator)
    if cfg.mask_block_px % backbone.patch_size:
        raise ConfigError(f"method.mask_block_px={cfg.mask_block_px} is not a multiple of the patch size "
                          f"{backbone.patch_size}")
    return random_block_mask(batch_size, g, cfg.mask_block_px // backbone.patch_size, cfg.mask_ratio, generator)


class ConMIM(PretrainMethod):
    name = "conmim"
    config_cls = ConMIMConfig
    weight_decay_rule = BEIT_DECAY
    sync_batchnorm = False  # the official code wraps DDP without converting BN: projector statistics per device
    cfg: ConMIMConfig

    def __init__(self, cfg: ConMIMConfig, backbone: MaskedViT) -> None:
        super().__init__(cfg, backbone)
        if cfg.mask_kind == "block" and cfg.num_mask_patches > backbone.num_patches:
            raise ConfigError(f"method.num_mask_patches={cfg.num_mask_patches} exceeds the {backbone.num_patches} "
                              "patches")
        self.projector = bn_mlp(3, backbone.embed_dim, cfg.mlp_dim, cfg.dim)
        init_beit_(self.projector)  # built before the official apply(_init_weights): BEiT's init reaches it too
        # a configuration that masks nothing would give a 0/0 loss at the first step: refuse it now
        probe = masks_for(cfg, backbone, 8, torch.Generator().manual_seed(0))
        if not bool(probe.any(dim=1).all()):
            raise ConfigError(f"method.mask_kind={cfg.mask_kind!r} with these settings leaves some images with no "
                              f"masked patch on the {backbone.grid_size}x{backbone.grid_size} grid (e.g. "
                              f"min_mask_patches={cfg.min_mask_patches} does not fit); ConMIM's loss needs one")
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_projector = momentum_copy(self.projector)

    @classmethod
    def backbone_options(cls, cfg: MethodConfig) -> BackboneOptions:
        # DEVIATION(1): learned absolute positions, no relative position bias; DEVIATION(2): no layer-scale
        return BackboneOptions(pos_embed="learned", init="beit", mask_token=True)

    @property
    def views(self) -> ViewSpec:
        # view 0: the student's crop + flip only; view 1: the same crop, strongly corrupted, for the teacher
        return ViewSpec(count=2, scale=self.cfg.crop_scale, shared_crop=True, photometric=(NONE, BYOL_VIEW2))

    def controlled_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        return {"mask": masks_for(self.cfg, self.backbone, batch_size, generator)}

    def forward(self, batch: Batch, step: StepInfo, *, mask: Tensor | None = None) -> StepOutput:
        x_student, x_teacher = batch.views
        b = x_student.shape[0]
        if mask is None:
            mask = masks_for(self.cfg, self.backbone, b)
        mask = to_device_async(mask, x_student.device)
        s = per_token(self.projector, self.backbone.forward_masked(x_student, mask))[:, 1:]
        with torch.no_grad():  # the teacher's BN runs in training mode (batch statistics), like the student's
            tb = self.teacher_backbone
            t = per_token(self.teacher_projector, tb.encode(tb.embed(x_teacher)))[:, 1:]
        loss = patch_info_nce(s, t, mask, self.cfg.temperature)
        return StepOutput(loss, {"patch_nce": loss.detach(), "aux/mask_fraction": mask.float().mean()})

    def after_optimizer_step(self, step: StepInfo) -> None:
        # the EMA runs after the optimizer step, with the momentum of this step (as the official loop)
        m = cosine_momentum(self.cfg.momentum, step.progress)
        ema_update_(self.teacher_backbone, self.backbone, m)
        ema_update_(self.teacher_projector, self.projector, m)

    def eval_backbone(self) -> MaskedViT:
        return self.teacher_backbone if self.cfg.export_encoder == "teacher" else self.backbone

    def flops_per_image(self) -> float:
        bb, c = self.backbone, self.cfg
        n, d = bb.num_patches, bb.embed_dim
        blocks = encoder_flops(n + 1, d, bb.depth)
        proj = (n + 1) * (linear_flops(1, d, c.mlp_dim) + linear_flops(1, c.mlp_dim, c.mlp_dim)
                          + linear_flops(1, c.mlp_dim, c.dim))
        loss = 2.0 * n * n * c.dim
        teacher = patch_embed_flops(n, bb.patch_size, d) + blocks + proj
        # the (B, N, N) patch logits: forward + the student side's gradient (the teacher side has none)
        return embed_train_flops(bb) + TRAIN * (blocks + proj) + 2.0 * loss + FORWARD * teacher
