"""Batch sources: where the trainer's augmented batches come from (the datasets themselves are in ``repro.data``).

- :class:`TensorBatchSource` — small images (<= 64 px) decoded once into a uint8 tensor on the training device;
  crops, flips and photometric ops are made there in batches (:class:`repro.views.TensorAugment`).
- :class:`StreamBatchSource` — ImageFolder images at full resolution, streamed through DataLoader workers. How a
  worker turns a file into a crop is ``data.decode``:

  ``fast`` (default)
      The worker reads the file header, draws the RandomResizedCrop boxes on the full-size geometry, decodes the
      JPEG at the smallest DCT scale (1/2, 1/4, 1/8, PIL ``draft``) that keeps every crop at least ``size`` px
      on each side — the resize after it stays a downscale, as in the plain pipeline — then crops and resizes
      with torch's antialiased bicubic on uint8 (PIL's filter, about 4x faster here) and flips. Workers send
      uint8 crops (4x fewer bytes than floats) through pinned memory; photometric ops and normalisation run
      batched on the training device, as on the in-memory path.
  ``pil``
      The plain per-image torchvision pipeline (full decode, PIL crop/resize, PIL photometric ops, float tensors
      from the workers): what the suite did before, kept as the reference the tests and ``repro.bench`` compare
      against.
  ``gpu``
      Workers only read the bytes and draw the crop boxes from the header; JPEGs are decoded in one batched
      ``torchvision.io.decode_jpeg`` call on the training device (nvJPEG on CUDA), cropped, resized and
      augmented there. Non-JPEG files are decoded by the worker with PIL. On a CPU device the same code runs
      with libjpeg-turbo, which is how it is tested without a GPU.

Every image's crop randomness comes from a seed that depends on (run seed, step, rank, position in the batch),
not on which worker draws it: a streamed run sees the same crops with any worker count and after a resume.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from repro.config import DataConfig
from repro.data import DataError, DatasetSplits, FileImages, Split, TensorImages, _FileDataset, _open_rgb
from repro.method import Batch
from repro.seeds import epoch_seed, image_seed
from repro.views import TensorAugment, ViewSpec, apply_photometric, normalize_uint8, pil_view_transform

log = logging.getLogger(__name__)

DECODE_MODES = ("fast", "pil", "gpu")
DCT_REDUCTIONS = (8, 4, 2, 1)
"""The JPEG DCT scalings PIL's ``draft`` can decode at (1/8 ... 1/1)."""


def auto_workers() -> int:
    """``data.num_workers=-1``: the cores this process may use, shared by the processes on this node
    (``LOCAL_WORLD_SIZE`` under torchrun), less one for the training loop; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // local - 1)


def resolve_workers(n: int) -> int:
    return auto_workers() if n < 0 else n


# ---------------------------------------------------------------------------------------------- sampling


class StepSampler:
    """Which images step ``s`` uses on this rank: a pure function of (seed, epoch), drop-last batches."""

    def __init__(self, num_images: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise DataError(f"train.batch_size={global_batch} is not divisible by the {world_size} processes")
        if global_batch > num_images:
            raise DataError(f"train.batch_size={global_batch} is larger than the training set ({num_images} images);"
                            " set train.batch_size")
        self.n, self.global_batch, self.seed = num_images, global_batch, seed
        self.rank, self.world = rank, world_size
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = num_images // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch`` (a CPU tensor; drawn from a CPU generator on every device)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, first position in that epoch's permutation) of this rank's slice of step ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return epoch, i * self.global_batch + self.rank * self.local_batch

    def indices(self, step: int) -> Tensor:
        epoch, start = self.locate(step)
        return self.permutation(epoch)[start:start + self.local_batch]

    def image_seeds(self, step: int) -> list[int]:
        """One seed per image of this rank's slice of step ``step``: its crops depend on it alone."""
        first = self.rank * self.local_batch
        return [image_seed(self.seed, step, first + j) for j in range(self.local_batch)]


