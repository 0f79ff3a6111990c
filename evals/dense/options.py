"""Everything the dense evaluations pass to mmseg/mmdet, built by one typed function (no mm* import here).

The native mmengine configs in ``evals/segmentation/configs`` and ``evals/detection/configs`` hold the papers'
recipes and run as they are with OpenMMLab's own tools. The launchers never edit them: they start from them
and apply the flat ``--cfg-options``-style dictionary that :func:`cfg_options` builds from a :class:`DenseJob`
(export geometry, data location, recipe, device, world size). That dictionary is the whole interface between
this project and mm*, and it is unit-tested in the core environment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from repro.checkpoint import read_export

TASKS = ("ade20k", "coco")
"""Eval names as they appear in result records (``eval`` field) and in ``repro.run --evals``."""

ADE_NUM_CLASSES = 150
ADE_IGNORE = 255


class DenseError(ValueError):
    """A bad dense-eval input (export, data, recipe, option), reported as one line."""


@dataclass(frozen=True, kw_only=True)
class DenseRecipe:
    """One training schedule for a dense task. The paper recipes' values cite their source."""

    name: str
    task: str
    iters: int
    """Training iterations (optimizer steps)."""
    batch_size: int
    """Global batch (images per iteration over all processes)."""
    lr: float
    """AdamW learning rate for the whole model (before layer decay)."""
    weight_decay: float
    layer_decay: float
    """Block i of L gets lr x layer_decay^(L + 1 - (i + 1)); embeddings layer_decay^(L + 1); heads x1."""
    warmup_iters: int
    crop: int
    """Training crop (ADE20K: square crop; COCO: the LSJ canvas, also the test pad size)."""
    drop_path: float
    checkpoint_interval: int
    """Iterations between mmengine checkpoints (the run resumes from the last one)."""
    workers: int
    """DataLoader workers per process."""
    head_channels: int | None = None
    """UperNet channels (None = the ViT width, as MAE's/BEiT's ADE20K configs) / FPN channels for COCO."""
    lr_steps: tuple[float, ...] = ()
    """COCO: fractions of ``iters`` where the lr drops x0.1 (ViTDet); ADE20K uses linear (poly 1.0) decay."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random resize range (ADE20K: of 2048x512; COCO LSJ: of the crop)."""
    test_scale: tuple[int, int] = (2048, 512)
    """ADE20K: single-scale test resize (long, short), keep ratio; COCO: unused (test = crop)."""
    log_interval: int = 50
    score_thr: float = 0.05
    """COCO: minimum detection score kept at test time (0.05 in Mask R-CNN/ViTDet)."""


SEG_RECIPES: dict[str, DenseRecipe] = {
    # MAE appendix A.4 / BEiT semantic-segmentation config (mmseg configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k):
    # UperNet, 512x512 crops, 160k iterations, batch 16, AdamW lr 1e-4, wd 0.05, layer decay 0.65, warmup 1500,
    # drop path 0.1, single-scale mIoU.
    "ade20k": DenseRecipe(name="ade20k", task="ade20k", iters=160_000, batch_size=16, lr=1e-4, weight_decay=0.05,
                          layer_decay=0.65, warmup_iters=1500, crop=512, drop_path=0.1, checkpoint_interval=16_000,
                          workers=4),
    # CI smoke: a few iterations on tiny crops; checks the plumbing, not the number.
    "tiny": DenseRecipe(name="tiny", task="ade20k", iters=2, batch_size=2, lr=1e-4, weight_decay=0.05,
                        layer_decay=0.65, warmup_iters=0, crop=64, drop_path=0.0, checkpoint_interval=1_000_000,
                        workers=0, head_channels=32, test_scale=(128, 64), log_interval=1),
}

