"""Augmentation pipelines that methods declare through :class:`ViewSpec`; the trainer stays method-agnostic.

Two back-ends produce the same views:
- :class:`TensorAugment` — batched, on whatever device holds a uint8 image tensor (the small-data path):
  per-sample RandomResizedCrop boxes sampled like torchvision's, resampled with ``grid_sample``, and flips.
- :func:`pil_view_transform` — torchvision transforms per image for the streaming ImageFolder path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Interp = Literal["bicubic", "bilinear"]


@dataclass(frozen=True)
class ViewSpec:
    """A method's augmentation: ``count`` independent views of one kind."""

    kind: Literal["crop_flip"] = "crop_flip"
    """'crop_flip': RandomResizedCrop + horizontal flip + normalisation, no colour (MAE, MiCL)."""
    count: int = 1
    """How many views per image the method consumes."""
    scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    interpolation: Interp = "bicubic"
    hflip: float = 0.5


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      device: torch.device, attempts: int = 10) -> Tensor:
    """RandomResizedCrop boxes for ``n`` images, vectorised (torchvision's sampler: 10 tries, then centre crop).

    Returns (n, 4) float tensor of (x0, y0, w, h) in pixels.
    """
    area = float(height * width)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * torch.empty(n, attempts, device=device).uniform_(scale[0], scale[1])
    aspect = torch.exp(torch.empty(n, attempts, device=device).uniform_(log_r[0], log_r[1]))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    idx = first.clamp(min=0).unsqueeze(1)
    w_sel, h_sel = w.gather(1, idx).squeeze(1), h.gather(1, idx).squeeze(1)
    # fallback: centre crop with the ratio clamped into range (torchvision's behaviour)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    fallback = first < 0
    w_sel = torch.where(fallback, torch.full_like(w_sel, fw), w_sel)
    h_sel = torch.where(fallback, torch.full_like(h_sel, fh), h_sel)
    u = torch.rand(n, 2, device=device)
    x0 = torch.floor(u[:, 0] * (width - w_sel + 1))
    y0 = torch.floor(u[:, 1] * (height - h_sel + 1))
    x0 = torch.where(fallback, torch.round((width - w_sel) / 2), x0)
    y0 = torch.where(fallback, torch.round((height - h_sel) / 2), y0)
    return torch.stack([x0, y0, w_sel, h_sel], dim=1)


def resized_crops(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None, mode: Interp) -> Tensor:
    """Crop ``boxes`` (n, 4: x0, y0, w, h in pixels) out of float images (n, C, H, W) and resize to size x size.

    ``flip`` (n,) bool mirrors the output horizontally. Uses pixel-centre sampling (align_corners=False).
    Unlike PIL, grid_sample does not antialias when shrinking; at 32 px the crops are upsampled, so it
    does not arise there.
    """
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(1)
    t = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size  # (S,)
    xs = x0[:, None] + t[None] * w[:, None]  # (n, S) pixel coords
    ys = y0[:, None] + t[None] * h[:, None]
    if flip is not None:
        xs = torch.where(flip[:, None], xs.flip(1), xs)
    gx = 2 * xs / width - 1
    gy = 2 * ys / height - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


class TensorAugment:
    """Batched views of uint8 images (n, 3, H, W) on their own device -> tuple of normalised float views."""

    def __init__(self, spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.spec = spec
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        x = images.float()
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        views = []
        for _ in range(self.spec.count):
            boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], self.spec.scale, self.spec.ratio, x.device)
            flip = torch.rand(x.shape[0], device=x.device) < self.spec.hflip
            v = resized_crops(x, boxes, self.size, flip, self.spec.interpolation).clamp_(0, 255)
            views.append((v - mean) / std)
        return tuple(views)


def normalize_uint8(images: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Evaluation view of uint8 images: resize to ``size`` if needed (bicubic), normalise."""
    x = images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x - m) / s


def pil_view_transform(spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """torchvision per-image transform producing ``spec.count`` views (streaming ImageFolder path)."""
    from torchvision import transforms as T

    interp = T.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    one = T.Compose([
        T.RandomResizedCrop(size, scale=spec.scale, ratio=spec.ratio, interpolation=interp),
        T.RandomHorizontalFlip(spec.hflip),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    if spec.count == 1:
        return one
    return lambda img: tuple(one(img) for _ in range(spec.count))


def pil_eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """Resize to size / 0.875 (bicubic) and centre-crop, the MAE/DeiT evaluation transform."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(size / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
