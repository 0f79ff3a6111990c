"""Frozen-feature extraction shared by the kNN and linear-probe evaluations.

Features are the exported model's own pre-logits output (``forward_head(forward_features(x), pre_logits=True)``):
for our exports (timm ``global_pool='token'``) that is the cls token after the final norm, the MAE/MoCo v3
linear-probe feature. They are extracted once per export and cached for every probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from evals.settings import UNKEYED
from repro.checkpoint import ExportMeta, load_export
from repro.config import ConfigError
from repro.data import DatasetSplits, Split, balanced_subset
from repro.records import ResultRecord, record_from_export
from repro.sources import eval_batches


@dataclass
class Features:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


@dataclass(frozen=True, kw_only=True)
class FeatureSettings:
    """The settings of every protocol on cached frozen features (kNN, linear probe)."""

    train_subset: int = 0
    """kNN bank and linear-probe training set: 0 = the whole training split; N = a class-balanced subset of N
    training images, fixed by the dataset alone (same images for every export and seed). The test split is always
    used whole. A CPU saving: frozen features cost a forward pass per image."""
    feature_batch_size: int = field(default=256, metadata=UNKEYED)
    """Batch for frozen feature extraction (and the fine-tune's test pass)."""

    def __post_init__(self) -> None:
        if self.train_subset < 0:
            raise ConfigError("eval.train_subset must be >= 0 (0 = the whole training split)")
        if self.feature_batch_size < 1:
            raise ConfigError("eval.feature_batch_size must be positive")


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
    _cache: dict[Any, tuple[Features, ExportMeta]] | None = None

    def features(self, export_dir: Path, s: FeatureSettings) -> tuple[Features, ExportMeta]:
        key = (str(Path(export_dir).resolve()), s.train_subset)
        if self._cache is None:
            self._cache = {}
        if key not in self._cache:
            model, meta = load_export(Path(export_dir))
            model.to(self.device)
            train = balanced_subset(self.data.train, s.train_subset)
            feats = Features(*extract(model, train, meta, self, "train", s.feature_batch_size),
                             *extract(model, self.data.test, meta, self, "test", s.feature_batch_size),
                             self.data.num_classes)
            self._cache = {key: (feats, meta)}  # one export at a time keeps memory flat
        return self._cache[key]


@torch.inference_mode()
def extract(model: nn.Module, split: Split, meta: ExportMeta, ctx: EvalContext, name: str,
            batch_size: int) -> tuple[Tensor, Tensor]:
    model.eval()
    xs, ys = [], []
    autocast = ctx.device.type == "cuda"
    batches = eval_batches(split, meta.img_size, meta.mean, meta.std, batch_size, ctx.device)
    total = (len(split) + batch_size - 1) // batch_size
    for x, y in tqdm(batches, total=total, desc=f"features {name}", disable=not ctx.progress, leave=False):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        xs.append(f.float())
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def subset_note(ctx: EvalContext, s: FeatureSettings) -> str:
    """What the frozen-feature protocols trained on, when ``eval.train_subset`` shrank it ('' otherwise)."""
    if 0 < s.train_subset < len(ctx.data.train):
        return f"; train = a fixed class-balanced {s.train_subset} of {len(ctx.data.train)} images"
    return ""


def make_record(ctx: EvalContext, meta: ExportMeta, eval_name: str, metric: str, value: float, selection: str,
                seconds: float) -> ResultRecord:
    """A result row for one number measured on an export; pretraining facts come from ``backbone.json``."""
    return export_record(meta, ctx.data.name, eval_name, metric, value, selection, seconds)


def export_record(meta: ExportMeta, dataset: str, eval_name: str, metric: str, value: float, selection: str,
                  seconds: float) -> ResultRecord:
    """A result row for ``dataset``'s table: the export's pretraining facts plus one measured number."""
    return record_from_export(meta, dataset, eval_name, metric, value, selection, eval_seconds=seconds)