DET_RECIPES: dict[str, DenseRecipe] = {
    # ViTDet (Li et al. 2022) Mask R-CNN, ViT-B, 100 epochs as MAE's COCO transfer: 1024x1024 large-scale jitter
    # (scale 0.1-2.0), batch 64, 184,375 iterations, AdamW lr 1e-4, wd 0.1, layer decay 0.7, drop path 0.1,
    # 250 warmup iterations, lr x0.1 at 88.9% and 96.3% of training.
    "coco": DenseRecipe(name="coco", task="coco", iters=184_375, batch_size=64, lr=1e-4, weight_decay=0.1,
                        layer_decay=0.7, warmup_iters=250, crop=1024, drop_path=0.1, checkpoint_interval=10_000,
                        workers=4, head_channels=256, lr_steps=(163_889 / 184_375, 177_546 / 184_375),
                        scale_range=(0.1, 2.0)),
    "tiny": DenseRecipe(name="tiny", task="coco", iters=2, batch_size=2, lr=1e-4, weight_decay=0.1, layer_decay=0.7,
                        warmup_iters=0, crop=128, drop_path=0.0, checkpoint_interval=1_000_000, workers=0,
                        head_channels=32, lr_steps=(0.9,), scale_range=(0.5, 1.5), log_interval=1,
                        score_thr=0.0),
}


def recipes_for(task: str) -> dict[str, DenseRecipe]:
    if task not in TASKS:
        raise DenseError(f"unknown dense task {task!r} (choose from {', '.join(TASKS)})")
    return SEG_RECIPES if task == "ade20k" else DET_RECIPES


@dataclass(frozen=True, kw_only=True)
class ViTGeometry:
    """What the adapter and heads need to know about an export (read from ``backbone.json``)."""

    depth: int
    embed_dim: int
    patch_size: int

    def out_indices(self) -> tuple[int, ...]:
        """Blocks feeding the pyramid: 4/6/8/12 (1-based) for ViT-B, 8/12/16/24 for ViT-L, i.e. L/3, L/2, 2L/3, L."""
        d = self.depth
        return (d // 3 - 1, d // 2 - 1, 2 * d // 3 - 1, d - 1)

    def rescales(self) -> tuple[float, ...]:
        """Resampling factors from the patch grid to strides 4, 8, 16, 32 (ViT-B/16: 4, 2, 1, 0.5)."""
        return tuple(self.patch_size / s for s in (4, 8, 16, 32))


def vit_geometry(vit: Any) -> ViTGeometry:
    """Depth, width and patch size of a timm ``VisionTransformer`` (real or on the meta device)."""
    p = vit.patch_embed.patch_size
    return ViTGeometry(depth=len(vit.blocks), embed_dim=int(vit.embed_dim),
                       patch_size=int(p[0] if isinstance(p, tuple | list) else p))


def check_geometry(g: ViTGeometry, where: str) -> None:
    p = g.patch_size
    if p < 2 or p & (p - 1):
        raise DenseError(f"{where}: patch size {p} is not a power of two >= 2; the feature pyramid resamples "
                         "the patch grid to strides 4/8/16/32 by factors of two")
    if g.depth < 3:
        raise DenseError(f"{where}: depth {g.depth} < 3 blocks; the pyramid taps blocks L/3, L/2, 2L/3 and L")


def read_geometry(export: Path) -> ViTGeometry:
    """Depth, width and patch size of an export's ViT, built on the meta device (no weights read)."""
    import timm.models.vision_transformer as tv

    from repro.backbone import create_timm_model

    meta, _ = read_export(export, weights=False)
    try:
        with torch.device("meta"):
            vit = create_timm_model(meta.timm_model, dict(meta.timm_kwargs))
    except Exception as e:  # noqa: BLE001
        raise DenseError(f"{export}: cannot build timm model {meta.timm_model!r} ({e})") from None
    if not isinstance(vit, tv.VisionTransformer):
        raise DenseError(f"{export}: {meta.timm_model} is a {type(vit).__name__}, not a timm VisionTransformer; "
                         "the dense evals take plain ViT exports")
    g = vit_geometry(vit)
    check_geometry(g, str(export))
    return g


@dataclass(frozen=True, kw_only=True)
class DenseJob:
    """One dense evaluation of one export."""

    task: str
    export: Path
    data_root: Path
    work_dir: Path
    recipe: DenseRecipe
    geometry: ViTGeometry
    train_split: str
    val_split: str
    seed: int = 0
    cuda: bool = False
    world_size: int = 1

    def with_recipe(self, **changes: Any) -> DenseJob:
        return replace(self, recipe=replace(self.recipe, **changes))


def _schedule(r: DenseRecipe) -> list[dict[str, Any]]:
    # mmengine's LinearLR reaches its end factor only after end - begin >= 2 steps; shorter warm-ups are skipped,
    # and a run no longer than its warm-up is all warm-up.
    warm = min(r.warmup_iters, r.iters) if r.warmup_iters >= 2 and r.iters >= 2 else 0
    sched: list[dict[str, Any]] = []
    if warm:
        sched.append(dict(type="LinearLR", start_factor=1e-6 if r.task == "ade20k" else 1e-3, by_epoch=False,
                          begin=0, end=warm))
    if r.task == "ade20k":
        if warm < r.iters:
            sched.append(dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=warm, end=r.iters))
    else:
        sched.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=r.iters, gamma=0.1,
                          milestones=[int(round(f * r.iters)) for f in r.lr_steps]))
    return sched


