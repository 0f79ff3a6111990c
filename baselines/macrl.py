"""MACRL — Masked Contrastive Representation Learning.

Paper: Yao, Desai, Palaniswami, arXiv 2211.06012. No public code; METHODS.md "MACRL" is the spec and every
choice the paper leaves open is listed below as an assumption.

Asymmetric siamese network. Branch 1: strong augmentation, mask ratio 0.75; branch 2: weak augmentation
(crop + flip), mask ratio 0.5. Both branches run the same MAE-style encoder (visible tokens only, shared
weights) and their own MAE-style decoder. Contrastive part: the encoders' cls features go through a
projector (queries); a momentum copy of encoder + projector gives keys; InfoNCE of each query against the
other branch's key with a FIFO memory bank of earlier keys as negatives, T = 0.2. Reconstruction: L1 between
each decoder's output and its own view's pixels on that branch's masked patches.
Loss = contrastive + lambda * (L1_1 + L1_2).

Assumptions (the paper does not state them):
1. Contrastive loss symmetrised, ``0.5 [nce(q1, k2) + nce(q2, k1)]``; both key sets are enqueued (gathered
   from every device) after the optimizer step, oldest first out.
2. The key branch encodes the same masked views as the online branch (same visible tokens).
3. Projector: MoCo v2's 2-layer MLP (D -> 2048 -> ReLU -> 128); key-encoder momentum 0.999, fixed (MoCo v2).
4. Strong augmentation = BYOL's second view (colour jitter 0.8, grayscale 0.2, blur 0.1, solarize 0.2);
   both views RandomResizedCrop(0.2-1) + flip (MAE's crop).
5. L1 target: the view's normalised pixels per patch, no per-patch normalisation (``norm_pix_loss`` off).
6. Decoders and optimisation as MAE (512 wide, 8 blocks; AdamW base lr 1.5e-4 x batch/256, betas
   (0.9, 0.95), wd 0.05, 40 warmup of 800 epochs), MAE's weight-decay rule included (1-D tensors and biases
   not decayed; cls and [MASK] tokens decayed).
7. Memory bank of 65536 keys at ImageNet scale; keep it below the train-set size on small data (the tiny
   recipe uses 4096 for 5k images) so that a key is not its own image's negative within an epoch too often.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro import distributed
from repro.backbone import BackboneOptions, MaskedViT, patchify
from repro.config import ConfigError
from repro.flops import FORWARD, TRAIN, embed_train_flops, encoder_flops, linear_flops, patch_embed_flops
from repro.heads import MAEDecoder
from repro.losses import bank_info_nce, masked_l1, normalized_pixel_target
from repro.masking import draw_noise, len_keep_mae, random_masking
from repro.method import MAE_DECAY, Batch, MethodConfig, PretrainMethod, StepInfo, StepOutput
from repro.momentum import ema_update_, momentum_copy
from repro.views import BYOL_VIEW2, NONE, ViewSpec


@dataclass(frozen=True, kw_only=True)
class MACRLConfig(MethodConfig):
    mask_ratio_strong: float = 0.75
    """Branch 1 (strong augmentation) mask ratio."""
    mask_ratio_weak: float = 0.5
    """Branch 2 (weak augmentation) mask ratio."""
    temperature: float = 0.2
    momentum: float = 0.999
    """Key-encoder momentum (fixed, MoCo v2)."""  # ASSUMPTION(3)
    bank_size: int = 65536  # ASSUMPTION(7): the ImageNet size; recipes on small data keep it below the train set
    """FIFO memory bank of negatives (keys)."""
    proj_hidden: int = 2048
    proj_dim: int = 128
    recon_weight: float = 1.0
    """lambda in loss = contrastive + lambda (L1_1 + L1_2)."""
    norm_pix_loss: bool = False  # ASSUMPTION(5): the view's pixels, no per-patch normalisation
    decoder_dim: int = 512  # ASSUMPTION(6): decoders and optimisation as MAE's
    decoder_depth: int = 8
    decoder_heads: int = 16
    crop_scale: tuple[float, float] = (0.2, 1.0)
    batch_size: int = 4096
    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    epochs: float = 800.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("mask_ratio_strong", "mask_ratio_weak"):
            if not 0.0 < getattr(self, k) < 1.0:
                raise ConfigError(f"method.{k} must be in (0, 1), got {getattr(self, k)}")
        if self.bank_size < 1 or self.temperature <= 0:
            raise ConfigError("method.bank_size must be >= 1 and method.temperature > 0")
        if self.decoder_dim % self.decoder_heads != 0 or self.decoder_dim % 4 != 0:
            raise ConfigError("method.decoder_dim must be divisible by decoder_heads and by 4")


class MemoryBank(nn.Module):
    """FIFO queue of L2-normalised keys (buffers, so checkpoints and calibration snapshots include it)."""

    keys: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Overwrite the oldest entries with ``keys`` (n, dim), in order; the pointer wraps around."""
        bank = self.keys
        size = bank.shape[0]
        keys = F.normalize(keys.detach().to(bank.dtype), dim=1)[-size:]
        idx = (self.ptr + torch.arange(keys.shape[0], device=bank.device)) % size
        bank[idx] = keys
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


