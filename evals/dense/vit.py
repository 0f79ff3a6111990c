"""Our ViT export as an OpenMMLab backbone, the ViTDet simple feature pyramid, and the pieces around them.

Imported only inside the dense-eval process (it needs mmengine/mmcv); everything is registered in mmengine's
root registries, so the same names resolve under the ``mmseg`` and ``mmdet`` scopes and in the native configs
(``custom_imports = dict(imports=['evals.dense.vit'])``).

- ``ReproViT``: the timm model named in ``backbone.json``, loaded strictly from ``backbone.safetensors`` (missing,
  unexpected or mis-shaped keys are an error), position embedding interpolated to the input size on the fly (timm
  ``dynamic_img_size``), features taken from blocks L/3, L/2, 2L/3, L *before* the final norm (MAE/BEiT), made
  contiguous, optionally resampled to strides 4/8/16/32 (BEiT's ``fpn1..4``: ConvT-BN-GELU-ConvT, ConvT, identity,
  max-pool for ViT-B/16). Its ``init_weights`` never touches the loaded ViT: OpenMMLab's recursive
  ``init_weights`` would otherwise call timm's own initialiser and silently evaluate random weights.
- ``ReproSimpleFPN``: ViTDet's simple feature pyramid from the last block (strides 4..32 + a max-pooled 64).
- ``ReproLN2d``: LayerNorm over channels of an NCHW map (ViTDet's heads and pyramid).
- ``ReproLayerDecayOptimizerConstructor``: MAE/BEiT layer-wise lr decay (same rule as ``evals.finetune``).
- ``ReproCheckSegMap``: rejects ADE20K label maps with values outside 0..150 (+255), naming the file.
- ``ReproCheckBackboneHook``: before the first iteration, asserts that the backbone holds the export's weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.transforms import BaseTransform
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS, TRANSFORMS
from torch import Tensor, nn

from evals.dense.options import DenseError, check_geometry, read_geometry, vit_geometry
from repro.export import EXPORT_WEIGHTS, load_strict, read_export


def build_export_vit(export: str | Path, drop_path_rate: float = 0.0) -> tuple[nn.Module, dict[str, Tensor]]:
    """The export's timm ViT with its weights loaded strictly, accepting any input size; also the raw tensors."""
    from repro.backbone import create_timm_model

    read_geometry(Path(export))  # a plain timm ViT whose pyramid can reach strides 4..32, or a DenseError
    meta, state = read_export(Path(export))
    vit = create_timm_model(meta.timm_model, dict(meta.timm_kwargs, dynamic_img_size=True,
                                                  drop_path_rate=drop_path_rate))
    load_strict(vit, state, str(Path(export) / EXPORT_WEIGHTS))
    return vit, state


@MODELS.register_module()
class ReproLN2d(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def _resampler(factor: float, channels: int, norm_cfg: dict, halve: bool) -> tuple[nn.Module, int]:
    """Up-sample by ConvTranspose(2, 2) steps (norm + GELU between steps) or max-pool down; returns (op, out ch)."""
    if factor == 1:
        return nn.Identity(), channels
    if factor < 1:
        k = round(1 / factor)
        if 2 ** round(math.log2(k)) != k:
            raise DenseError(f"rescale {factor} is not a power of two")
        return nn.MaxPool2d(kernel_size=k, stride=k), channels
    steps = round(math.log2(factor))
    if 2 ** steps != factor:
        raise DenseError(f"rescale {factor} is not a power of two")
    layers: list[nn.Module] = []
    c = channels
    for i in range(steps):
        out = c // 2 if halve else c
        if i:
            layers += [build_norm_layer(norm_cfg, c)[1], nn.GELU()]
        layers.append(nn.ConvTranspose2d(c, out, kernel_size=2, stride=2))
        c = out
    return nn.Sequential(*layers), c


@MODELS.register_module()
class ReproViT(nn.Module):
    """A ``repro`` export (``backbone.safetensors`` + ``backbone.json``) as a multi-level ViT backbone."""

    def __init__(self, export: str | None = None, out_indices: list[int] | tuple[int, ...] = (),
                 rescales: list[float] | tuple[float, ...] = (), drop_path_rate: float = 0.0,
                 norm_cfg: dict | None = None) -> None:
        super().__init__()
        if not export:
            raise DenseError("model.backbone.export is not set: pass --export DIR to the launcher, or "
                             "--cfg-options model.backbone.export=DIR to OpenMMLab's tools")
        self.export = str(export)
        vit, _ = build_export_vit(export, drop_path_rate)
        self.geometry = vit_geometry(vit)
        check_geometry(self.geometry, self.export)
        depth = self.geometry.depth
        self.out_indices = [int(i) for i in (out_indices or self.geometry.out_indices())]
        if any(not 0 <= i < depth for i in self.out_indices):
            raise DenseError(f"{export}: out_indices {self.out_indices} outside the export's {depth} blocks")
        if rescales and len(rescales) != len(self.out_indices):
            raise DenseError(f"rescales {list(rescales)} and out_indices {self.out_indices} differ in length")
        # Blocks after the last tapped one and the final norm are never used: drop them, so no parameter is idle
        # under DDP and the optimizer holds only what trains.
        vit.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)  # type: ignore[operator]
        self.vit = vit
        norm_cfg = norm_cfg or dict(type="SyncBN", requires_grad=True)
        self.pyramid = nn.ModuleList([_resampler(float(f), self.geometry.embed_dim, norm_cfg, halve=False)[0]
                                      for f in rescales])

    def init_weights(self) -> None:
        """Initialise only the pyramid; the ViT keeps the export's weights (never timm's init)."""
        for m in self.pyramid.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        taps = sorted(set(self.out_indices))  # shallow models may tap one block twice (depth 4: 0, 1, 1, 3)
        outs = self.vit.forward_intermediates(  # type: ignore[operator]
            x, indices=taps, norm=False, output_fmt="NCHW", intermediates_only=True)
        by_block = dict(zip(taps, outs, strict=True))
        feats = [by_block[i] for i in self.out_indices]
        if len(self.pyramid):
            feats = [op(f) for op, f in zip(self.pyramid, feats, strict=True)]
        return tuple(f.contiguous() for f in feats)


