"""The torchvision-backed ``mmcv._ext`` shim against pure-Python references (through mmcv.ops in a fresh interpreter:
tests/dense/test_mmcv_subprocess.py)."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor

from evals.dense import mmcv_ext

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- references


def ref_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int) -> list[int]:
    """Brute-force greedy NMS in float64: by decreasing score, keep unless IoU > threshold with a kept box."""
    b = boxes.double().tolist()
    s = scores.double().tolist()

    def area(i: int) -> float:
        return (b[i][2] - b[i][0] + offset) * (b[i][3] - b[i][1] + offset)

    def iou(i: int, j: int) -> float:
        w = max(0.0, min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]) + offset)
        h = max(0.0, min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]) + offset)
        inter = w * h
        return inter / (area(i) + area(j) - inter)

    keep: list[int] = []
    for i in sorted(range(len(s)), key=lambda k: -s[k]):
        if all(iou(i, k) <= iou_threshold for k in keep):
            keep.append(i)
    return keep


def _bilinear(feat: Tensor, y: float, x: float) -> Tensor:
    """Detectron/mmcv bilinear sample of ``feat`` (C, H, W) at (y, x), zero beyond one pixel outside the map."""
    height, width = feat.shape[1:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feat.new_zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_lo, x_lo = int(y), int(x)
    if y_lo >= height - 1:
        y_lo = y_hi = height - 1
        y = float(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= width - 1:
        x_lo = x_hi = width - 1
        x = float(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feat[:, y_lo, x_lo] + hy * lx * feat[:, y_lo, x_hi]
            + ly * hx * feat[:, y_hi, x_lo] + ly * lx * feat[:, y_hi, x_hi])


def ref_roi_align(x: Tensor, rois: Tensor, out_hw: tuple[int, int], spatial_scale: float, sampling_ratio: int,
                  aligned: bool) -> Tensor:
    """Average-pooled RoIAlign, loop by loop in float64."""
    x, rois = x.double(), rois.double()
    ph, pw = out_hw
    out = x.new_zeros(rois.shape[0], x.shape[1], ph, pw)
    off = 0.5 if aligned else 0.0
    for k, (bi, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x0, y0 = x1 * spatial_scale - off, y1 * spatial_scale - off
        rw, rh = x2 * spatial_scale - off - x0, y2 * spatial_scale - off - y0
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bin_h, bin_w = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)
        feat = x[int(bi)]
        for py in range(ph):
            for px in range(pw):
                acc = x.new_zeros(x.shape[1])
                for iy in range(gh):
                    for ix in range(gw):
                        yy = y0 + py * bin_h + (iy + 0.5) * bin_h / gh
                        xx = x0 + px * bin_w + (ix + 0.5) * bin_w / gw
                        acc += _bilinear(feat, yy, xx)
                out[k, :, py, px] = acc / count
    return out


# ---------------------------------------------------------------------------------------------------- helpers


def random_boxes(n: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Heavily overlapping boxes (centres in a 60 px square, sides 4-30 px) and distinct random scores."""
    c = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60
    wh = 4 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 26
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1).to(dtype)
    scores = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    return boxes, scores


