"""A stand-in for ``mmcv._ext`` (mmcv's compiled ops) built on torchvision's compiled ops.

Why: mmdet 3.x needs mmcv 2.x, and ``import mmdet.models`` pulls in ``mmcv.ops``, whose modules all call
``mmcv.utils.ext_loader.load_ext('_ext', [names...])`` at import time. That imports the compiled ``mmcv._ext``
and asserts each name is an attribute of it. mmcv 2.x on PyPI is a source distribution only (no wheels for
current torch), and building it takes about 33 minutes; ``mmcv-lite`` installs in seconds but has no ``_ext``,
so ``import mmdet.models`` fails with ``No module named 'mmcv._ext'``.

What is real: Mask R-CNN only *calls* three of the ops, and torchvision ships compiled CPU/CUDA kernels for them:

- ``nms``: ``torchvision.ops.nms``, with mmcv's legacy ``offset=1`` (box width ``x2 - x1 + 1``) handled
  by shifting ``x2, y2`` by one.
- ``roi_align_forward`` / ``roi_align_backward``: torchvision's ``roi_align`` / ``_roi_align_backward`` ops, average
  pooling only (``pool_mode=1``, what mmdet's ``RoIAlign`` uses); max pooling raises ``NotImplementedError``.

Every other name resolves (module ``__getattr__``) to a stub that raises ``NotImplementedError`` when called,
so the ``load_ext`` asserts pass at import time and a model that needs another op fails loudly, naming it.

Checked against compiled mmcv 2.1.0 (by an earlier session that built it): NMS kept indices equal, RoIAlign
forward/backward maximum absolute difference 0.0 (both are the Detectron bilinear kernel).

Use :func:`install` before importing ``mmdet.models``/``mmcv.ops``; it does nothing when a real compiled
``mmcv._ext`` is importable. Known difference: under ``torch.use_deterministic_algorithms(True)`` on CUDA,
torchvision's RoIAlign backward raises (it accumulates with ``atomicAdd``, as compiled mmcv does without a word);
pass ``warn_only=True`` there.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

import torch
import torchvision  # noqa: F401  (loads torchvision's compiled ops into torch.ops.torchvision)
from torch import Tensor

__all__ = ["install", "is_shim_installed", "nms", "roi_align_backward", "roi_align_forward"]

_POOL_MAX, _POOL_AVG = 0, 1


def nms(bboxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """Greedy NMS: int64 indices into ``bboxes`` (N, 4; x1, y1, x2, y2) of the kept boxes, by decreasing score.

    A box is dropped when its IoU with an already kept, higher-scoring box is ``> iou_threshold`` (as mmcv).
    """
    if offset not in (0, 1):
        raise ValueError(f"nms: offset must be 0 or 1, got {offset!r}")
    # torchvision wants one dtype for boxes and scores; promoting is exact, so the order and IoUs are unchanged.
    dtype = torch.promote_types(bboxes.dtype, scores.dtype)
    bboxes, scores = bboxes.to(dtype), scores.to(dtype)
    if offset == 1:
        # mmcv with offset o uses  area = (x2 - x1 + o) * (y2 - y1 + o)  and the overlap width
        # max(0, min(x2_i, x2_j) - max(x1_i, x1_j) + o)  (same for height). Replacing x2 by x2 + 1 and using o = 0:
        #   area' = (x2 + 1 - x1) * (y2 + 1 - y1)                                  = area with o = 1
        #   min(x2_i + 1, x2_j + 1) - max(x1_i, x1_j) = min(x2_i, x2_j) - max(x1_i, x1_j) + 1  -> overlap with o = 1
        # so every IoU, hence every greedy decision, is the same (up to float rounding of where the +1 is added).
        bboxes = bboxes.clone()
        bboxes[:, 2:4] += 1
    return torchvision.ops.nms(bboxes, scores, float(iou_threshold))


def _check_avg(pool_mode: int, where: str) -> None:
    if pool_mode == _POOL_MAX:
        raise NotImplementedError(
            f"mmcv._ext.{where}: pool_mode=0 (max) is not in torchvision; repro's torchvision-backed shim only does "
            "RoIAlign with average pooling (pool_mode='avg', mmdet's default). Install compiled mmcv "
            "(pip install mmcv==2.1.0, built from source) for max-pooled RoIAlign.")
    if pool_mode != _POOL_AVG:
        raise ValueError(f"mmcv._ext.{where}: pool_mode must be 0 (max) or 1 (avg), got {pool_mode!r}")


def roi_align_forward(input: Tensor, rois: Tensor, output: Tensor, argmax_y: Tensor, argmax_x: Tensor, *,
                      aligned_height: int, aligned_width: int, spatial_scale: float, sampling_ratio: int,
                      pool_mode: int, aligned: bool) -> None:
    """RoIAlign of ``input`` (B, C, H, W) over ``rois`` (K, 5: batch index, x1, y1, x2, y2), written into
    ``output`` (K, C, aligned_height, aligned_width). ``argmax_y``/``argmax_x`` are only used by max pooling."""
    del argmax_y, argmax_x
    _check_avg(pool_mode, "roi_align_forward")
    # Contiguous NCHW: compiled mmcv's CPU kernel reads channels_last input wrongly; torchvision's copes, but a
    # copy costs little next to the op and keeps both paths on the same memory layout.
    input = input.contiguous()
    # The op itself, not torchvision.ops.roi_align: that wrapper switches to a pure-Python version (memory-hungry
    # with sampling_ratio=0) on CUDA under deterministic mode; the compiled forward is deterministic anyway.
    result = torch.ops.torchvision.roi_align(input, rois.to(input.dtype).contiguous(), float(spatial_scale),
                                             int(aligned_height), int(aligned_width), int(sampling_ratio),
                                             bool(aligned))
    output.copy_(result)


def roi_align_backward(grad_output: Tensor, rois: Tensor, argmax_y: Tensor, argmax_x: Tensor, grad_input: Tensor, *,
                       aligned_height: int, aligned_width: int, spatial_scale: float, sampling_ratio: int,
                       pool_mode: int, aligned: bool) -> None:
    """Gradient of :func:`roi_align_forward` w.r.t. its input, added into ``grad_input`` (B, C, H, W).

    Added, not assigned, as the compiled kernel does (mmcv passes zeros)."""
    del argmax_y, argmax_x
    _check_avg(pool_mode, "roi_align_backward")
    batch, channels, height, width = grad_input.shape
    grad = torch.ops.torchvision._roi_align_backward(
        grad_output.contiguous(), rois.to(grad_output.dtype).contiguous(), float(spatial_scale),
        int(aligned_height), int(aligned_width), batch, channels, height, width, int(sampling_ratio), bool(aligned))
    grad_input.add_(grad)


def _missing_op(name: str) -> Callable[..., NoReturn]:
    def op(*args: object, **kwargs: object) -> NoReturn:
        raise NotImplementedError(
            f"mmcv._ext.{name}: not provided by repro's torchvision-backed shim (only nms and roi_align); "
            "install compiled mmcv (pip install mmcv==2.1.0, built from source) for this op")

    op.__name__ = op.__qualname__ = name
    return op


def __getattr__(name: str) -> Callable[..., NoReturn]:
    """PEP 562: any other op name is a stub that raises when called, so ``load_ext``'s ``hasattr`` asserts pass.

    Names with a leading underscore (dunders and private probes such as pickle's or pytest's) stay missing."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _missing_op(name)


def is_shim_installed() -> bool:
    """Whether ``mmcv._ext`` is this module."""
    return sys.modules.get("mmcv._ext") is sys.modules[__name__]


def install() -> bool:
    """Make ``mmcv._ext`` this module unless a real compiled one imports; True when the shim is (now) in use.

    Idempotent. Call before ``import mmcv.ops`` / ``import mmdet.models``. Raises ImportError without mmcv.
    """
    if is_shim_installed():
        return True
    if sys.modules.get("mmcv._ext") is not None:  # a real one is already loaded
        return False
    import mmcv  # ImportError here: no mmcv at all, nothing to stand in for

    try:
        importlib.import_module("mmcv._ext")
    except ModuleNotFoundError as e:
        if e.name != "mmcv._ext":
            raise
    except ImportError as e:  # present but unloadable (e.g. built against another torch): stand in, but say so
        warnings.warn(f"mmcv._ext exists but does not load ({e}); using repro's torchvision-backed shim instead",
                      RuntimeWarning, stacklevel=2)
    else:
        return False
    this = sys.modules[__name__]
    sys.modules["mmcv._ext"] = this
    mmcv._ext = this  # type: ignore[attr-defined]
    return True