# ------------------------------------------------------------------------------------------- batch sources


class TensorBatchSource:
    """Augmented batches from a uint8 image tensor that lives on the training device."""

    def __init__(self, split: TensorImages, spec: ViewSpec, size: int, mean, std, sampler: StepSampler,
                 device: torch.device) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.augment = TensorAugment(spec, size, mean, std)
        self.sampler = sampler
        self.device = device
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> Batch:
        # the epoch's order is copied to the device once: a per-step copy of the indices would sync the host
        epoch, start = self.sampler.locate(step)
        if epoch != self._epoch:
            self._perm, self._epoch = self.sampler.permutation(epoch).to(self.device), epoch
        idx = self._perm[start:start + self.sampler.local_batch]
        return Batch(self.augment(self.images[idx]), self.labels[idx])

    def batches(self, start: int, stop: int) -> Iterator[Batch]:
        for s in range(start, stop):
            yield self.batch(s)


def crop_count(spec: ViewSpec) -> int:
    """Distinct crops per image: one when the views share it (or there is one view), else one per view."""
    return 1 if spec.count == 1 or spec.shared_crop else spec.count


@dataclass(frozen=True)
class CropPlan:
    """One image's crops in its full-size pixel grid: boxes (k, 4: x0, y0, w, h) and flips (k,)."""

    boxes: Tensor
    flips: Tensor


def random_resized_box(rng: random.Random, height: int, width: int, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """One RandomResizedCrop box (x0, y0, w, h): torchvision's sampler (10 tries, then a centre crop with the
    ratio clamped), drawn from ``rng`` — the per-image form of :func:`repro.views.sample_crop_boxes`."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return float(rng.randint(0, width - w)), float(rng.randint(0, height - h)), float(w), float(h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return float(round((width - w) / 2)), float(round((height - h) / 2)), float(w), float(h)


def plan_crops(spec: ViewSpec, height: int, width: int, seed: int) -> CropPlan:
    """RandomResizedCrop boxes and flips for one image, from ``seed`` alone (no global RNG is touched; plain Python:
    a few microseconds, where tensor ops on 4 numbers cost a few hundred)."""
    rng = random.Random(seed)
    k = crop_count(spec)
    boxes = [random_resized_box(rng, height, width, spec.scale, spec.ratio) for _ in range(k)]
    flips = [rng.random() < spec.hflip for _ in range(k)]
    return CropPlan(torch.tensor(boxes, dtype=torch.float64), torch.tensor(flips))


def dct_reduction(boxes: Tensor, size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that leaves every crop at least ``size`` px on each side."""
    return reduction_for(float(boxes[:, 2:].min()), size)


def reduction_for(side: float, size: int) -> int:
    """The largest DCT reduction that keeps a ``side``-px extent at least ``size`` px (1 when none does)."""
    return next(r for r in DCT_REDUCTIONS if r == 1 or side / r >= size)


def resize_crop(image: Tensor, box: tuple[float, float, float, float], size: int, flip: bool, mode: str) -> Tensor:
    """Crop ``box`` (x0, y0, w, h; may be fractional) out of a (3, H, W) image and resize it to size x size with
    the antialiased filter PIL uses; uint8 in, uint8 out (float in, float out)."""
    x0, y0, w, h = box
    H, W = image.shape[-2:]
    l, t = max(0, min(W - 1, round(x0))), max(0, min(H - 1, round(y0)))
    r, b = max(l + 1, min(W, round(x0 + w))), max(t + 1, min(H, round(y0 + h)))
    crop = image[None, :, t:b, l:r]
    out = F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)
    if out.dtype.is_floating_point:
        out = out.clamp_(0, 255)
    out = out[0]
    return out.flip(-1) if flip else out


def read_file(path: str) -> bytes:
    """An encoded image's bytes (the streamed path's first stage; ``repro.bench.data_stages`` times it alone)."""
    with open(path, "rb") as f:
        return f.read()


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image from its header alone (what a crop is planned from before decoding)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