def random_rois(k: int, batch: int, image_size: float, g: torch.Generator,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """RoIs (batch index, x1, y1, x2, y2) in image coordinates, some reaching past the border, some tiny."""
    idx = torch.randint(0, batch, (k, 1), generator=g).double()
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * image_size * 1.1 - 0.1 * image_size
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * image_size * 0.6
    wh[: k // 4] *= 0.05  # tiny boxes: aligned=False clamps them to one feature pixel
    return torch.cat([idx, xy, xy + wh], dim=1).to(dtype)


def shim_forward(x: Tensor, rois: Tensor, out_hw: tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool, pool_mode: int = 1) -> Tensor:
    out = x.new_zeros(rois.shape[0], x.shape[1], *out_hw)
    mmcv_ext.roi_align_forward(x, rois, out, x.new_zeros(0), x.new_zeros(0), aligned_height=out_hw[0],
                               aligned_width=out_hw[1], spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                               pool_mode=pool_mode, aligned=aligned)
    return out


def shim_backward(grad_out: Tensor, rois: Tensor, input_shape: torch.Size, spatial_scale: float, sampling_ratio: int,
                  aligned: bool, pool_mode: int = 1, grad_in: Tensor | None = None) -> Tensor:
    if grad_in is None:
        grad_in = grad_out.new_zeros(input_shape)
    mmcv_ext.roi_align_backward(grad_out, rois, grad_out.new_zeros(0), grad_out.new_zeros(0), grad_in,
                                aligned_height=grad_out.shape[2], aligned_width=grad_out.shape[3],
                                spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, pool_mode=pool_mode,
                                aligned=aligned)
    return grad_in


class ShimRoIAlign(torch.autograd.Function):
    """RoIAlign on the shim's forward/backward, as mmcv's RoIAlignFunction wires them (for gradcheck)."""

    @staticmethod
    def forward(ctx, x, rois, out_hw, spatial_scale, sampling_ratio, aligned):  # type: ignore[override]
        ctx.save_for_backward(rois)
        ctx.cfg = (x.shape, spatial_scale, sampling_ratio, aligned)
        return shim_forward(x, rois, out_hw, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        shape, spatial_scale, sampling_ratio, aligned = ctx.cfg
        return shim_backward(grad_out.contiguous(), rois, shape, spatial_scale, sampling_ratio, aligned), *[None] * 5


# ---------------------------------------------------------------------------------------------------- nms


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nms_matches_greedy_reference(seed: int, offset: int) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes, scores = random_boxes(150, g, torch.float64 if seed % 2 else torch.float32)
    for thr in (0.3, 0.5, 0.7):
        keep = mmcv_ext.nms(boxes, scores, thr, offset)
        assert keep.dtype == torch.int64
        assert keep.tolist() == ref_nms(boxes, scores, thr, offset)
        assert bool((scores[keep].diff() <= 0).all())  # by decreasing score
        assert 1 < len(keep) < len(boxes)  # the boxes overlap enough for NMS to matter


def test_nms_offset_one_differs_from_zero_on_small_integer_boxes() -> None:
    # Boxes [0,0,1,1] and [1,1,2,2]: disjoint with offset 0; with offset 1 they are 2x2 boxes overlapping in one
    # pixel (IoU 1/7), so a threshold of 0.1 drops the second only with offset 1.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]])
    scores = torch.tensor([0.9, 0.8])
    assert mmcv_ext.nms(boxes, scores, 0.1, 0).tolist() == [0, 1]
    assert mmcv_ext.nms(boxes, scores, 0.1, 1).tolist() == [0]
    assert boxes[1, 2] == 2.0  # offset=1 does not modify the caller's boxes


def test_nms_edge_cases() -> None:
    with pytest.raises(ValueError, match="offset"):
        mmcv_ext.nms(torch.zeros(1, 4), torch.ones(1), 0.5, 2)
    empty = mmcv_ext.nms(torch.zeros(0, 4), torch.zeros(0), 0.5, 0)
    assert empty.dtype == torch.int64 and empty.numel() == 0
    g = torch.Generator().manual_seed(7)
    boxes, scores = random_boxes(50, g)
    mixed = mmcv_ext.nms(boxes, scores.double(), 0.5, 0)  # torchvision alone would refuse mixed dtypes
    assert mixed.tolist() == ref_nms(boxes, scores.double(), 0.5, 0)


# ---------------------------------------------------------------------------------------------------- roi_align


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_forward_matches_reference(sampling_ratio: int, aligned: bool) -> None:
    g = torch.Generator().manual_seed(10 + sampling_ratio + int(aligned))
    x = torch.randn(2, 3, 12, 10, generator=g)
    rois = random_rois(8, 2, image_size=22.0, g=g)  # spatial_scale 0.5: RoIs up to ~13 feature pixels, grids up to 4
    out = shim_forward(x, rois, (3, 4), 0.5, sampling_ratio, aligned)
    ref = ref_roi_align(x, rois, (3, 4), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    assert out.abs().sum() > 0

    cl = shim_forward(x.to(memory_format=torch.channels_last), rois, (3, 4), 0.5, sampling_ratio, aligned)
    assert torch.equal(cl, out)


def test_roi_align_forward_empty_rois_and_double() -> None:
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert shim_forward(x, torch.zeros(0, 5, dtype=torch.float64), (2, 2), 1.0, 0, True).shape == (0, 2, 2, 2)
    rois = torch.tensor([[0.0, 0.5, 1.0, 4.0, 3.5]], dtype=torch.float32)  # float32 RoIs with float64 input
    torch.testing.assert_close(shim_forward(x, rois, (2, 2), 1.0, 0, True),
                               ref_roi_align(x, rois, (2, 2), 1.0, 0, True), atol=1e-12, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_backward_matches_torchvision_autograd(aligned: bool) -> None:
    g = torch.Generator().manual_seed(20 + int(aligned))
    x = torch.randn(2, 3, 9, 11, generator=g, requires_grad=True)
    rois = random_rois(6, 2, image_size=40.0, g=g)
    out = torchvision.ops.roi_align(x, rois, (3, 2), 0.25, 0, aligned)
    upstream = torch.randn(out.shape, generator=g)
    (expected,) = torch.autograd.grad(out, x, upstream)

    grad = shim_backward(upstream, rois, x.shape, 0.25, 0, aligned)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)
    assert expected.abs().sum() > 0

    # added into grad_input like the compiled kernel (mmcv hands it zeros)
    ones = torch.ones(x.shape)
    torch.testing.assert_close(shim_backward(upstream, rois, x.shape, 0.25, 0, aligned, grad_in=ones),
                               expected + 1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_gradcheck(aligned: bool) -> None:
    g = torch.Generator().manual_seed(30)
    x = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(3, 2, image_size=6.0, g=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ShimRoIAlign.apply(t, rois, (2, 2), 1.0, 0, aligned), (x,))
    assert torch.autograd.gradcheck(lambda t: ShimRoIAlign.apply(t, rois, (3, 2), 1.0, 2, aligned), (x,))


# ---------------------------------------------------------------------------------------------------- stubs / install


def test_max_pool_mode_is_not_implemented() -> None:
    x, rois = torch.randn(1, 1, 4, 4), torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]])
    with pytest.raises(NotImplementedError, match="max"):
        shim_forward(x, rois, (2, 2), 1.0, 0, True, pool_mode=0)
    with pytest.raises(NotImplementedError, match="max"):
        shim_backward(torch.ones(1, 1, 2, 2), rois, x.shape, 1.0, 0, True, pool_mode=0)
    with pytest.raises(ValueError, match="pool_mode"):
        shim_forward(x, rois, (2, 2), 1.0, 0, True, pool_mode=2)


def test_other_ops_are_stubs_and_dunders_stay_missing() -> None:
    assert hasattr(mmcv_ext, "deform_conv_forward")
    with pytest.raises(NotImplementedError, match=r"mmcv\._ext\.deform_conv_forward: not provided"):
        mmcv_ext.deform_conv_forward(torch.zeros(1))
    for name in ("__wrapped__", "__path__", "_pytestfixturefunction"):
        assert not hasattr(mmcv_ext, name)
        with pytest.raises(AttributeError):
            getattr(mmcv_ext, name)
    assert mmcv_ext.nms.__module__ == mmcv_ext.__name__  # the real ops are not shadowed by stubs


def test_install_defers_to_a_loaded_real_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    real = types.ModuleType("mmcv._ext")
    monkeypatch.setitem(sys.modules, "mmcv._ext", real)
    assert mmcv_ext.install() is False
    assert sys.modules["mmcv._ext"] is real and not mmcv_ext.is_shim_installed()

