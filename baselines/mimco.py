"""MimCo — MIM pre-training with a Contrastive Teacher.

Paper: Zhou et al., ACM MM'22, arXiv 2209.03063. No public code; METHODS.md "MimCo" is the spec and every
choice the paper leaves open is listed below as an assumption.

Two stages. Stage 1 is this suite's own MoCo v3 (``python -m repro.run mimco`` runs it first when no
``method.teacher`` is given and records how the budget was split). Stage 2 (this class): a masked student
(random 75% of the patches replaced by a learned [MASK] token, all tokens in the sequence) learns to
reconstruct the frozen teacher's features of the unmasked image, with two contrastive losses:

- patch level: each masked student token, through a per-token predictor, against the teacher's token at the
  same position; the teacher's other tokens of the same image are the negatives (as ConMIM), T = 0.1;
- image level: the student's cls feature, through a predictor, against the teacher's projected cls feature;
  the other images of the (device-gathered) batch are the negatives (as MoCo v3), T = 0.2.

Loss = ``patch_weight * patch + image_weight * image`` (equal weights by default).

Assumptions (the paper does not state them) and deviations:
1. Teacher = stage-1 MoCo v3 export: backbone (final-norm tokens are the patch targets) + its projector
   (the cls target); kept frozen in eval mode (BN running statistics), never updated.
2. Student: the shared timm ViT with learned absolute positions and timm's init (a BEiT-style MIM student;
   ConMIM here uses BEiT's own init, which MimCo's paper does not state); the [MASK] token is not exported.
3. Patch predictor: Linear(D, D) - GELU - Linear(D, D_teacher) per token; image predictor: MoCo v3's
   2-layer BN predictor D -> 4096 -> 256 on the student's cls token.
4. Image-level InfoNCE without MoCo v3's 2T factor (a plain InfoNCE, as the paper writes it).
5. Optimisation values not in the paper are MAE's (AdamW, base lr 1.5e-4 x batch/256, betas (0.9, 0.95),
   wd 0.05) with the paper's 100 epochs and a 10-epoch warmup.
6. Augmentation: RandomResizedCrop(0.2-1) + flip (MAE's), the teacher sees the same pixels unmasked.
7. Weight decay: BEiT's rule (1-D tensors, biases, ``pos_embed`` and ``cls_token`` not decayed; the [MASK] token
   decayed), the rule of the BEiT-style MIM code its student resembles (as ConMIM's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repro import distributed
from repro.backbone import BackboneOptions, MaskedViT
from repro.checkpoint import CheckpointError
from repro.config import ConfigError
from repro.export import load_export, load_strict, read_extra
from repro.flops import FORWARD, TRAIN, embed_train_flops, encoder_flops, linear_flops, patch_embed_flops
from repro.heads import bn_mlp, per_token
from repro.losses import info_nce, patch_info_nce
from repro.masking import len_keep_mae, random_masking, to_device_async
from repro.method import BEIT_DECAY, Batch, MethodConfig, Prerequisite, PretrainMethod, StepInfo, StepOutput
from repro.views import ViewSpec


@dataclass(frozen=True, kw_only=True)
class MimCoConfig(MethodConfig):
    teacher: str | None = None
    """Directory of a MoCo v3 export (backbone + projector.safetensors). None: ``repro.run`` trains one first."""
    stage1_fraction: float = 0.5
    """Share of the run's budget given to the stage-1 MoCo v3 teacher when ``repro.run`` trains it."""
    mask_ratio: float = 0.75
    """Random masking ratio of the student (METHODS.md)."""
    patch_temperature: float = 0.1
    image_temperature: float = 0.2
    patch_weight: float = 1.0
    image_weight: float = 1.0
    mlp_dim: int = 4096
    """Hidden width of the image-level predictor."""
    crop_scale: tuple[float, float] = (0.2, 1.0)  # ASSUMPTION(6): MAE's crop
    batch_size: int = 2048
    base_lr: float = 1.5e-4  # ASSUMPTION(5): MAE's optimisation values where the paper gives none
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 10.0
    epochs: float = 100.0
    """Paper headline: 100 epochs of stage 2 (ViT-S)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 < self.stage1_fraction < 1.0:
            raise ConfigError("method.stage1_fraction must be in (0, 1)")
        if min(self.patch_temperature, self.image_temperature) <= 0:
            raise ConfigError("method temperatures must be > 0")


class FrozenTeacher(nn.Module):  # ASSUMPTION(1)
    """A stage-1 MoCo v3 export: timm ViT + projector, frozen and always in eval mode."""

    def __init__(self, export_dir: Path) -> None:
        super().__init__()
        self.vit, self.meta = load_export(export_dir)
        proj_state = read_extra(export_dir, "projector")
        try:
            d_in = proj_state["0.weight"].shape[1]
            hidden, out = proj_state["0.weight"].shape[0], proj_state["6.weight"].shape[0]
        except KeyError:
            raise CheckpointError(f"{export_dir}/projector.safetensors: not a 3-layer MoCo v3 projector") from None
        self.projector = bn_mlp(3, d_in, hidden, out)
        load_strict(self.projector, proj_state, str(Path(export_dir) / "projector.safetensors"))
        self.requires_grad_(False)
        self.eval()
        self.dim: int = int(d_in)
        self.out_dim: int = int(out)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(patch tokens (B, N, D_t), projected cls (B, C))."""
        tokens = self.vit.forward_features(x)  # type: ignore[operator]
        return tokens[:, 1:], self.projector(tokens[:, 0])


