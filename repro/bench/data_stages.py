"""The streamed data path, stage by stage, per worker core (``python -m repro.bench --data IMAGEFOLDER``).

Beside :mod:`repro.bench.datapath`, which times the batch source as a whole against the training step, this module
breaks one worker's share of it into stages.

For each method's views (one for MiCL/MAE, two for MoCo v3, ...) and each ``data.decode`` pipeline it runs the
pipeline's own functions on one thread over the dataset's training files (cycled) and times each stage:

- **read** — the file's bytes (from the page cache after the first pass: a cold disk adds its own cost);
- **decode** — JPEG to pixels (``pil``: full size; ``fast``: header, crop draw, reduced-DCT decode; ``gpu``:
  header and crop draw only — decoding happens on the device);
- **crop/resize** — RandomResizedCrop + flip (PIL bicubic for ``pil``; torch's antialiased bicubic on uint8 for
  ``fast``);
- **augment** — what the worker does after the crop (``pil``: PIL photometric ops, ToTensor, Normalize);
- **collate** — stacking a batch (floats for ``pil``, uint8 for ``fast``).

``worker ms`` is their sum and ``img/s per core`` its inverse: what one DataLoader worker can feed. The device
half of ``fast`` (photometric ops + normalisation of a batch) is timed separately as ``device ms`` on the bench's
device; on a GPU it overlaps the workers.

It also makes photo-like JPEGs for the benchmark and the tests (:func:`write_jpeg_folder`):
``python -m repro.bench.data_stages OUT_DIR N`` writes N of them as an ImageFolder under OUT_DIR.

It times the pipeline's own functions, all public in :mod:`repro.sources` (``read_file``, ``header_size``,
``plan_crops``, ``decode_for_crops``, ``crops_of``), so the stages timed are the stages the loader runs.
"""

from __future__ import annotations

import datetime as _dt
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.data import IMAGENET_MEAN, IMAGENET_STD, FileImages
from repro.sources import DeviceViews, crops_of, decode_for_crops, header_size, plan_crops, read_file
from repro.views import ViewSpec, pil_view_parts

STAGES = ("read", "decode", "crop", "augment", "collate")


@dataclass
class StageRow:
    device: str
    tag: str
    method: str
    views: int
    size: int
    decode: str
    images: int
    read_ms: float
    decode_ms: float
    crop_ms: float
    augment_ms: float
    collate_ms: float
    worker_ms: float
    img_per_s_per_core: float
    device_ms: float
    date: str


def _pil_decode(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def measure_stages(files: FileImages, spec: ViewSpec, size: int, decode: str, *, images: int, batch: int,
                   device: torch.device, method: str, tag: str, device_label: str) -> StageRow:
    """Per-image milliseconds of each stage of ``decode`` on one thread (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker core
    try:
        paths = [files.paths[i % len(files)] for i in range(images)]
        t = dict.fromkeys(STAGES, 0.0)

        def timed(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            t[stage] += time.perf_counter() - t0
            return out

        def header_and_plan(data: bytes, seed: int) -> torch.Tensor:  # all a worker does for decode=gpu
            w, h = header_size(data)
            plan_crops(spec, h, w, seed)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)

        for p in paths[: min(len(paths), 8)]:  # warm the page cache and lazy imports
            read_file(p)
        outs: list[tuple[torch.Tensor, ...]] = []
        crop, per_view = pil_view_parts(spec, size, IMAGENET_MEAN, IMAGENET_STD)
        one_crop = spec.count == 1 or spec.shared_crop
        for i, p in enumerate(paths):
            data = timed("read", read_file, p)
            if decode == "pil":
                img = timed("decode", _pil_decode, data)
                if one_crop:
                    c = timed("crop", crop, img)
                    outs.append(timed("augment", lambda c: tuple(v(c) for v in per_view), c))
                else:
                    cs = timed("crop", lambda img: [crop(img) for _ in per_view], img)
                    outs.append(timed("augment", lambda cs: tuple(v(c) for v, c in zip(per_view, cs, strict=True)),
                                      cs))
            elif decode == "fast":
                d = timed("decode", decode_for_crops, data, spec, size, i)
                outs.append(timed("crop", crops_of, d, size, spec.interpolation))
            elif decode == "gpu":
                outs.append((timed("decode", header_and_plan, data, i),))
            else:
                raise ValueError(f"unknown decode {decode!r}")
        stacked = []
        for start in range(0, len(outs), batch):
            chunk = outs[start:start + batch]
            if decode == "gpu":
                continue  # the batch stays a list of byte tensors: nothing to stack
            stacked.append(timed("collate", lambda chunk=chunk: [torch.stack(v) for v in zip(*chunk, strict=True)]))
        device_ms = 0.0
        if decode == "fast" and stacked:  # the device half: photometric + normalise, per image of a full batch
            dv = DeviceViews(spec, IMAGENET_MEAN, IMAGENET_STD)
            crops = [c.to(device) for c in stacked[0]]
            dv(crops)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dv(crops)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            device_ms = (time.perf_counter() - t0) * 1e3 / crops[0].shape[0]
    finally:
        torch.set_num_threads(threads)
    ms = {k: 1e3 * v / images for k, v in t.items()}
    worker = sum(ms.values())
    return StageRow(device_label, tag, method, spec.count, size, decode, images, read_ms=ms["read"],
                    decode_ms=ms["decode"], crop_ms=ms["crop"], augment_ms=ms["augment"], collate_ms=ms["collate"],
                    worker_ms=worker, img_per_s_per_core=1e3 / worker, device_ms=device_ms,
                    date=_dt.date.today().isoformat())


def synthetic_photo(width: int, height: int, seed: int):
    """A photo-like PIL image (smooth gradients, shapes with edges, sensor-like noise): JPEG volume for the data-path
    benchmark and its tests when real images are few. Compresses like a photo (about 0.4 byte/px at quality 90)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / (17 + 11 * c) + yy / (29 + 7 * c) + c + seed) for c in range(3)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        x1, y1 = x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img


IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (400, 300), (640, 480), (1024, 768))
"""Sizes cycled by :func:`write_jpeg_folder`: mostly ImageNet's common 500-px side, a few larger."""


def write_jpeg_folder(root: Path, images: int, classes: int = 10, quality: int = 90) -> Path:
    """An ImageFolder (train/ and val/, ``classes`` classes) of ``images`` generated JPEGs each; never committed."""
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = IMAGENET_LIKE_SIZES[i % len(IMAGENET_LIKE_SIZES)]
            synthetic_photo(w, h, i).save(d / f"{i:06d}.jpg", "JPEG", quality=quality)
    return root


def render_stages(df) -> str:
    lines = ["# Data path per worker core", "",
             "Generated by `python -m repro.bench --data IMAGEFOLDER` (do not edit; `throughput_data_stages.csv`",
             "beside this file is the source). One thread, the pipeline's own functions, milliseconds per image;",
             "`img/s per core` = 1000 / worker ms. `device ms` is the `fast` pipeline's batched photometric +",
             "normalise on the bench's device (a GPU does it beside the workers; on a CPU device it is more CPU work).",
             "The `gpu` rows' decode column is the header read and crop draw only: their JPEG decode runs on the",
             "device, so they have no speed-up to state against `pil` here.", ""]
    for (dev, tag), g in df.groupby(["device", "tag"], sort=False):
        lines += [f"## {dev} — {tag}", "",
                  "| method | views | px | decode | read | decode | crop/resize | augment | collate | worker ms "
                  "| img/s per core | vs pil | device ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (method, size), m in g.groupby(["method", "size"], sort=False):
            base = m[m["decode"] == "pil"]["img_per_s_per_core"]
            for r in m.itertuples():
                speed = f"{r.img_per_s_per_core / base.iloc[0]:.2f}x" if len(base) and r.decode != "gpu" else "-"
                dev_ms = f"{r.device_ms:.2f}" if r.device_ms else "-"
                lines.append(f"| {method} | {r.views} | {size} | {r.decode} | {r.read_ms:.2f} | {r.decode_ms:.2f} | "
                             f"{r.crop_ms:.2f} | {r.augment_ms:.2f} | {r.collate_ms:.2f} | {r.worker_ms:.2f} | "
                             f"{r.img_per_s_per_core:.0f} | {speed} | {dev_ms} |")
        lines.append("")
    return "\n".join(lines)


def write_stages(out: Path, rows: list[StageRow]) -> Path:
    """Merge ``rows`` into ``<out>_data_stages.csv`` and regenerate ``<out>_data.md``."""
    from repro.bench.tables import merge_csv
    from repro.checkpoint import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    csv = out.parent / f"{out.name}_data_stages.csv"
    df = merge_csv(csv, [asdict(r) for r in rows], ["device", "tag", "method", "size", "decode"])
    md = out.parent / f"{out.name}_data.md"
    atomic_write_text(md, render_stages(df) + "\n")
    return md


if __name__ == "__main__":  # python -m repro.bench.data_stages OUT N: N generated ImageNet-sized JPEGs under OUT
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m repro.bench.data_stages OUT_DIR N_IMAGES")
    print(write_jpeg_folder(Path(sys.argv[1]), int(sys.argv[2])))