@dataclass
class Decoded:
    """One image decoded for its crops: pixels (3, H', W') uint8 at the chosen DCT scale, and its crop plan in the
    full-size grid with the scale from there to the decoded grid."""

    image: Tensor
    plan: CropPlan
    sx: float
    sy: float


def decode_for_crops(data: bytes, spec: ViewSpec, size: int, seed: int, *, reduce: bool = True) -> Decoded:
    """Read the header, draw the crops, decode at the smallest DCT scale every crop allows (``data.decode=fast``).

    A JPEG at full scale is decoded by torchvision's libjpeg-turbo binding (no PIL image in between); a reduced
    one by PIL's ``draft``; other formats by PIL."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        plan = plan_crops(spec, height, width, seed)
        r = dct_reduction(plan.boxes, size) if reduce else 1
        if r == 1 and im.format == "JPEG" and im.mode in ("RGB", "L"):
            image = _decode_jpeg_rgb(data)
        else:
            if r > 1:  # decode at 1/r of the size (JPEG only; other formats ignore it)
                im.draft("RGB", (width // r, height // r))
            im.load()
            # (H, W, 3) viewed as (3, H, W): channels-last memory, torch's fast uint8 resize path
            image = torch.from_numpy(np.array(im.convert("RGB") if im.mode != "RGB" else im)).permute(2, 0, 1)
    return Decoded(image, plan, image.shape[2] / width, image.shape[1] / height)


def _decode_jpeg_rgb(data: bytes) -> Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def crops_of(d: Decoded, size: int, mode: str) -> tuple[Tensor, ...]:
    """The uint8 crops (3, size, size) of a decoded image, one per :func:`crop_count`."""
    out = []
    for (x0, y0, w, h), flip in zip(d.plan.boxes.tolist(), d.plan.flips.tolist(), strict=True):
        out.append(resize_crop(d.image, (x0 * d.sx, y0 * d.sy, w * d.sx, h * d.sy), size, bool(flip), mode))
    return tuple(out)


def fast_crops(data: bytes, spec: ViewSpec, size: int, seed: int, *, reduce: bool = True) -> tuple[Tensor, ...]:
    """``data.decode=fast`` for one encoded image: uint8 crops (3, size, size), one per :func:`crop_count`."""
    return crops_of(decode_for_crops(data, spec, size, seed, reduce=reduce), size, spec.interpolation)


class _PilLoad:
    """``data.decode=pil``: torchvision's per-image pipeline, its RNG seeded per image."""

    def __init__(self, spec: ViewSpec, size: int, mean, std) -> None:
        self.transform = pil_view_transform(spec, size, mean, std)

    def __call__(self, path: str, seed: int) -> tuple[Tensor, ...]:
        img = _open_rgb(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.transform(img)
        return out if isinstance(out, tuple) else (out,)


class _FastLoad:
    def __init__(self, spec: ViewSpec, size: int) -> None:
        self.spec, self.size = spec, size

    def __call__(self, path: str, seed: int) -> tuple[Tensor, ...]:
        return fast_crops(read_file(path), self.spec, self.size, seed)


@dataclass
class Encoded:
    """``data.decode=gpu``: one image as its file bytes (JPEG) or, for other formats, pixels decoded by the worker."""

    path: str
    data: Tensor
    """uint8: the encoded bytes (1-D) when ``jpeg``, else the decoded image (3, H, W)."""
    jpeg: bool
    plan: CropPlan


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


class _BytesLoad:
    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec

    def __call__(self, path: str, seed: int) -> Encoded:
        data = read_file(path)
        width, height = header_size(data)
        plan = plan_crops(self.spec, height, width, seed)
        if _is_jpeg(data):
            return Encoded(path, torch.frombuffer(bytearray(data), dtype=torch.uint8), True, plan)
        arr = np.asarray(_open_rgb(path))
        return Encoded(path, torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), False, plan)