def seg_pipelines(r: DenseRecipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """MAE/BEiT ADE20K pipelines (train, test) at the recipe's sizes; labels 1..150 -> 0..149, 0 -> ignored."""
    crop = (r.crop, r.crop)
    train: list[dict[str, Any]] = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="ReproCheckSegMap", num_classes=ADE_NUM_CLASSES, ignore_index=ADE_IGNORE),
        dict(type="RandomResize", scale=r.test_scale, ratio_range=r.scale_range, keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        dict(type="PackSegInputs"),
    ]
    test: list[dict[str, Any]] = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=r.test_scale, keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="ReproCheckSegMap", num_classes=ADE_NUM_CLASSES, ignore_index=ADE_IGNORE),
        dict(type="PackSegInputs"),
    ]
    return train, test


def det_pipelines(r: DenseRecipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """ViTDet large-scale jitter (train) and resize-longest-side (test) at the recipe's canvas size.

    Test images are padded to the canvas by the data preprocessor (``pad_size_divisor`` = canvas, zeros after
    normalisation, as ViTDet), not by a ``Pad`` transform: that one would move ``img_shape`` to the padded size,
    so boxes predicted in the padding escape clipping and mmdet's CPU mask paste fails on them."""
    size = (r.crop, r.crop)
    train: list[dict[str, Any]] = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="RandomResize", scale=size, ratio_range=r.scale_range, keep_ratio=True),
        dict(type="RandomCrop", crop_type="absolute_range", crop_size=size, recompute_bbox=True,
             allow_negative_crop=True),
        dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    test: list[dict[str, Any]] = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=size, keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    return train, test


