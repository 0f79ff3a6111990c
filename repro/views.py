"""Augmentation pipelines that methods declare through :class:`ViewSpec`; the trainer stays method-agnostic.

A view is RandomResizedCrop + horizontal flip, then optional photometric corruption (:class:`Photometric`:
colour jitter, grayscale, Gaussian blur, solarize — the BYOL/MoCo v3 recipe), then normalisation. Views may
share one crop (ConMIM: the student and teacher see the same pixels, only the teacher's are corrupted).

Two back-ends produce the same distribution of views:
- :class:`TensorAugment` — batched, on whatever device holds a uint8 image tensor (the small-data path):
  per-sample RandomResizedCrop boxes sampled like torchvision's, resampled with ``grid_sample``, flips, and
  per-sample photometric parameters drawn like torchvision's (jitter order permuted per image).
- :func:`pil_view_transform` — torchvision transforms per image (the plain streaming pipeline,
  ``data.decode=pil``; ``repro.sources`` has the faster default).

Blur sigmas are stated for 224-px crops (BYOL: 0.1-2.0) and scale with the crop size, so a 32-px view is
blurred by the same fraction of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Interp = Literal["bicubic", "bilinear"]


REFERENCE_SIZE = 224
"""Crop size at which blur sigmas are stated."""


@dataclass(frozen=True)
class Photometric:
    """Photometric corruption of one view, applied after the crop in torchvision's order (BYOL recipe)."""

    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """ColorJitter (brightness, contrast, saturation, hue) strengths."""
    jitter_p: float = 0.0
    """Probability of applying the colour jitter (its four parts then run in a random order)."""
    gray_p: float = 0.0
    """RandomGrayscale probability (ITU-R 601-2 luma, replicated to three channels)."""
    blur_p: float = 0.0
    """Gaussian-blur probability."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Blur sigma range in pixels of a 224-px crop (scaled with the crop size)."""
    solarize_p: float = 0.0
    """Solarize probability (pixels >= 128 of 255 inverted)."""

    @property
    def active(self) -> bool:
        return max(self.jitter_p, self.gray_p, self.blur_p, self.solarize_p) > 0


NONE = Photometric()
_JITTER = (0.4, 0.4, 0.2, 0.1)
BYOL_VIEW1 = Photometric(jitter=_JITTER, jitter_p=0.8, gray_p=0.2, blur_p=1.0)
"""BYOL / MoCo v3 first view: colour jitter p 0.8, grayscale p 0.2, blur p 1.0."""
BYOL_VIEW2 = Photometric(jitter=_JITTER, jitter_p=0.8, gray_p=0.2, blur_p=0.1, solarize_p=0.2)
"""BYOL / MoCo v3 second view: colour jitter p 0.8, grayscale p 0.2, blur p 0.1, solarize p 0.2 (also
ConMIM's strong teacher view)."""