@MODELS.register_module()
class ReproSimpleFPN(nn.Module):
    """ViTDet's simple feature pyramid: one stride-p map -> strides 4, 8, 16, 32 (+ 64 by max-pool), C channels."""

    def __init__(self, in_channels: int, out_channels: int = 256, rescales: list[float] | tuple[float, ...] = (
            4.0, 2.0, 1.0, 0.5), norm_cfg: dict | None = None, num_outs: int = 5) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type="ReproLN2d")
        self.stages = nn.ModuleList()
        for f in rescales:
            op, c = _resampler(float(f), in_channels, norm_cfg, halve=True)
            self.stages.append(nn.Sequential(
                op,
                nn.Conv2d(c, out_channels, kernel_size=1, bias=False), build_norm_layer(norm_cfg, out_channels)[1],
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                build_norm_layer(norm_cfg, out_channels)[1]))
        if num_outs not in (len(rescales), len(rescales) + 1):
            raise DenseError(f"ReproSimpleFPN: num_outs {num_outs} must be {len(rescales)} or {len(rescales) + 1}")
        self.num_outs = num_outs

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = inputs[-1]
        outs = [stage(x) for stage in self.stages]
        if self.num_outs > len(outs):
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))  # ViTDet's LastLevelMaxPool
        return tuple(outs)


def layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit`` on our names: embeddings 0, block i -> i + 1, the rest (pyramid, heads) L + 1."""
    if name.startswith("backbone.vit."):
        rest = name[len("backbone.vit."):]
        if rest.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "mask_token")):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       depth: int) -> list[dict[str, Any]]:
    """Parameter groups with ``lr = lr * layer_decay^(L + 1 - layer_id)``; no decay on 1-D tensors and tokens."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith((".bias", "pos_embed", "cls_token", "reg_token"))
        lid = layer_id(name, depth)
        g = groups.setdefault((lid, no_decay), dict(params=[], names=[], layer_id=lid,
                                                    lr=lr * layer_decay ** (depth + 1 - lid),
                                                    weight_decay=0.0 if no_decay else weight_decay))
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ReproLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """AdamW with MAE/BEiT layer-wise lr decay over a ``ReproViT`` backbone (``paramwise_cfg.layer_decay``)."""

    def __call__(self, model: nn.Module) -> Any:
        if is_model_wrapper(model):
            model = model.module  # type: ignore[assignment]
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, ReproViT):
            raise DenseError("ReproLayerDecayOptimizerConstructor needs model.backbone to be a ReproViT")
        decay = float(self.paramwise_cfg.get("layer_decay", 1.0))
        cfg = self.optimizer_cfg.copy()
        groups = layer_decay_groups(model, float(self.base_lr), float(self.base_wd or 0.0), decay,
                                    backbone.geometry.depth)
        for g in groups:
            g.pop("names")
        cfg["params"] = groups
        optimizer = OPTIMIZERS.build(cfg)
        return OPTIM_WRAPPERS.build(self.optim_wrapper_cfg, default_args=dict(optimizer=optimizer))


@TRANSFORMS.register_module()
class ReproCheckSegMap(BaseTransform):
    """After ``LoadAnnotations(reduce_zero_label=True)``: every label must be in 0..num_classes-1 or ignore."""

    def __init__(self, num_classes: int = 150, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def transform(self, results: dict) -> dict:
        seg = results["gt_seg_map"]
        bad = (seg >= self.num_classes) & (seg != self.ignore_index)
        if bad.any():
            raw = int(seg[bad].max()) + (1 if results.get("reduce_zero_label") else 0)
            raise DenseError(f"{results.get('seg_map_path')}: label value {raw} outside 0..{self.num_classes} "
                             f"(and {self.ignore_index}); ADE20K annotations are uint8 PNGs with 0 = ignored, "
                             f"1..{self.num_classes} = classes")
        return results


@HOOKS.register_module()
class ReproCheckBackboneHook(Hook):
    """Fail before training if the backbone does not hold the export's weights (e.g. re-initialised by mm*)."""

    priority = "VERY_HIGH"

    def before_train(self, runner: Any) -> None:
        if runner.iter != 0:
            return  # resumed: the weights are the run's own
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        backbone = model.backbone
        _, state = read_export(Path(backbone.export))
        own = backbone.vit.state_dict()
        differ = [k for k, v in own.items() if not torch.equal(v.detach().cpu().float(), state[k].float())]
        if differ:
            raise DenseError(f"{backbone.export}: {len(differ)} backbone tensors differ from the export after model "
                             f"initialisation ({', '.join(differ[:3])}, ...); refusing to train on changed weights")
