"""The ``mmcv._ext`` shim through mmcv.ops in a fresh interpreter (``install()`` then mmcv's own NMS and RoIAlign),
against the pure-Python references of tests/unit/test_mmcv_ext.py and torchvision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from tests.unit.test_mmcv_ext import random_boxes, random_rois, ref_nms

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import sys, torch
from evals.dense import mmcv_ext
installed = mmcv_ext.install()
again = mmcv_ext.install()
import mmcv
from mmcv.ops import RoIAlign, nms
d = torch.load(sys.argv[1])
dets, keep = nms(d["boxes"], d["scores"], 0.5)
x = d["x"].clone().requires_grad_(True)
y = RoIAlign((7, 7), spatial_scale=0.25, sampling_ratio=0, aligned=True)(x, d["rois"])
y.backward(d["upstream"])
torch.save({"installed": installed, "again": again, "shim_in_use": mmcv_ext.is_shim_installed(),
            "ext_is_shim": mmcv._ext is mmcv_ext, "ext_file": str(getattr(mmcv._ext, "__file__", "")),
            "keep": keep, "dets": dets, "y": y.detach(), "grad": x.grad}, sys.argv[2])
"""


def test_mmcv_ops_through_install_in_subprocess(tmp_path: Path) -> None:
    pytest.importorskip("mmcv")
    before = sys.modules.get("mmcv._ext")  # other test modules (tests/dense) may have installed the shim here
    g = torch.Generator().manual_seed(40)
    boxes, scores = random_boxes(120, g)
    x = torch.randn(2, 4, 16, 16, generator=g)
    rois = random_rois(10, 2, image_size=64.0, g=g)
    upstream = torch.randn(10, 4, 7, 7, generator=g)
    torch.save({"boxes": boxes, "scores": scores, "x": x, "rois": rois, "upstream": upstream}, tmp_path / "in.pt")

    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = torch.load(tmp_path / "out.pt")

    assert r["again"] == r["installed"] == r["shim_in_use"] == r["ext_is_shim"]
    if r["installed"]:  # mmcv-lite: the shim stands in
        assert r["ext_file"].endswith("mmcv_ext.py")
    else:  # compiled mmcv present: install() leaves it alone and its ops are checked against torchvision below
        assert not r["ext_file"].endswith("mmcv_ext.py")

    keep = ref_nms(boxes, scores, 0.5, 0)
    assert r["keep"].tolist() == keep
    torch.testing.assert_close(r["dets"], torch.cat([boxes[keep], scores[keep, None]], dim=1))

    xr = x.clone().requires_grad_(True)
    y = torchvision.ops.roi_align(xr, rois, (7, 7), 0.25, 0, True)
    y.backward(upstream)
    tol = 0.0 if r["installed"] else 1e-5
    torch.testing.assert_close(r["y"], y.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(r["grad"], xr.grad, atol=tol, rtol=0)
    assert r["y"].abs().sum() > 0

    assert sys.modules.get("mmcv._ext") is before  # this process was left alone