@dataclass(frozen=True)
class ViewSpec:
    """A method's augmentation: ``count`` views, each RandomResizedCrop + flip + its photometric corruption."""

    count: int = 1
    """How many views per image the method consumes."""
    scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    interpolation: Interp = "bicubic"
    hflip: float = 0.5
    photometric: tuple[Photometric, ...] = ()
    """One entry per view; empty = no photometric corruption (MAE, MiCL)."""
    shared_crop: bool = False
    """All views come from one crop + flip of the image (ConMIM's student/teacher pair)."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("ViewSpec.count must be >= 1")
        if self.photometric and len(self.photometric) != self.count:
            raise ValueError(f"ViewSpec.photometric needs one entry per view ({self.count}), "
                             f"got {len(self.photometric)}")

    def view_photometric(self, i: int) -> Photometric:
        return self.photometric[i] if self.photometric else NONE


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


# ---------------------------------------------------------------------- photometric ops on [0, 1] floats
_LUMA = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


def _gray(x: Tensor) -> Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma, torchvision's ``rgb_to_grayscale`` weights."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    return (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * other).clamp_(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(n, 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sel = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in enumerate(sel):
        m = (i == k).unsqueeze(1)
        out = torch.where(m, torch.stack([rr, gg, bb], 1), out)
    return out


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (n,), reflect padding, kernel 2*radius+1."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, K)
    y = x.reshape(1, n * c, h, w)
    pad_w, pad_h = min(radius, w - 1), min(radius, h - 1)
    y = F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect")
    kw = k[:, radius - pad_w: radius + pad_w + 1] if pad_w < radius else k
    y = F.conv2d(y, (kw / kw.sum(1, keepdim=True)).view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect")
    kh = k[:, radius - pad_h: radius + pad_h + 1] if pad_h < radius else k
    y = F.conv2d(y, (kh / kh.sum(1, keepdim=True)).view(n * c, 1, -1, 1), groups=n * c)
    return y.reshape(n, c, h, w)


def blur_radius(p: Photometric, size: int) -> int:
    return max(1, math.ceil(3.0 * p.blur_sigma[1] * size / REFERENCE_SIZE))


def apply_photometric(x: Tensor, p: Photometric, *, select_by_where: bool | None = None) -> Tensor:
    """Batched photometric corruption of crops ``x`` (n, 3, S, S) in [0, 1], parameters drawn per image.

    Same distribution as torchvision's RandomApply(ColorJitter) -> RandomGrayscale -> RandomApply(GaussianBlur)
    -> RandomSolarize(128): jitter factors uniform in [max(0, 1 - s), 1 + s] (hue in [-h, h]), applied in a
    random order per image.

    ``select_by_where`` picks how each image gets its op at each slot: run the op on every image and keep it with
    ``torch.where`` (no host sync; the default on CUDA), or run it on just the chosen images (the default on CPU).
    Both give the same result (tested on CPU).
    """
    if select_by_where is None:
        select_by_where = x.is_cuda
    if not p.active:
        return x
    n, dev = x.shape[0], x.device

    def coin(prob: float) -> Tensor:
        return torch.rand(n, device=dev) < prob

    if p.jitter_p > 0:
        on = coin(p.jitter_p)
        b, c, s, h = p.jitter
        fb = torch.empty(n, device=dev).uniform_(max(0.0, 1 - b), 1 + b)
        fc = torch.empty(n, device=dev).uniform_(max(0.0, 1 - c), 1 + c)
        fs = torch.empty(n, device=dev).uniform_(max(0.0, 1 - s), 1 + s)
        fh = torch.empty(n, device=dev).uniform_(-h, h)
        order = torch.argsort(torch.rand(n, 4, device=dev), dim=1)  # a random permutation per image

        def op(k: int, y: Tensor, i: Tensor | slice) -> Tensor:
            if k == 0:
                return _blend(y, torch.zeros_like(y), fb[i])
            if k == 1:
                return _blend(y, _gray(y).mean(dim=(1, 2, 3), keepdim=True), fc[i])
            if k == 2:
                return _blend(y, _gray(y), fs[i])
            return adjust_hue(y, fh[i])

        y = x.clone()
        for slot in range(4):
            for k in range(3 if h == 0 else 4):  # each image gets op order[i, slot]
                chosen = order[:, slot] == k
                if select_by_where:  # no host sync: run op k on every image, keep it where chosen
                    y = torch.where(chosen.view(-1, 1, 1, 1), op(k, y, slice(None)), y)
                else:  # CPU: run op k on just its images (4x less work; the index costs no device sync here)
                    idx = chosen.nonzero().squeeze(1)
                    if idx.numel():
                        y.index_copy_(0, idx, op(k, y.index_select(0, idx), idx))
        x = torch.where(on.view(-1, 1, 1, 1), y, x)
    if p.gray_p > 0:
        x = torch.where(coin(p.gray_p).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if p.blur_p > 0:
        on = coin(p.blur_p)
        size = x.shape[-1]
        sigma = torch.empty(n, device=dev).uniform_(*p.blur_sigma) * size / REFERENCE_SIZE
        x = torch.where(on.view(-1, 1, 1, 1), gaussian_blur(x, sigma, blur_radius(p, size)), x)
    if p.solarize_p > 0:
        on = coin(p.solarize_p).view(-1, 1, 1, 1)
        x = torch.where(on & (x >= 128 / 255), 1.0 - x, x)
    return x


class TensorAugment:
    """Batched views of uint8 images (n, 3, H, W) on their own device -> tuple of normalised float views."""

    def __init__(self, spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 dtype: torch.dtype = torch.float32) -> None:
        self.spec = spec
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.dtype = dtype
        """Dtype of the views (float64 only in the cross-machine golden tests)."""

    def _crop(self, x: Tensor) -> Tensor:
        s = self.spec
        boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], s.scale, s.ratio, x.device)
        flip = torch.rand(x.shape[0], device=x.device) < s.hflip
        return resized_crops(x, boxes, self.size, flip, s.interpolation).clamp_(0, 255).div_(255.0)

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        x = images.to(self.dtype)
        mean, std = self.mean.to(x), self.std.to(x)
        views = []
        shared = self._crop(x) if self.spec.shared_crop else None
        for i in range(self.spec.count):
            v = shared if shared is not None else self._crop(x)
            v = apply_photometric(v, self.spec.view_photometric(i))
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


def pil_photometric(p: Photometric, size: int):
    """torchvision transforms for one view's photometric corruption (PIL images)."""
    from torchvision import transforms as T

    out: list = []
    if p.jitter_p > 0:
        out.append(T.RandomApply([T.ColorJitter(*p.jitter)], p=p.jitter_p))
    if p.gray_p > 0:
        out.append(T.RandomGrayscale(p.gray_p))
    if p.blur_p > 0:
        scale = size / REFERENCE_SIZE
        sigma = (p.blur_sigma[0] * scale, p.blur_sigma[1] * scale)
        out.append(T.RandomApply([T.GaussianBlur(2 * blur_radius(p, size) + 1, sigma)], p=p.blur_p))
    if p.solarize_p > 0:
        out.append(T.RandomSolarize(128, p=p.solarize_p))
    return out


def pil_view_parts(spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """The two halves of :func:`pil_view_transform`: crop + flip (PIL in, PIL out) and, per view, photometric ops
    + ToTensor + Normalize (PIL in, float tensor out)."""
    from torchvision import transforms as T

    interp = T.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    crop = T.Compose([T.RandomResizedCrop(size, scale=spec.scale, ratio=spec.ratio, interpolation=interp),
                      T.RandomHorizontalFlip(spec.hflip)])
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    per_view = [T.Compose([*pil_photometric(spec.view_photometric(i), size), *tail]) for i in range(spec.count)]
    return crop, per_view


def pil_view_transform(spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """torchvision per-image transform producing ``spec.count`` views (``data.decode=pil``)."""
    from torchvision import transforms as T

    crop, per_view = pil_view_parts(spec, size, mean, std)
    if spec.count == 1:
        return T.Compose([crop, per_view[0]])
    if spec.shared_crop:
        def shared(img):
            c = crop(img)
            return tuple(v(c) for v in per_view)
        return shared
    return lambda img: tuple(v(crop(img)) for v in per_view)


def pil_eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """Resize to size / 0.875 (bicubic) and centre-crop, the MAE/DeiT evaluation transform."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(size / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