def _collate_encoded(items: list[tuple[Encoded, int]]) -> tuple[list[Encoded], Tensor]:
    return [e for e, _ in items], torch.tensor([label for _, label in items], dtype=torch.long)


def decode_on_device(items: list[Encoded], device: torch.device, policy: str) -> list[Tensor]:
    """Decode a batch's JPEGs on ``device`` in one call (nvJPEG on CUDA); one that fails is retried alone, then with
    PIL on the CPU; a file nothing can decode is named (``fail``) or replaced by the batch's previous image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [i for i, e in enumerate(items) if e.jpeg]
    out: list[Tensor | None] = [None if e.jpeg else e.data.to(device, non_blocking=True) for e in items]
    if jpegs:
        try:
            decoded = decode_jpeg([items[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(items[i].data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    try:
                        arr = np.asarray(_open_rgb(items[i].path))
                        decoded.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device))
                    except Exception as e:  # noqa: BLE001
                        if policy == "fail" or len(items) == 1:
                            raise DataError(f"{items[i].path}: cannot decode image ({e})") from None
                        log.warning("skipping unreadable image %s (%s)", items[i].path, e)
                        decoded.append(None)  # type: ignore[arg-type]
        for i, img in zip(jpegs, decoded, strict=True):
            out[i] = img
    for i in range(len(out)):  # a failed image takes its neighbour's pixels (and crops)
        if out[i] is None:
            out[i] = out[i - 1] if i > 0 and out[i - 1] is not None else next(o for o in out if o is not None)
    return out  # type: ignore[return-value]


class _StepItems(torch.utils.data.Sampler):
    """Step ``s``'s batch as (index, seed) pairs."""

    def __init__(self, sampler: StepSampler, start: int, stop: int) -> None:
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        for s in range(self.start, self.stop):
            yield list(zip(self.sampler.indices(s).tolist(), self.sampler.image_seeds(s), strict=True))

    def __len__(self) -> int:
        return self.stop - self.start


class DeviceViews:
    """The device half of a streamed view: uint8 crops (n, 3, S, S) -> photometric corruption -> normalised
    floats, one tensor per view (views that share a crop get their own photometric draw)."""

    def __init__(self, spec: ViewSpec, mean, std) -> None:
        self.spec = spec
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, crops: list[Tensor]) -> tuple[Tensor, ...]:
        views = []
        for i in range(self.spec.count):
            v = crops[i if len(crops) > 1 else 0].float().div_(255.0)
            v = apply_photometric(v, self.spec.view_photometric(i))
            views.append((v - self.mean.to(v)) / self.std.to(v))
        return tuple(views)


