"""Frozen-feature extraction shared by the kNN and linear-probe evaluations.

Features are the exported model's own pre-logits output (``forward_head(forward_features(x), pre_logits=True)``):
for our exports (timm ``global_pool='token'``) that is the cls token after the final norm, the MAE/MoCo v3
linear-probe feature. They are extracted once per export and cached for every probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from repro.checkpoint import ExportMeta, load_export
from repro.config import EvalConfig
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


@dataclass
class EvalContext:
    """What every evaluation of one dataset shares: data, protocol settings, device and a feature cache."""

    data: DatasetSplits
    cfg: EvalConfig
    device: torch.device
    seed: int = 0
    progress: bool = True
    _cache: dict[str, tuple[Features, ExportMeta]] | None = None

    def features(self, export_dir: Path) -> tuple[Features, ExportMeta]:
        key = str(Path(export_dir).resolve())
        if self._cache is None:
            self._cache = {}
        if key not in self._cache:
            model, meta = load_export(Path(export_dir))
            model.to(self.device)
            train = balanced_subset(self.data.train, self.cfg.train_subset)
            feats = Features(*extract(model, train, meta, self, "train"),
                             *extract(model, self.data.test, meta, self, "test"), self.data.num_classes)
            self._cache = {key: (feats, meta)}  # one export at a time keeps memory flat
        return self._cache[key]


@torch.inference_mode()
def extract(model: nn.Module, split: Split, meta: ExportMeta, ctx: EvalContext, name: str) -> tuple[Tensor, Tensor]:
    model.eval()
    xs, ys = [], []
    autocast = ctx.device.type == "cuda"
    batches = eval_batches(split, meta.img_size, meta.mean, meta.std, ctx.cfg.feature_batch_size, ctx.device)
    total = (len(split) + ctx.cfg.feature_batch_size - 1) // ctx.cfg.feature_batch_size
    for x, y in tqdm(batches, total=total, desc=f"features {name}", disable=not ctx.progress, leave=False):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        xs.append(f.float())
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def subset_note(ctx: EvalContext) -> str:
    """What the frozen-feature protocols trained on, when ``eval.train_subset`` shrank it ('' otherwise)."""
    if 0 < ctx.cfg.train_subset < len(ctx.data.train):
        return f"; train = a fixed class-balanced {ctx.cfg.train_subset} of {len(ctx.data.train)} images"
    return ""


def make_record(ctx: EvalContext, meta: ExportMeta, eval_name: str, metric: str, value: float, selection: str,
                seconds: float) -> ResultRecord:
    """A result row for one number measured on an export; pretraining facts come from ``backbone.json``."""
    return export_record(meta, ctx.data.name, eval_name, metric, value, selection, seconds)


def export_record(meta: ExportMeta, dataset: str, eval_name: str, metric: str, value: float, selection: str,
                  seconds: float) -> ResultRecord:
    """A result row for ``dataset``'s table: the export's pretraining facts plus one measured number."""
    return record_from_export(meta, dataset, eval_name, metric, value, selection, eval_seconds=seconds)
