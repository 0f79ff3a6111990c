"""Datasets and the batch sources the trainer draws from.

Layouts read:
- **built-in** (no ``--data``): procedural shapes, 10 classes, 32 px, deterministic from a seed; colours and
  lighting come from small sets shared by every class (:func:`make_shapes`). Needs no download.
- **ImageFolder**: ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/...`` or ``ROOT/test/...``.
- **CIFAR-10/100 python pickles** (``data_batch_1..5``/``test_batch`` or ``train``/``test``), read with an
  unpickler that only admits the numpy array types those files contain.

Small images (<= 64 px, ``data.in_memory=auto``) are decoded once into a uint8 tensor (:class:`TensorImages`);
larger ones stay files (:class:`FileImages`). How either becomes training batches is ``repro.sources``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from repro.config import DataConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SMALL_IMAGE_MAX = 64
BUILTIN_CLASSES = ("disk", "square", "triangle", "ring", "cross", "plus", "diamond", "hstripes", "vstripes",
                   "checker")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the path."""


@dataclass
class TensorImages:
    """A split decoded into memory: uint8 images (N, 3, H, W) and int64 labels (N,)."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class FileImages:
    """A split streamed from disk: one path and label per image."""

    paths: list[str]
    labels: Tensor
    classes: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.paths)


Split = TensorImages | FileImages


@dataclass
class DatasetSplits:
    name: str
    """Short dataset name used in records and result tables (e.g. 'builtin-shapes', 'cifar10')."""
    train: Split
    test: Split
    test_split_name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorImages)

    @property
    def native_size(self) -> int | None:
        return int(self.train.images.shape[-1]) if isinstance(self.train, TensorImages) else None


# ----------------------------------------------------------------------------------------- built-in data


BUILTIN_PALETTE = ((220, 50, 47), (38, 139, 210), (133, 153, 0), (181, 137, 0), (211, 54, 130), (42, 161, 152),
                   (238, 232, 213), (40, 40, 40))
"""The colours every class draws its foreground and background from (two different ones per image)."""
BUILTIN_GRADIENTS = 4
"""Background lighting directions shared by every class (0, 90, 180, 270 degrees)."""


def make_shapes(n: int, seed: int, size: int = 32) -> TensorImages:
    """``n`` procedural images: a shape class (disk, square, ..., stripes, checker) at a random position and scale.

    The nuisance factors are shared across classes and drawn from small sets: foreground and background are two
    different colours of :data:`BUILTIN_PALETTE` (56 ordered pairs), lighting one of :data:`BUILTIN_GRADIENTS`
    directions, plus pixel noise. So colour says nothing about the class, and it cannot single out an image either:
    about 1 in 224 images shares an image's colours and lighting, and two views of one image can only be matched
    beyond that by the shape. (The first version drew colours per image from a continuum, which let instance
    discrimination match views by colour alone and learn nothing about the classes.) Balanced classes,
    deterministic from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    k = len(BUILTIN_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    xx, yy = xx[None], yy[None]  # (1, S, S)

    def u(lo: float, hi: float) -> Tensor:
        return torch.empty(n, 1, 1).uniform_(lo, hi, generator=g)

    c = size / 32.0
    cx, cy, r = u(11 * c, 21 * c), u(11 * c, 21 * c), u(6 * c, 10 * c)
    dx, dy = xx - cx, yy - cy
    d = torch.sqrt(dx ** 2 + dy ** 2)
    cheb = torch.maximum(dx.abs(), dy.abs())
    freq, phase, cell = u(0.5, 1.1), u(0, 2 * math.pi), torch.randint(3, 7, (n, 1, 1), generator=g).float()
    masks = torch.stack([
        d < r,
        cheb < 0.8 * r,
        (dy < 0.75 * r) & (dx.abs() < 0.55 * (dy + 0.9 * r)),
        (d < r) & (d > 0.55 * r),
        (torch.minimum((dx - dy).abs(), (dx + dy).abs()) < 0.3 * r) & (cheb < r),
        ((dx.abs() < 0.28 * r) | (dy.abs() < 0.28 * r)) & (cheb < r),
        dx.abs() + dy.abs() < r,
        torch.sin(yy * freq + phase) > 0,
        torch.sin(xx * freq + phase) > 0,
        ((torch.floor(xx / cell) + torch.floor(yy / cell)) % 2) == 0,
    ], dim=1)  # (n, k, S, S)
    mask = masks[torch.arange(n), labels].float().unsqueeze(1)  # (n, 1, S, S)
    palette = torch.tensor(BUILTIN_PALETTE, dtype=torch.float32)  # (P, 3)
    p = palette.shape[0]
    fg_i = torch.randint(0, p, (n,), generator=g)
    bg_i = (fg_i + torch.randint(1, p, (n,), generator=g)) % p  # never the foreground's colour
    fg, bg = palette[fg_i].view(n, 3, 1, 1), palette[bg_i].view(n, 3, 1, 1)
    angle = torch.randint(0, BUILTIN_GRADIENTS, (n, 1, 1, 1), generator=g).float() * (2 * math.pi / BUILTIN_GRADIENTS)
    mid = (size - 1) / 2  # lighting centred on the image: a direction does not also darken the whole image
    grad = (torch.cos(angle) * (xx[:, None] - mid) + torch.sin(angle) * (yy[:, None] - mid)) / size  # (n, 1, S, S)
    img = bg * (1 - mask) + fg * mask + 40 * grad + 12 * torch.randn(n, 3, size, size, generator=g)
    return TensorImages(img.round().clamp(0, 255).to(torch.uint8), labels.long(), list(BUILTIN_CLASSES))


# ----------------------------------------------------------------------------------------- CIFAR pickles


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python pickles hold (dicts, lists, bytes, numpy arrays); anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure is a bad data file
        raise DataError(f"{path}: not a readable CIFAR pickle ({e})") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar_root(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (cand / "data_batch_1").is_file() or ((cand / "train").is_file() and (cand / "meta").is_file()):
            return cand
    return None


def load_cifar(root: Path) -> tuple[str, TensorImages, TensorImages]:
    if (root / "data_batch_1").is_file():
        meta = _load_cifar_file(root / "batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta["label_names"]]
        files = sorted(root.glob("data_batch_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        parts = [_load_cifar_file(p) for p in files]
        test = [_load_cifar_file(root / "test_batch")]
        key, name = "labels", "cifar10"
    else:
        meta = _load_cifar_file(root / "meta")
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta["fine_label_names"]]
        parts, test = [_load_cifar_file(root / "train")], [_load_cifar_file(root / "test")]
        key, name = "fine_labels", "cifar100"

    def stack(batches: list[dict], where: str) -> TensorImages:
        try:
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
        except KeyError as e:
            raise DataError(f"{root}: CIFAR {where} pickle lacks key {e}") from None
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{root}: CIFAR {where} data has shape {data.shape}, expected (N, 3072)")
        imgs = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        return TensorImages(imgs, torch.from_numpy(labels), classes)

    return name, stack(parts, "train"), stack(test, "test")


# ----------------------------------------------------------------------------------------- ImageFolder


def _scan_split(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    names = [p.name for p in class_dirs]
    if classes is None:
        classes = names
    else:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DataError(f"{split_dir}: class folders not in train/: {', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for cdir in class_dirs:
        files = sorted(f for f in cdir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{cdir}: empty class folder (no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS[:3])} images)")
        paths += [str(f) for f in files]
        labels += [index[cdir.name]] * len(files)
    return paths, labels, classes


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")  # grayscale, CMYK, RGBA and palette images become RGB


def _decode_all(paths: list[str], policy: str) -> tuple[Tensor, list[int], int]:
    """Decode small images into (N, 3, H, W) uint8; returns the tensor, kept indices and the skipped count."""

    def one(i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, np.asarray(_open_rgb(paths[i]), dtype=np.uint8), None
        except Exception as e:  # noqa: BLE001 - corrupt/truncated/unreadable files all end here
            return i, None, f"{type(e).__name__}: {e}"

    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, range(len(paths)), chunksize=256))
    arrays: list[np.ndarray] = []
    kept: list[int] = []
    skipped = 0
    shape = None
    for i, arr, err in results:
        if arr is None:
            if policy == "fail":
                raise DataError(f"{paths[i]}: cannot decode image ({err})")
            skipped += 1
            if skipped <= 5:
                warnings.warn(f"skipping unreadable image {paths[i]} ({err})", stacklevel=2)
            continue
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise DataError(f"{paths[i]}: size {arr.shape[1]}x{arr.shape[0]} differs from {shape[1]}x{shape[0]}; "
                            "the in-memory path needs one size (use data.in_memory=no to stream)")
        arrays.append(arr)
        kept.append(i)
    if not arrays:
        raise DataError(f"{Path(paths[0]).parent.parent}: no readable image")
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return stacked, kept, skipped


def _image_size(paths: list[str], policy: str) -> tuple[int, int]:
    """Size of the first image that opens; an unreadable one is passed over (or, with 'fail', named)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                return im.size
        except Exception as e:  # noqa: BLE001 - a corrupt first file must not be a traceback
            if policy == "fail":
                raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    raise DataError(f"{Path(paths[0]).parent.parent}: no readable image")


def load_imagefolder(root: Path, cfg: DataConfig) -> DatasetSplits:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder (expected ImageFolder: train/<class>/*, val/ or test/)")
    test_name = next((n for n in ("val", "test") if (root / n).is_dir()), None)
    if test_name is None:
        raise DataError(f"{root}: no val/ or test/ folder beside train/")
    tr_paths, tr_labels, classes = _scan_split(train_dir, None)
    te_paths, te_labels, _ = _scan_split(root / test_name, classes)
    w, h = _image_size(tr_paths, cfg.bad_images)
    small = max(w, h) <= SMALL_IMAGE_MAX
    in_memory = cfg.in_memory == "yes" or (cfg.in_memory == "auto" and small)
    name = root.name or "imagefolder"
    splits: list[Split] = []
    for paths, labels in ((tr_paths, tr_labels), (te_paths, te_labels)):
        if in_memory:
            imgs, kept, skipped = _decode_all(paths, cfg.bad_images)
            lab = torch.tensor(labels, dtype=torch.long)[torch.tensor(kept, dtype=torch.long)]
            splits.append(TensorImages(imgs, lab, classes, skipped))
        else:
            splits.append(FileImages(paths, torch.tensor(labels, dtype=torch.long), classes))
    return DatasetSplits(name, splits[0], splits[1], test_name)


def load_data(cfg: DataConfig) -> DatasetSplits:
    """Resolve ``data.path`` (None = built-in) into train and test splits, with a one-line error when unusable."""
    if cfg.path is None:
        train = make_shapes(cfg.builtin_train, seed=cfg.builtin_seed)
        test = make_shapes(cfg.builtin_test, seed=cfg.builtin_seed + 1)
        return DatasetSplits("builtin-shapes", train, test, "test")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: data path does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data path is not a directory")
    cifar = _cifar_root(root)
    if cifar is not None:
        name, train, test = load_cifar(cifar)
        return DatasetSplits(name, train, test, "test")
    if not any(root.iterdir()):
        raise DataError(f"{root}: data directory is empty")
    return load_imagefolder(root, cfg)


class _FileDataset(torch.utils.data.Dataset):
    """Items are indices or (index, seed) pairs; ``load(path, seed)`` makes the sample. A file that cannot be read
    is skipped (the next index) with a warning, or named (``policy='fail'``)."""

    def __init__(self, split: FileImages, load, policy: str) -> None:
        self.split, self.load, self.policy = split, load, policy

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        for attempt in range(len(self.split)):
            j = (i + attempt) % len(self.split)
            path = self.split.paths[j]
            try:
                out = self.load(path, seed)
            except Exception as e:  # noqa: BLE001 - corrupt/truncated/unreadable files all end here
                if self.policy == "fail":
                    raise DataError(f"{path}: cannot decode image ({e})") from None
                log.warning("skipping unreadable image %s (%s)", path, e)
                continue
            return out, int(self.split.labels[j])
        raise DataError("no readable image in the dataset")


def pil_load(transform):
    """A ``_FileDataset`` loader: the RGB PIL image through ``transform``, as a tuple of views."""
    def load(path: str, seed: int) -> tuple:
        out = transform(_open_rgb(path))
        return out if isinstance(out, tuple) else (out,)
    return load


def balanced_indices(labels: Tensor, num_classes: int, n: int, seed: int = 0,
                     among: Tensor | None = None) -> Tensor:
    """Sorted indices of a class-balanced ``n`` of ``labels`` (``n // classes`` per class, the rest to the first
    classes; a class with too few gives all it has), drawn with a generator fixed by ``seed``, from the positions
    ``among`` (default: all)."""
    pool = torch.arange(len(labels)) if among is None else among
    order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    quota = torch.full((num_classes,), n // num_classes, dtype=torch.long)
    quota[: n % num_classes] += 1
    keep = [order[labels[order] == c][: int(quota[c])] for c in range(num_classes)]
    return torch.cat(keep).sort().values


def take(split: Split, idx: Tensor) -> Split:
    """The images of ``split`` at positions ``idx``, in that order."""
    if isinstance(split, TensorImages):
        return TensorImages(split.images[idx], split.labels[idx], split.classes, split.skipped)
    return FileImages([split.paths[i] for i in idx.tolist()], split.labels[idx], split.classes, split.skipped)


def balanced_subset(split: Split, n: int) -> Split:
    """A class-balanced subset of ``n`` images (:func:`balanced_indices`, seed 0) that depends on the split alone;
    ``n`` = 0 or >= the split's size returns it whole."""
    if n <= 0 or n >= len(split):
        return split
    return take(split, balanced_indices(split.labels, len(split.classes), n))


def held_out_of_subset(split: Split, subset: int, n: int) -> Split | None:
    """A class-balanced ``n`` of the images :func:`balanced_subset` (``subset``) leaves out, fixed by the split
    alone; None when no subset was taken or fewer than ``n`` images are left."""
    if subset <= 0 or len(split) - subset < n or n < 1:
        return None
    inside = torch.zeros(len(split), dtype=torch.bool)
    inside[balanced_indices(split.labels, len(split.classes), subset)] = True
    outside = torch.nonzero(~inside).flatten()
    return take(split, balanced_indices(split.labels, len(split.classes), n, seed=1, among=outside))