class StreamBatchSource:
    """ImageFolder images at full resolution through DataLoader workers; ``decode`` is ``data.decode``."""

    def __init__(self, split: FileImages, spec: ViewSpec, size: int, mean, std, sampler: StepSampler,
                 device: torch.device, num_workers: int, policy: str, decode: str = "fast") -> None:
        if decode not in DECODE_MODES:
            raise DataError(f"data.decode must be one of {'|'.join(DECODE_MODES)}, got {decode!r}")
        self.spec, self.size, self.decode, self.policy = spec, size, decode, policy
        self.sampler, self.device, self.num_workers = sampler, device, resolve_workers(num_workers)
        load = {"pil": lambda: _PilLoad(spec, size, mean, std), "fast": lambda: _FastLoad(spec, size),
                "gpu": lambda: _BytesLoad(spec)}[decode]()
        self.dataset = _FileDataset(split, load, policy)
        self.views = DeviceViews(spec, mean, std)

    def _loader(self, start: int, stop: int):
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_StepItems(self.sampler, start, stop), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
            collate_fn=_collate_encoded if self.decode == "gpu" else None,
        )

    def _to_device(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)

    def _gpu_crops(self, items: list[Encoded]) -> list[Tensor]:
        images = decode_on_device(items, self.device, self.policy)
        k = crop_count(self.spec)
        per_crop: list[list[Tensor]] = [[] for _ in range(k)]
        for img, e in zip(images, items, strict=True):
            x = img.float()
            for c, (box, flip) in enumerate(zip(e.plan.boxes.tolist(), e.plan.flips.tolist(), strict=True)):
                per_crop[c].append(resize_crop(x, tuple(box), self.size, bool(flip), self.spec.interpolation))
        return [torch.stack(c).round_() for c in per_crop]  # the uint8 grid of the other paths, kept as float

    def batches(self, start: int, stop: int) -> Iterator[Batch]:
        try:
            for views, labels in self._loader(start, stop):
                labels = self._to_device(labels)
                if self.decode == "pil":
                    yield Batch(tuple(self._to_device(v) for v in views), labels)
                elif self.decode == "fast":
                    yield Batch(self.views([self._to_device(v) for v in views]), labels)
                else:
                    yield Batch(self.views(self._gpu_crops(views)), labels)
        except DataError as e:  # a worker's error comes back with its traceback in the message: keep the last line
            raise DataError(str(e).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")) \
                from None


def make_batch_source(data: DatasetSplits, spec: ViewSpec, size: int, sampler: StepSampler, device: torch.device,
                      cfg: DataConfig):
    if isinstance(data.train, TensorImages):
        return TensorBatchSource(data.train, spec, size, data.mean, data.std, sampler, device)
    return StreamBatchSource(data.train, spec, size, data.mean, data.std, sampler, device, cfg.num_workers,
                             cfg.bad_images, cfg.decode)


# ------------------------------------------------------------------------------------------- evaluation views


def eval_view(data: bytes, size: int) -> Tensor:
    """MAE's evaluation view of one encoded image as uint8 (3, size, size): shorter side resized to size / 0.875,
    then the centre ``size`` crop (:func:`repro.views.pil_eval_transform`'s geometry, torchvision's rounding), from
    the smallest DCT scale that keeps the resize a shrink and with torch's antialiased bicubic (PIL's filter)."""
    from PIL import Image

    resize = int(round(size / 0.875))
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        r = reduction_for(min(width, height), resize)
        if r == 1 and im.format == "JPEG" and im.mode in ("RGB", "L"):
            image = _decode_jpeg_rgb(data)
        else:
            if r > 1:
                im.draft("RGB", (width // r, height // r))
            im.load()
            image = torch.from_numpy(np.array(im.convert("RGB") if im.mode != "RGB" else im)).permute(2, 0, 1)
    short, long = sorted((width, height))
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    x = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[:, top:top + size, left:left + size]


class _EvalLoad:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, path: str, seed: int) -> tuple[Tensor]:
        return (eval_view(read_file(path), self.size),)


class _InOrder(torch.utils.data.Sampler):
    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch = n, batch

    def __iter__(self):
        for i in range(0, self.n, self.batch):
            yield [(j, 0) for j in range(i, min(self.n, i + self.batch))]

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch


def eval_batches(split: Split, size: int, mean, std, batch_size: int, device: torch.device,
                 num_workers: int = 4) -> Iterator[tuple[Tensor, Tensor]]:
    """Deterministic evaluation views (resize/centre-crop + normalise) of a whole split, in order. Files are decoded
    by :func:`eval_view` in workers and normalised on the device, as the training views are."""
    if isinstance(split, TensorImages):
        for i in range(0, len(split), batch_size):
            x = split.images[i:i + batch_size].to(device)
            yield normalize_uint8(x, size, mean, std), split.labels[i:i + batch_size].to(device)
        return
    ds = _FileDataset(split, _EvalLoad(size), "skip")
    loader = torch.utils.data.DataLoader(ds, batch_sampler=_InOrder(len(split), batch_size),
                                         num_workers=resolve_workers(num_workers), pin_memory=device.type == "cuda")
    for views, labels in loader:
        yield normalize_uint8(views[0].to(device, non_blocking=True), size, mean, std), labels.to(device)

