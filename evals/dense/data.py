"""Checks of the ADE20K and COCO layouts before any training starts (no mm* import).

Each problem is one :class:`~evals.dense.options.DenseError` line naming the file or folder. Label maps are
also checked while training (``ReproCheckSegMap``), so a bad file beyond the scanned sample still stops the run
with its name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from evals.dense.options import DenseError

ADE_NUM_CLASSES = 150
"""ADE20K's classes: label values 1..150 (0 = unlabelled, ignored)."""
ADE_IGNORE = 255
"""The label value the loss and the metric ignore (unlabelled 0 becomes 255 under ``reduce_zero_label``)."""
SCAN_LIMIT = 500
"""Label maps per split checked up front (all of them for small datasets)."""


def ade_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label map) pairs of one split: ``images/<split>/X.jpg`` + ``annotations/<split>/X.png``."""
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DenseError(f"{d}: missing (ADE20K layout: ADEChallengeData2016/images/<split>/*.jpg and "
                             "annotations/<split>/*.png)")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg")
    if not images:
        raise DenseError(f"{img_dir}: no .jpg images")
    pairs = []
    for img in images:
        ann = ann_dir / f"{img.stem}.png"
        if not ann.is_file():
            raise DenseError(f"{ann}: missing label map for {img.name}")
        pairs.append((img, ann))
    return pairs


def check_ade_label_map(path: Path) -> None:
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DenseError(f"{path}: label map has mode {im.mode}; ADE20K annotations are single-channel "
                                 "uint8 PNGs")
            a = np.asarray(im)
    except OSError as e:
        raise DenseError(f"{path}: unreadable label map ({e})") from None
    bad = (a > ADE_NUM_CLASSES) & (a != ADE_IGNORE)
    if bad.any():
        raise DenseError(f"{path}: label value {int(a[bad].max())} outside 0..{ADE_NUM_CLASSES} (and "
                         f"{ADE_IGNORE}); ADE20K annotations use 0 = ignored, 1..{ADE_NUM_CLASSES} = classes")


def check_ade_root(root: Path, train_split: str, val_split: str) -> dict[str, int]:
    """Validate an ADEChallengeData2016 folder; returns the number of images per split."""
    root = Path(root)
    if not root.is_dir():
        raise DenseError(f"{root}: ADE20K root does not exist")
    counts = {}
    for split in dict.fromkeys((train_split, val_split)):
        pairs = ade_pairs(root, split)
        step = max(1, len(pairs) // SCAN_LIMIT)
        for _, ann in pairs[::step]:
            check_ade_label_map(ann)
        counts[split] = len(pairs)
    return counts


def check_coco_root(root: Path, train_split: str, val_split: str,
                    class_names: tuple[str, ...] | None = None) -> dict[str, int]:
    """Validate a COCO folder (``annotations/instances_<split>.json`` + ``<split>/``); returns images per split.

    ``class_names``: the classes the detector predicts (mmdet's COCO 80); every one must be a category.
    """
    root = Path(root)
    if not root.is_dir():
        raise DenseError(f"{root}: COCO root does not exist")
    counts = {}
    for split in dict.fromkeys((train_split, val_split)):
        ann = root / "annotations" / f"instances_{split}.json"
        img_dir = root / split
        if not ann.is_file():
            raise DenseError(f"{ann}: missing (COCO layout: annotations/instances_<split>.json + <split>/*.jpg)")
        if not img_dir.is_dir():
            raise DenseError(f"{img_dir}: missing image folder for {ann.name}")
        try:
            d = json.loads(ann.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DenseError(f"{ann}: unreadable COCO JSON ({e})") from None
        if not isinstance(d, dict):
            raise DenseError(f"{ann}: not a COCO instances file (top level is not an object)")
        missing = [k for k in ("images", "annotations", "categories") if k not in d]
        if missing:
            raise DenseError(f"{ann}: not a COCO instances file: no {', '.join(repr(k) for k in missing)} "
                             "(box/mask training and evaluation need images, annotations and categories)")
        if not d["images"]:
            raise DenseError(f"{ann}: no images")
        if class_names is not None:
            absent_cls = sorted(set(class_names) - {c.get("name") for c in d["categories"]})
            if absent_cls:
                raise DenseError(f"{ann}: {len(absent_cls)} of the {len(class_names)} COCO classes are not in "
                                 f"'categories' (e.g. {', '.join(absent_cls[:3])}); the harness trains and scores "
                                 "the 80 COCO classes")
        ids = {im.get("id") for im in d["images"]}
        cats = {c.get("id") for c in d["categories"]}
        for a in d["annotations"]:
            if a.get("image_id") not in ids:
                raise DenseError(f"{ann}: annotation {a.get('id')} refers to image_id {a.get('image_id')}, "
                                 "which is not in 'images'")
            if a.get("category_id") not in cats:
                raise DenseError(f"{ann}: annotation {a.get('id')} has category_id {a.get('category_id')}, "
                                 "which is not in 'categories'")
            if "bbox" not in a or "segmentation" not in a:
                raise DenseError(f"{ann}: annotation {a.get('id')} lacks 'bbox' or 'segmentation' "
                                 "(Mask R-CNN needs both)")
        absent = [str(im.get("file_name", f"(image {im.get('id')} has no file_name)")) for im in d["images"]
                  if not (img_dir / str(im.get("file_name", ""))).is_file()]
        if absent:
            raise DenseError(f"{img_dir / absent[0]}: image listed in {ann.name} is missing "
                             f"({len(absent)} of {len(d['images'])} missing)")
        counts[split] = len(d["images"])
    return counts
