"""Frozen-feature extraction shared by the kNN and linear-probe evaluations.

Features are the exported model's own pre-logits output (``forward_head(forward_features(x), pre_logits=True)``):
for our exports (timm ``global_pool='token'``) that is the cls token after the final norm, the MAE/MoCo v3
linear-probe feature. A forward pass per image is most of an evaluation's cost on a CPU, so the features of an
export are extracted once and cached twice: in memory for the evaluations of one command (kNN then the linear
probe), and on disk beside the export (``EXPORT_DIR/features/<key>.pt``) for every later command (another eval
setting, another budget's run re-evaluating the shared random-init floor, ``python -m evals.<name>``).

The disk key (:func:`feature_key`) is everything the features depend on: the bytes of the export (weights and
``backbone.json``, hashed, so a retrained or replaced export never reuses stale features), the images of both
splits (hashed: the dataset name alone does not tell two built-in sizes or two ImageFolders apart), the train
subset, the resolved precision and :data:`FEATURES_VERSION`. A cache file is written atomically and read with
``weights_only=True``; one that does not load, or whose key, shapes or content digest do not match, is extracted
again, with a warning, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from evals.settings import UNKEYED
from repro.checkpoint import CheckpointError, atomic_write, file_sha256
from repro.config import ConfigError
from repro.data import DatasetSplits, FileImages, Split, balanced_subset, held_out_of_subset
from repro.export import EXPORT_META, EXPORT_WEIGHTS, ExportMeta, load_export, read_export, record_from_export
from repro.precision import PRECISIONS, autocast, cpu_has_native_bf16, resolve_precision
from repro.records import ResultRecord
from repro.sources import eval_batches

log = logging.getLogger("repro")

FEATURES_VERSION = 1
"""Bump when what :func:`extract` computes changes (another feature, another preprocessing): old cache files then
no longer match any key."""

CACHE_DIR = "features"
"""Sub-directory of an export that holds its cached features (one file per :func:`feature_key`)."""


@dataclass
class Features:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    precision: str = "fp32"
    """The precision of the forward pass that produced them (``fp32`` | ``bf16``); the tensors are fp32 either way."""
    seconds: float = 0.0
    """Extraction time (0 when they came from a cache)."""


def feature_precision(setting: str, device: torch.device) -> str:
    """``eval.feature_precision`` resolved on ``device``: ``auto`` is bf16 on CUDA (as extraction always was) and on
    CPUs with native bf16 (:func:`repro.precision.cpu_has_native_bf16`, ``REPRO_CPU_BF16=0|1`` forces it), fp32
    elsewhere. Unlike training's ``auto`` this does not wait for ``repro.precision.CPU_AUTO_BF16``: a frozen forward
    has no steps to gain or lose. Measured on cifar10-cpu (AMD EPYC with AVX512_BF16, 2 shared cores): bf16
    extraction ~1.6x faster than fp32; the random-init floor's kNN 31.24 (bf16) vs 31.20 (fp32), i.e. 4 of
    10,000 test images."""
    if setting == "auto" and device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return resolve_precision(setting, device)


def _precision_key(setting: str, device: torch.device | None) -> str | None:
    """The resolved precision as it keys an evaluation, or None where it is what extraction always used (fp32 on a
    CPU, bf16 on CUDA): eval keys from before ``eval.feature_precision`` stay valid wherever the numbers are the
    same ones, and change wherever they are not."""
    dev = device if device is not None else torch.device("cpu")
    resolved = feature_precision(setting, dev)
    return None if resolved == ("bf16" if dev.type == "cuda" else "fp32") else resolved


@dataclass(frozen=True, kw_only=True)
class FeatureSettings:
    """The settings of every protocol on cached frozen features (kNN, linear probe)."""

    train_subset: int = 0
    """kNN bank and linear-probe training set: 0 = the whole training split; N = a class-balanced subset of N
    training images, fixed by the dataset alone (same images for every export and seed). The test split is always
    used whole. A CPU saving: frozen features cost a forward pass per image."""
    feature_batch_size: int = field(default=256, metadata=UNKEYED)
    """Batch for frozen feature extraction (and the fine-tune's test pass)."""
    feature_precision: str = field(default="auto", metadata={"keyed": _precision_key})
    """Precision of the frozen forward pass: auto | fp32 | bf16 (autocast; features are returned as fp32). auto =
    bf16 on CUDA and on CPUs with native bf16 (AVX512_BF16/AMX), fp32 elsewhere. The eval key holds the resolved
    precision where it differs from the old extraction's (fp32 on CPU, bf16 on CUDA); records state it."""

    def __post_init__(self) -> None:
        if self.train_subset < 0:
            raise ConfigError("eval.train_subset must be >= 0 (0 = the whole training split)")
        if self.feature_batch_size < 1:
            raise ConfigError("eval.feature_batch_size must be positive")
        if self.feature_precision not in PRECISIONS:
            raise ConfigError(f"eval.feature_precision must be {'|'.join(PRECISIONS)}, got {self.feature_precision!r}")


def split_digest(split: Split) -> str:
    """SHA-256 of what a split feeds the extraction: its labels and its pixels (in-memory) or its file list."""
    h = hashlib.sha256()
    h.update(split.labels.numpy().tobytes())
    if isinstance(split, FileImages):  # streamed files: their paths (rewriting a file in place is not detected)
        h.update("\n".join(split.paths).encode())
    else:
        h.update(split.images.contiguous().numpy().tobytes())
    return h.hexdigest()


def export_digest(export_dir: Path) -> str:
    """SHA-256 of an export's weights and metadata files: any change to the export changes its feature keys."""
    d = Path(export_dir)
    return hashlib.sha256((file_sha256(d / EXPORT_WEIGHTS) + file_sha256(d / EXPORT_META)).encode()).hexdigest()


def feature_key(export: str, data: str, train: str, test: str, train_subset: int, precision: str) -> str:
    """The cache file name of one export's features: every input they depend on, hashed."""
    blob = {"v": FEATURES_VERSION, "export": export, "data": data, "train": train, "test": test,
            "train_subset": train_subset, "precision": precision}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalContext:
    """What every evaluation of one dataset shares: data, every evaluation's settings (``evals.registry
    .eval_settings``), device, seed and a feature cache. Each evaluation is handed its own settings as an argument
    (``run(ctx, export_dir, ctx.settings[name])``): what it reads is what keys its records."""

    data: DatasetSplits
    settings: dict[str, Any]
    device: torch.device
    seed: int = 0
    progress: bool = True
    disk_cache: bool = True
    """Cache features beside each export (``EXPORT_DIR/features/``) as well as in memory."""
    _cache: dict[Any, tuple[Features, ExportMeta]] | None = None
    _held: dict[str, tuple[Tensor, Tensor]] | None = None
    _digests: dict[tuple[str, int], tuple[Split, str]] | None = None

    def _split_digest(self, name: str, split: Split, subset: int = 0) -> str:
        """:func:`split_digest` of ``self.data``'s split ``name`` (``subset``: its balanced subset), once per split:
        hashing 50k CIFAR images takes a fraction of a second, not nothing."""
        if self._digests is None:
            self._digests = {}
        whole = getattr(self.data, name)
        held = self._digests.get((name, subset))
        if held is None or held[0] is not whole:  # keyed by the split object itself, not a reusable id()
            self._digests[(name, subset)] = held = (whole, split_digest(split))
        return held[1]

    def features(self, export_dir: Path, s: FeatureSettings) -> tuple[Features, ExportMeta]:
        """The export's train (or train-subset) and test features: from memory, else from its cache file, else
        extracted (and cached)."""
        export_dir = Path(export_dir)
        precision = feature_precision(s.feature_precision, self.device)
        train = balanced_subset(self.data.train, s.train_subset)
        train_id = self._split_digest("train", train, s.train_subset)
        key = feature_key(export_digest(export_dir), self.data.name, train_id,
                          self._split_digest("test", self.data.test), s.train_subset, precision)
        if self._cache is None:
            self._cache = {}
        if key not in self._cache:
            path = export_dir / CACHE_DIR / f"{key}.pt"
            feats = self._load(path, key, len(train)) if self.disk_cache else None
            if feats is None:
                model, meta = self._model(export_dir)
                t0 = time.perf_counter()
                feats = Features(*extract(model, train, meta, self, "train", s.feature_batch_size, precision),
                                 *extract(model, self.data.test, meta, self, "test", s.feature_batch_size, precision),
                                 self.data.num_classes, precision)
                feats.seconds = time.perf_counter() - t0
                log.info("features of %s: %d + %d images in %.1fs (%s)", export_dir, len(train), len(self.data.test),
                         feats.seconds, precision)
                if self.disk_cache:
                    self._save(path, key, feats)
            else:
                meta, _ = read_export(export_dir, weights=False)
            self._cache = {key: (feats, meta)}  # one export at a time keeps memory flat
        return self._cache[key]

    def _model(self, export_dir: Path) -> tuple[nn.Module, ExportMeta]:
        """The export's encoder (verified, strictly loaded) on this context's device."""
        model, meta = load_export(export_dir)
        return model.to(self.device), meta

    def held_out_features(self, export_dir: Path, s: FeatureSettings, n: int) -> tuple[Tensor, Tensor] | None:
        """Features and labels of ``n`` training images outside ``s.train_subset`` (class-balanced, fixed by the
        data alone: :func:`repro.data.held_out_of_subset`), extracted once and cached beside the export like the
        others; None when the subset leaves fewer than ``n`` images out (or there is no subset)."""
        split = held_out_of_subset(self.data.train, s.train_subset, n)
        if split is None:
            return None
        export_dir = Path(export_dir)
        precision = feature_precision(s.feature_precision, self.device)
        key = feature_key(export_digest(export_dir), self.data.name, split_digest(split), "held-out",
                          s.train_subset, precision)
        if self._held is None or key not in self._held:
            path = export_dir / CACHE_DIR / f"{key}.pt"
            got = self._load_pair(path, key, len(split)) if self.disk_cache else None
            if got is None:
                model, meta = self._model(export_dir)
                t0 = time.perf_counter()
                got = extract(model, split, meta, self, "held-out", s.feature_batch_size, precision)
                log.info("features of %s: %d held-out training images in %.1fs (%s)", export_dir, len(split),
                         time.perf_counter() - t0, precision)
                if self.disk_cache:
                    state = {"key": key, "x": got[0].cpu(), "y": got[1].cpu(), "digest": _tensor_digest(*got)}
                    try:
                        atomic_write(path, lambda p: torch.save(state, p))
                    except (OSError, CheckpointError) as e:
                        log.warning("%s: cannot cache features (%s)", path, e)
            self._held = {key: got}  # one export at a time keeps memory flat
        return self._held[key]

    def _load_pair(self, path: Path, key: str, n: int) -> tuple[Tensor, Tensor] | None:
        """Cached held-out (features, labels) at ``path`` if they load and fit ``key``; None (re-extract) otherwise."""
        if not path.is_file():
            return None
        try:
            d = torch.load(path, map_location=self.device, weights_only=True)
            x, y = d["x"], d["y"]
            if not (d["key"] == key and d["digest"] == _tensor_digest(x, y) and x.dtype == torch.float32
                    and x.ndim == 2 and x.shape[0] == y.shape[0] == n):
                raise ValueError("contents do not match the key, the split or the dtype")
            return x, y
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, foreign: never trusted, extracted again
            log.warning("%s: unreadable feature cache (%s: %s); extracting again", path, type(e).__name__, e)
            return None

    def _load(self, path: Path, key: str, n_train: int) -> Features | None:
        """The cached features at ``path`` if they load and fit ``key`` and the splits; None (re-extract) otherwise."""
        if not path.is_file():
            return None
        try:
            d = torch.load(path, map_location=self.device, weights_only=True)
            tx, ty, vx, vy = d["train_x"], d["train_y"], d["test_x"], d["test_y"]
            ok = (d["key"] == key and d["digest"] == _tensor_digest(tx, ty, vx, vy)
                  and tx.dtype == vx.dtype == torch.float32 and tx.ndim == vx.ndim == 2
                  and tx.shape[1] == vx.shape[1] and tx.shape[0] == ty.shape[0] == n_train
                  and vx.shape[0] == vy.shape[0] == len(self.data.test)
                  and int(d["num_classes"]) == self.data.num_classes)
            if not ok:
                raise ValueError("contents do not match the key, the splits or the dtype")
            return Features(tx, ty, vx, vy, int(d["num_classes"]), str(d["precision"]))
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, foreign: never trusted, extracted again
            log.warning("%s: unreadable feature cache (%s: %s); extracting again", path, type(e).__name__, e)
            return None

    def _save(self, path: Path, key: str, f: Features) -> None:
        tensors = {"train_x": f.train_x.cpu(), "train_y": f.train_y.cpu(), "test_x": f.test_x.cpu(),
                   "test_y": f.test_y.cpu()}
        state = {"key": key, **tensors, "num_classes": f.num_classes, "precision": f.precision,
                 "digest": _tensor_digest(*tensors.values())}
        try:
            atomic_write(path, lambda p: torch.save(state, p))
        except (OSError, CheckpointError) as e:  # a read-only or full disk: still evaluated, only not cached
            log.warning("%s: cannot cache features (%s)", path, e)


def _tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' bytes: a cache file whose numbers changed on disk (a flipped bit) is not trusted."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def extract(model: nn.Module, split: Split, meta: ExportMeta, ctx: EvalContext, name: str,
            batch_size: int, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Features (fp32, whatever ``precision`` the forward ran in) and labels of a whole split, in order."""
    model.eval()
    xs, ys = [], []
    batches = eval_batches(split, meta.img_size, meta.mean, meta.std, batch_size, ctx.device)
    total = (len(split) + batch_size - 1) // batch_size
    for x, y in tqdm(batches, total=total, desc=f"features {name}", disable=not ctx.progress, leave=False):
        with autocast(ctx.device, precision):
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        xs.append(f.float())
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def subset_note(ctx: EvalContext, s: FeatureSettings) -> str:
    """What the frozen-feature protocols trained on, when ``eval.train_subset`` shrank it ('' otherwise)."""
    if 0 < s.train_subset < len(ctx.data.train):
        return f"; train = a fixed class-balanced {s.train_subset} of {len(ctx.data.train)} images"
    return ""


def precision_note(f: Features) -> str:
    """The precision of the frozen forward, for a record's ``selection`` text."""
    return f"; features {f.precision}"


def make_record(ctx: EvalContext, meta: ExportMeta, eval_name: str, metric: str, value: float, selection: str,
                seconds: float) -> ResultRecord:
    """A result row for one number measured on an export; pretraining facts come from ``backbone.json``."""
    return export_record(meta, ctx.data.name, eval_name, metric, value, selection, seconds)


def export_record(meta: ExportMeta, dataset: str, eval_name: str, metric: str, value: float, selection: str,
                  seconds: float) -> ResultRecord:
    """A result row for ``dataset``'s table: the export's pretraining facts plus one measured number."""
    return record_from_export(meta, dataset, eval_name, metric, value, selection, eval_seconds=seconds)
