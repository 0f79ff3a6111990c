"""Small generated datasets in the exact ADE20K and COCO layouts, and a small ViT export, for the dense tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import timm
from PIL import Image

from repro.export import ExportMeta, export_backbone

COCO_CATEGORIES = [(1, "person", "person"), (3, "car", "vehicle"), (18, "dog", "animal")]
"""The categories the generated objects use; the JSON lists all of ``coco_category_names`` (COCO's 80)."""


def make_export(out: Path, *, patch: int = 8, depth: int = 3, dim: int = 64, img: int = 32, seed: int = 0,
                model: str = "vit_tiny_patch16_224", dataset: str = "fixture-data") -> Path:
    """A random-init timm ViT saved as a ``repro`` export (weights + backbone.json)."""
    import torch

    torch.manual_seed(seed)
    kwargs = dict(img_size=img, patch_size=patch, depth=depth, embed_dim=dim, num_heads=2, num_classes=0)
    vit = timm.create_model(model, pretrained=False, **kwargs)
    meta = ExportMeta(timm_model=model, timm_kwargs=kwargs, img_size=img, patch_size=patch, mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225), method="fixture", steps=0, budget="-", budget_seconds=None,
                      config_hash="fixture", git_revision="", dataset=dataset, seed=seed)
    export_backbone(out, vit.state_dict(), meta)
    return out


def _scene(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """An RGB image with ``n`` coloured rectangles; returns the image and (class, x, y, w, h) per rectangle."""
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    boxes = []
    for _ in range(n):
        bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        c = int(rng.integers(0, 3))
        img[y:y + bh, x:x + bw] = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)][c], dtype=np.uint8)
        boxes.append((c, x, y, bw, bh))
    return img, boxes


def make_ade(root: Path, *, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (72, 96), seed: int = 0) -> Path:
    """``root/images/{training,validation}/*.jpg`` + ``root/annotations/.../*.png`` (uint8, 0 = other, 1..150)."""
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, boxes = _scene(rng, *size, n=3)
            seg = np.full(size, 1 if i % 2 else 0, dtype=np.uint8)  # "wall" or ignored background
            for c, x, y, bw, bh in boxes:
                seg[y:y + bh, x:x + bw] = (5, 13, 150)[c]
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(img).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(seg, mode="L").save(root / "annotations" / split / f"{stem}.png")
    return root


def make_coco(root: Path, class_names: tuple[str, ...], *, splits: tuple[str, ...] = ("train2017", "val2017"),
              n: int = 4, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """``root/annotations/instances_<split>.json`` + ``root/<split>/*.jpg`` with polygon masks (COCO schema)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for s, split in enumerate(splits):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img, boxes = _scene(rng, *size, n=3)
            img_id = 1000 * (s + 1) + i
            name = f"{img_id:012d}.jpg"
            Image.fromarray(img).save(root / split / name, quality=95)
            images.append(dict(id=img_id, file_name=name, height=size[0], width=size[1]))
            for c, x, y, bw, bh in boxes:
                poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
                anns.append(dict(id=ann_id, image_id=img_id, category_id=COCO_CATEGORIES[c][0],
                                 bbox=[x, y, bw, bh], area=float(bw * bh), iscrowd=0,
                                 segmentation=[[float(v) for v in poly]]))
                ann_id += 1
        used = {nm: i for i, nm, _ in COCO_CATEGORIES}
        spare = iter(i for i in range(1, 200) if i not in used.values())
        cats = [dict(id=used[nm] if nm in used else next(spare), name=nm, supercategory="thing")
                for nm in class_names]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(dict(images=images, annotations=anns, categories=cats, info={}, licenses=[])))
    return root