def cfg_options(job: DenseJob) -> dict[str, Any]:
    """The flat ``--cfg-options`` dictionary (dotted keys) applied on top of the task's native config."""
    r, g = job.recipe, job.geometry
    if r.task != job.task:
        raise DenseError(f"recipe {r.name!r} is for {r.task}, not {job.task}")
    if r.iters < 1 or r.batch_size < 1:
        raise DenseError(f"recipe {r.name!r}: iters and batch_size must be >= 1")
    if r.batch_size % job.world_size:
        raise DenseError(f"recipe {r.name!r}: global batch {r.batch_size} is not divisible by {job.world_size} "
                         "processes")
    check_geometry(g, str(job.export))
    per_gpu = r.batch_size // job.world_size
    channels = r.head_channels or g.embed_dim
    workers = dict(num_workers=r.workers, persistent_workers=r.workers > 0)
    opts: dict[str, Any] = {
        "work_dir": str(job.work_dir),
        "randomness": dict(seed=job.seed, deterministic=False),
        "model.backbone.export": str(job.export),
        "model.backbone.out_indices": list(g.out_indices()) if job.task == "ade20k" else [g.depth - 1],
        "model.backbone.rescales": list(g.rescales()) if job.task == "ade20k" else [],
        "model.backbone.drop_path_rate": r.drop_path,
        "train_cfg": dict(type="IterBasedTrainLoop", max_iters=r.iters, val_interval=r.iters + 1),
        "optim_wrapper": dict(
            _delete_=True, type="AmpOptimWrapper" if job.cuda else "OptimWrapper",
            **(dict(dtype="bfloat16") if job.cuda else {}),
            optimizer=dict(type="AdamW", lr=r.lr, betas=(0.9, 0.999), weight_decay=r.weight_decay),
            constructor="ReproLayerDecayOptimizerConstructor",
            paramwise_cfg=dict(layer_decay=r.layer_decay)),
        "param_scheduler": _schedule(r),
        "default_hooks.checkpoint": dict(type="CheckpointHook", by_epoch=False, interval=r.checkpoint_interval,
                                         max_keep_ckpts=1, save_last=True),
        "default_hooks.logger": dict(type="LoggerHook", interval=r.log_interval, log_metric_by_epoch=False),
        "train_dataloader.batch_size": per_gpu,
        "train_dataloader.dataset.data_root": str(job.data_root),
        "val_dataloader.dataset.data_root": str(job.data_root),
        "test_dataloader.dataset.data_root": str(job.data_root),
        "resume": True,
        "load_from": None,
    }
    for split in ("train", "val", "test"):
        for k, v in workers.items():
            opts[f"{split}_dataloader.{k}"] = v
    if job.task == "ade20k":
        train, test = seg_pipelines(r)
        prefix = {s: dict(img_path=f"images/{d}", seg_map_path=f"annotations/{d}")
                  for s, d in (("train", job.train_split), ("val", job.val_split))}
        opts.update({
            "model.data_preprocessor.size": (r.crop, r.crop),
            "model.decode_head.in_channels": [g.embed_dim] * 4,
            "model.decode_head.channels": channels,
            "model.auxiliary_head.in_channels": g.embed_dim,
            "model.auxiliary_head.channels": max(channels // 2, 16) if r.head_channels else 256,
            "model.test_cfg": dict(mode="slide", crop_size=(r.crop, r.crop),
                                   stride=(r.crop * 2 // 3, r.crop * 2 // 3)),
            "train_dataloader.dataset.pipeline": train,
            "train_dataloader.dataset.data_prefix": prefix["train"],
        })
        for s in ("val", "test"):
            opts[f"{s}_dataloader.dataset.pipeline"] = test
            opts[f"{s}_dataloader.dataset.data_prefix"] = prefix["val"]
    else:
        train, test = det_pipelines(r)
        opts.update({
            "model.neck.in_channels": g.embed_dim,
            "model.neck.out_channels": channels,
            "model.neck.rescales": list(g.rescales()),
            "model.test_cfg.rcnn.score_thr": r.score_thr,
            "model.rpn_head.in_channels": channels,
            "model.rpn_head.feat_channels": channels,
            "model.roi_head.bbox_roi_extractor.out_channels": channels,
            "model.roi_head.bbox_head.in_channels": channels,
            "model.roi_head.bbox_head.conv_out_channels": channels,
            "model.roi_head.mask_roi_extractor.out_channels": channels,
            "model.roi_head.mask_head.in_channels": channels,
            "model.roi_head.mask_head.conv_out_channels": channels,
            "model.data_preprocessor.pad_size_divisor": r.crop,
            "model.data_preprocessor.batch_augments": [dict(type="BatchFixedSizePad", size=(r.crop, r.crop),
                                                            pad_mask=True)],
            "train_dataloader.dataset.pipeline": train,
            "train_dataloader.dataset.ann_file": f"annotations/instances_{job.train_split}.json",
            "train_dataloader.dataset.data_prefix": dict(img=f"{job.train_split}/"),
        })
        for s in ("val", "test"):
            opts[f"{s}_dataloader.dataset.pipeline"] = test
            opts[f"{s}_dataloader.dataset.ann_file"] = f"annotations/instances_{job.val_split}.json"
            opts[f"{s}_dataloader.dataset.data_prefix"] = dict(img=f"{job.val_split}/")
            opts[f"{s}_evaluator.ann_file"] = str(job.data_root / "annotations" / f"instances_{job.val_split}.json")
    return opts