class MimCo(PretrainMethod):
    name = "mimco"
    config_cls = MimCoConfig
    # ASSUMPTION(7): BEiT's rule, made for this kind of student (learned positions, [MASK] token); MAE's would
    # decay the learned position table, which MAE's own model never trains
    weight_decay_rule = BEIT_DECAY
    cfg: MimCoConfig
    prerequisite = Prerequisite("mocov3", config_field="teacher", fraction_field="stage1_fraction")
    """Stage 1: the MoCo v3 teacher ``repro.run`` trains when ``method.teacher`` is not given."""

    def __init__(self, cfg: MimCoConfig, backbone: MaskedViT) -> None:
        super().__init__(cfg, backbone)
        if cfg.teacher is None:
            raise ConfigError("mimco needs method.teacher (a MoCo v3 export directory); `python -m repro.run mimco` "
                              "trains one as stage 1 when none is given")
        self.teacher = FrozenTeacher(Path(cfg.teacher))
        if self.teacher.meta.img_size != backbone.img_size or self.teacher.meta.patch_size != backbone.patch_size:
            raise ConfigError(f"method.teacher={cfg.teacher}: teacher sees {self.teacher.meta.img_size}-px images in "
                              f"{self.teacher.meta.patch_size}-px patches, the student {backbone.img_size}/"
                              f"{backbone.patch_size}; they must match")
        d = backbone.embed_dim
        self.len_keep = len_keep_mae(backbone.num_patches, cfg.mask_ratio)
        # ASSUMPTION(3): the two predictors
        self.patch_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, self.teacher.dim))
        self.image_head = bn_mlp(2, d, cfg.mlp_dim, self.teacher.out_dim)

    @classmethod
    def backbone_options(cls, cfg: MethodConfig) -> BackboneOptions:
        # ASSUMPTION(2): the student is the shared timm ViT, learned positions, timm init, a [MASK] token
        return BackboneOptions(pos_embed="learned", init="timm", mask_token=True)

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(count=1, scale=self.cfg.crop_scale)

    def random_mask(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.rand(batch_size, self.backbone.num_patches, generator=generator)
        return random_masking(noise, self.len_keep).mask

    def controlled_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        return {"mask": self.random_mask(batch_size, generator)}

    def forward(self, batch: Batch, step: StepInfo, *, mask: Tensor | None = None) -> StepOutput:
        x = batch.views[0]
        if mask is None:
            mask = self.random_mask(x.shape[0])
        mask = to_device_async(mask, x.device)
        tokens = self.backbone.forward_masked(x, mask)  # (B, N+1, D)
        t_patch, t_cls = self.teacher(x)
        s_patch = per_token(self.patch_head, tokens[:, 1:])
        q = self.image_head(tokens[:, 0])
        c = self.cfg
        patch = patch_info_nce(s_patch, t_patch, mask, c.patch_temperature)
        k_all = distributed.all_gather(t_cls)
        # ASSUMPTION(4): a plain InfoNCE, without MoCo v3's 2T factor
        image = info_nce(q, k_all, c.image_temperature, offset=q.shape[0] * distributed.rank())
        loss = c.patch_weight * patch + c.image_weight * image
        return StepOutput(loss, {"patch_nce": (c.patch_weight * patch).detach(),
                                 "image_nce": (c.image_weight * image).detach()})

    def flops_per_image(self) -> float:
        bb, c = self.backbone, self.cfg
        n, d, dt = bb.num_patches, bb.embed_dim, self.teacher.dim
        blocks = encoder_flops(n + 1, d, bb.depth)
        heads = n * (linear_flops(1, d, d) + linear_flops(1, d, dt)) + linear_flops(1, d, c.mlp_dim) \
            + linear_flops(1, c.mlp_dim, self.teacher.out_dim)
        depth_t = len(self.teacher.vit.blocks)  # type: ignore[arg-type]
        teacher = patch_embed_flops(n, bb.patch_size, dt) + encoder_flops(n + 1, dt, depth_t) + sum(
            linear_flops(1, m.in_features, m.out_features) for m in self.teacher.projector.modules()
            if isinstance(m, nn.Linear))
        # the (B, N, N) patch logits against the teacher's tokens: forward + the student side's gradient
        logits = 2.0 * n * n * dt
        return embed_train_flops(bb) + TRAIN * (blocks + heads) + 2.0 * logits + FORWARD * teacher