class MACRL(PretrainMethod):
    name = "macrl"
    config_cls = MACRLConfig
    weight_decay_rule = MAE_DECAY  # ASSUMPTION(6)
    cfg: MACRLConfig

    def __init__(self, cfg: MACRLConfig, backbone: MaskedViT) -> None:
        super().__init__(cfg, backbone)
        n, d = backbone.num_patches, backbone.embed_dim
        self.keep = (len_keep_mae(n, cfg.mask_ratio_strong), len_keep_mae(n, cfg.mask_ratio_weak))
        if min(self.keep) < 1:
            raise ConfigError(f"method mask ratios keep no patch of {n}")
        self.decoders = nn.ModuleList(
            MAEDecoder.for_backbone(backbone, dim=cfg.decoder_dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads)
            for _ in range(2))
        # ASSUMPTION(3): MoCo v2's 2-layer projector
        self.projector = nn.Sequential(nn.Linear(d, cfg.proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(cfg.proj_hidden, cfg.proj_dim))
        self.key_backbone = momentum_copy(backbone)
        self.key_projector = momentum_copy(self.projector)
        self.bank = MemoryBank(cfg.bank_size, cfg.proj_dim)
        self._pending: Tensor | None = None

    @classmethod
    def backbone_options(cls, cfg: MethodConfig) -> BackboneOptions:
        # ASSUMPTION(6): MAE-style encoder (fixed sin-cos positions, MAE init), as the decoders and optimisation
        return BackboneOptions(pos_embed="sincos", init="mae")

    @property
    def views(self) -> ViewSpec:
        # ASSUMPTION(4): strong = BYOL's second view, weak = crop + flip; both MAE's crop
        return ViewSpec(count=2, scale=self.cfg.crop_scale, photometric=(BYOL_VIEW2, NONE))

    def controlled_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        n = self.backbone.num_patches
        return {"noise": (torch.rand(batch_size, n, generator=generator),
                          torch.rand(batch_size, n, generator=generator))}

    def forward(self, batch: Batch, step: StepInfo, *, noise: tuple[Tensor, Tensor] | None = None) -> StepOutput:
        bb = self.backbone
        c = self.cfg
        logs: dict[str, Tensor] = {}
        queries, keys, recon = [], [], []
        for i, x in enumerate(batch.views):
            m = random_masking(draw_noise(x.shape[0], bb.num_patches, x.device, None if noise is None else noise[i]),
                               self.keep[i])
            latent = bb.forward_visible(x, m.ids_keep)
            queries.append(self.projector(latent[:, 0]))
            with torch.no_grad():  # ASSUMPTION(2): the key branch encodes the same visible tokens
                keys.append(self.key_projector(self.key_backbone.forward_visible(x, m.ids_keep)[:, 0]))
            target = patchify(x, bb.patch_size)
            if c.norm_pix_loss:
                target = normalized_pixel_target(target)
            recon.append(masked_l1(self.decoders[i](latent, m.ids_restore), target, m.mask))
        bank = self.bank.keys
        # ASSUMPTION(1): symmetrised; both key sets enqueued after the optimizer step
        ctr = 0.5 * (bank_info_nce(queries[0], keys[1], bank, c.temperature)
                     + bank_info_nce(queries[1], keys[0], bank, c.temperature))
        rec = c.recon_weight * (recon[0] + recon[1])
        # enqueued after the optimizer step: the bank is still needed by this step's backward
        self._pending = distributed.all_gather(torch.cat(keys, dim=0))
        logs = {"contrastive": ctr.detach(), "l1_weighted": rec.detach(), "aux/l1_strong": recon[0].detach(),
                "aux/l1_weak": recon[1].detach()}
        return StepOutput(ctr + rec, logs)

    def after_optimizer_step(self, step: StepInfo) -> None:
        ema_update_(self.key_backbone, self.backbone, self.cfg.momentum)
        ema_update_(self.key_projector, self.projector, self.cfg.momentum)
        if self._pending is not None:
            self.bank.enqueue(self._pending)
            self._pending = None

    def flops_per_image(self) -> float:
        bb, c = self.backbone, self.cfg
        n, d, e = bb.num_patches, bb.embed_dim, c.decoder_dim
        total = 0.0
        for k in self.keep:
            blocks = encoder_flops(k + 1, d, bb.depth)
            proj = linear_flops(1, d, c.proj_hidden) + linear_flops(1, c.proj_hidden, c.proj_dim)
            dec = (linear_flops(k + 1, d, e) + encoder_flops(n + 1, e, c.decoder_depth)
                   + linear_flops(n, e, bb.patch_size ** 2 * 3))
            bank = 2.0 * c.bank_size * c.proj_dim
            momentum = patch_embed_flops(n, bb.patch_size, d) + blocks + proj
            # bank logits: forward + the query side's gradient (the bank has none)
            total += embed_train_flops(bb) + TRAIN * (blocks + proj + dec) + 2.0 * bank + FORWARD * momentum
        return total
