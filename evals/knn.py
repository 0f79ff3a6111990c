"""Weighted k-NN on frozen features (DINO protocol): a cheap monitor, not a ranking metric for MIM methods.

Train and test features are L2-normalised; each test image takes the k = 20 most cosine-similar train
images, each voting for its class with weight ``exp(sim / T)``, T = 0.07; top-1 accuracy on the test split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from evals.features import EvalContext, FeatureSettings, make_record, precision_note, subset_note
from repro.config import ConfigError
from repro.records import ResultRecord


def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, k: int, temperature: float,
                chunk: int = 1024) -> Tensor:
    """Predicted class per test row by a similarity-weighted vote of the ``k`` nearest train rows."""
    train_x = F.normalize(train_x.float(), dim=1)
    test_x = F.normalize(test_x.float(), dim=1)
    k = min(k, train_x.shape[0])
    preds = []
    for i in range(0, test_x.shape[0], chunk):
        sim = test_x[i:i + chunk] @ train_x.t()  # (b, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_y[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@dataclass(frozen=True, kw_only=True)
class Settings(FeatureSettings):
    """``eval.*`` settings of the kNN monitor."""

    knn_k: int = 20
    """k of the weighted kNN vote (DINO protocol)."""
    knn_temperature: float = 0.07
    """Temperature of the kNN vote weights exp(sim / T)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knn_k < 1 or not self.knn_temperature > 0:
            raise ConfigError("eval.knn_k must be >= 1 and eval.knn_temperature > 0")


def run(ctx: EvalContext, export_dir: Path, s: Settings) -> list[ResultRecord]:
    t0 = time.perf_counter()
    f, meta = ctx.features(export_dir, s)
    pred = knn_predict(f.train_x, f.train_y, f.test_x, f.num_classes, s.knn_k, s.knn_temperature)
    acc = (pred == f.test_y).float().mean().item() * 100
    rule = (f"k={s.knn_k}, T={s.knn_temperature} fixed (DINO protocol); nothing selected" + subset_note(ctx, s)
            + precision_note(f))
    return [make_record(ctx, meta, "knn", "top1", acc, rule, time.perf_counter() - t0)]


if __name__ == "__main__":
    import sys

    from evals.cli import main

    sys.exit(main("knn", __doc__))
