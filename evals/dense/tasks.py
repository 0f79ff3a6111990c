"""The dense tasks, one :class:`~evals.dense.options.DenseTask` record each, with what only that task needs: its
recipes, pipelines, ``--cfg-options`` and lr schedule. A new task is a record here (and its functions) plus its
native mmengine config (ARCHITECTURE.md, "Add a dense task"). Nothing here imports mm* at module level.

- ADE20K semantic segmentation: UperNet with mmsegmentation, the MAE/BEiT recipe (``python -m evals.segmentation``).
- COCO detection and instance segmentation: Mask R-CNN with mmdet, the ViTDet recipe (``python -m evals.detection``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evals.dense.data import ADE_IGNORE, ADE_NUM_CLASSES, check_ade_root, check_coco_root
from evals.dense.options import DenseJob, DenseRecipe, DenseTask, warmup

EVALS_DIR = Path(__file__).resolve().parents[1]


# ADE20K -------------------------------------------------------------------------------------------------------------

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


def ade_schedule(r: DenseRecipe) -> list[dict[str, Any]]:
    """Linear warm-up from 1e-6, then linear (poly 1.0) decay to 0 (MAE/BEiT)."""
    warm, sched = warmup(r, start_factor=1e-6)
    if warm < r.iters:
        sched.append(dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=warm, end=r.iters))
    return sched


def ade_options(job: DenseJob) -> dict[str, Any]:
    """UperNet on the four-level pyramid (blocks L/3, L/2, 2L/3, L), sliding-window test, ADE20K's layout."""
    r, g = job.recipe, job.geometry
    channels = r.head_channels or g.embed_dim
    train, test = seg_pipelines(r)
    prefix = {s: dict(img_path=f"images/{d}", seg_map_path=f"annotations/{d}")
              for s, d in (("train", job.train_split), ("val", job.val_split))}
    opts: dict[str, Any] = {
        "model.backbone.out_indices": list(g.out_indices()),
        "model.backbone.rescales": list(g.rescales()),
        "param_scheduler": ade_schedule(r),
        "model.data_preprocessor.size": (r.crop, r.crop),
        "model.decode_head.in_channels": [g.embed_dim] * 4,
        "model.decode_head.channels": channels,
        "model.auxiliary_head.in_channels": g.embed_dim,
        "model.auxiliary_head.channels": max(channels // 2, 16) if r.head_channels else 256,
        "model.test_cfg": dict(mode="slide", crop_size=(r.crop, r.crop), stride=(r.crop * 2 // 3, r.crop * 2 // 3)),
        "train_dataloader.dataset.pipeline": train,
        "train_dataloader.dataset.data_prefix": prefix["train"],
    }
    for s in ("val", "test"):
        opts[f"{s}_dataloader.dataset.pipeline"] = test
        opts[f"{s}_dataloader.dataset.data_prefix"] = prefix["val"]
    return opts


ADE20K = DenseTask(
    name="ade20k", module="evals.segmentation", config=EVALS_DIR / "segmentation" / "configs" / "upernet_vit_ade20k.py",
    mm_package="mmseg", requires=("mmengine", "mmcv", "mmseg"), data_hint="ADEChallengeData2016 folder",
    splits=("training", "validation"), recipes=SEG_RECIPES, metrics={"mIoU": ("mIoU", 1.0), "mAcc": ("mAcc", 1.0)},
    check_data=check_ade_root, options=ade_options)


# COCO ---------------------------------------------------------------------------------------------------------------

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


def coco_schedule(r: DenseRecipe) -> list[dict[str, Any]]:
    """Linear warm-up from 1e-3, then the lr x0.1 at the recipe's fractions of training (ViTDet)."""
    _, sched = warmup(r, start_factor=1e-3)
    sched.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=r.iters, gamma=0.1,
                      milestones=[int(round(f * r.iters)) for f in r.lr_steps]))
    return sched


def coco_options(job: DenseJob) -> dict[str, Any]:
    """Mask R-CNN on the simple feature pyramid of the last block (ViTDet), COCO's layout and evaluator."""
    r, g = job.recipe, job.geometry
    channels = r.head_channels or g.embed_dim
    train, test = det_pipelines(r)
    opts: dict[str, Any] = {
        "model.backbone.out_indices": [g.depth - 1],
        "model.backbone.rescales": [],
        "param_scheduler": coco_schedule(r),
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
    }
    for s in ("val", "test"):
        opts[f"{s}_dataloader.dataset.pipeline"] = test
        opts[f"{s}_dataloader.dataset.ann_file"] = f"annotations/instances_{job.val_split}.json"
        opts[f"{s}_dataloader.dataset.data_prefix"] = dict(img=f"{job.val_split}/")
        opts[f"{s}_evaluator.ann_file"] = str(job.data_root / "annotations" / f"instances_{job.val_split}.json")
    return opts


def coco_classes() -> tuple[str, ...]:
    """The 80 class names mmdet's CocoDataset trains and scores (imports mmdet, so the mmcv shim first)."""
    from evals.dense.mmcv_ext import install

    install()
    from mmdet.datasets import CocoDataset

    return tuple(CocoDataset.METAINFO["classes"])


def check_coco(root: Path, train_split: str, val_split: str) -> dict[str, int]:
    """:func:`~evals.dense.data.check_coco_root` against the classes the detector predicts."""
    return check_coco_root(root, train_split, val_split, coco_classes())


def coco_metrics(job: DenseJob, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
    """mmdet's CocoMetric returns nothing when no box scored above score_thr on the whole split; COCO AP of an empty
    detection list over annotated images is 0."""
    if any(k.startswith("coco/") for k in metrics):
        return metrics, ""
    return ({**metrics, **{key: 0.0 for key, _ in COCO.metrics.values()}},
            f"no detection scored above {job.recipe.score_thr:g} on {job.val_split}: AP is 0")


COCO = DenseTask(
    name="coco", module="evals.detection", config=EVALS_DIR / "detection" / "configs" / "mask_rcnn_vit_coco.py",
    mm_package="mmdet", requires=("mmengine", "mmcv", "mmdet", "pycocotools"),
    data_hint="COCO folder with annotations/instances_<split>.json and <split>/ images",
    splits=("train2017", "val2017"), recipes=DET_RECIPES,
    metrics={"box_AP": ("coco/bbox_mAP", 100.0), "mask_AP": ("coco/segm_mAP", 100.0)},
    check_data=check_coco, options=coco_options, fill_metrics=coco_metrics)


TASKS: dict[str, DenseTask] = {t.name: t for t in (ADE20K, COCO)}
"""Every dense evaluation by name: ``evals.registry`` lists each, ``repro.run`` checks each before training."""
