"""End-to-end fine-tuning, MAE protocol (``main_finetune.py``), built from timm parts.

The export's timm ViT is rebuilt with a global-average-pooling head (``global_pool='avg'``: timm then
normalises the pooled patch tokens with a fresh ``fc_norm`` and makes the final ``norm`` an Identity, as MAE's
``models_vit.py`` does), a new ``head`` for the dataset's classes (weight trunc-normal std 2e-5, bias 0) and
stochastic depth. The export is loaded through an explicit, checked key mapping (:func:`map_export_keys`): every
export tensor is used except the final ``norm.weight``/``norm.bias``, which MAE's fine-tune drops too, and the
only tensors left at their fresh init are ``fc_norm.*`` and ``head.*``; anything else is an error, never a
silently random backbone.

Training: AdamW β=(0.9, 0.999), weight decay 0.05 (not on 1-D tensors, pos_embed, cls_token), layer-wise lr decay
(timm ``param_groups_layer_decay``: patch/pos/cls embedding at layer 0, block i at layer i+1, fc_norm and head
at the top, scale ``decay^(depth+1-layer)``), lr = base_lr x batch / 256 with per-iteration linear warmup then
cosine to 1e-6 (timm ``CosineLRScheduler``); Mixup 0.8 / CutMix 1.0 (switch prob 0.5, per batch) with label
smoothing 0.1 and soft-target cross-entropy (timm ``Mixup``, ``SoftTargetCrossEntropy``); per-image
RandomResizedCrop (bicubic) + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + RandomErasing 0.25 (pixel mode)
from timm ``create_transform``; bf16 autocast on CUDA, fp32 on CPU; no gradient clipping.

Reported: top-1 and top-5 on the test split after the LAST epoch. Nothing is selected: no best-epoch picking
(MAE's log prints the running max over epochs; we do not report it), no hyper-parameter search.

Deviations from MAE's protocol:
1. ``small32`` is a scaled-down recipe for 32-px data on a CPU (few epochs, batch 128) and ``cifar10`` one for
   CIFAR-10 on one GPU (15 epochs, batch 512); see their comments. ``vit-b``/``vit-l`` are MAE's numbers.
2. Evaluation views come from :func:`repro.sources.eval_batches`, shared with kNN/linear: in-memory (small) images
   are only normalised at their native size (MAE resizes to size/0.875 and centre-crops; at 32 px that crop
   would throw away 12% of each side); streamed images get MAE's resize + centre crop.
3. RandAugment's ``PosterizeIncreasing`` at magnitude 10 asks PIL to keep 0 bits. MAE's Pillow returned a black
   image; Pillow >= 11 raises. :func:`_posterize_any_bits` restores the old result (a black image) so a ~1-in-40
   draw of ``mstd0.5`` around m=9 no longer crashes the run.
4. A batch larger than the training set is capped to it (rounded down to even): lr still follows
   base_lr x batch / 256 with the batch actually used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from evals.features import EvalContext, make_record
from evals.finetune.data import train_transform
from evals.finetune.loop import FinetuneResult, evaluate, finetune
from evals.finetune.model import (
    DROPPED_EXPORT_KEYS,
    FRESH_PREFIXES,
    FinetuneKeyError,
    FinetuneNonFinite,
    KeyMapping,
    build_finetune_model,
    make_mixup,
    make_optimizer,
    map_export_keys,
)
from evals.finetune.recipes import FINETUNE_RECIPES, FinetuneRecipe
from evals.settings import UNKEYED
from repro.config import ConfigError
from repro.records import ResultRecord


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``eval.*`` settings of the fine-tune."""

    finetune_recipe: str = "vit-b"
    """Named fine-tune recipe in ``evals.finetune.FINETUNE_RECIPES``: vit-b, vit-l (MAE protocol), small32, cifar10."""
    finetune_epochs: float | None = None
    """Override the fine-tune recipe's epochs (warmup is kept, capped at half the run); None = the recipe's."""
    finetune_batch_size: int | None = None
    """Override the fine-tune recipe's batch (lr still scales as base_lr x batch / 256); None = the recipe's."""
    feature_batch_size: int = field(default=256, metadata=UNKEYED)
    """Batch of the test pass."""

    def __post_init__(self) -> None:
        if self.finetune_recipe not in FINETUNE_RECIPES:
            raise ConfigError(f"eval.finetune_recipe: unknown recipe {self.finetune_recipe!r}; choose from "
                              f"{', '.join(FINETUNE_RECIPES)}")
        if self.finetune_epochs is not None and not self.finetune_epochs > 0:
            raise ConfigError("eval.finetune_epochs must be positive")
        if self.finetune_batch_size is not None and (self.finetune_batch_size < 2 or self.finetune_batch_size % 2):
            raise ConfigError("eval.finetune_batch_size must be even and >= 2 (timm Mixup pairs a batch with its "
                              "reverse)")


def resolve_recipe(s: Settings) -> FinetuneRecipe:
    """The named recipe with ``eval.finetune_epochs`` / ``eval.finetune_batch_size`` applied."""
    r = FINETUNE_RECIPES[s.finetune_recipe]
    if s.finetune_epochs is not None:
        r = replace(r, epochs=s.finetune_epochs, warmup_epochs=min(r.warmup_epochs, s.finetune_epochs / 2))
    if s.finetune_batch_size is not None:
        r = replace(r, batch_size=s.finetune_batch_size)
    return r


def run(ctx: EvalContext, export_dir: Path, s: Settings) -> list[ResultRecord]:
    t0 = time.perf_counter()
    recipe = resolve_recipe(s)
    r, meta = finetune(ctx, export_dir, recipe, s.feature_batch_size)
    rule = (f"recipe {s.finetune_recipe}: {r.epochs:g} ep ({r.steps} steps), batch {r.batch_size}, base_lr "
            f"{recipe.base_lr:g} (lr {r.lr:.3g}), layer decay {recipe.layer_decay:g}, drop path {recipe.drop_path:g}, "
            "MAE augmentation fixed; LAST epoch reported, no best-epoch selection; test split never chooses anything")
    seconds = time.perf_counter() - t0
    note = f"final train loss {r.final_loss:.4f}; dropped export keys {list(r.mapping.dropped)}"
    return [replace(make_record(ctx, meta, "finetune", metric, value, rule, seconds), note=note)
            for metric, value in (("top1", r.top1), ("top5", r.top5))]


__all__ = [
    "DROPPED_EXPORT_KEYS",
    "FINETUNE_RECIPES",
    "FRESH_PREFIXES",
    "FinetuneKeyError",
    "FinetuneNonFinite",
    "FinetuneRecipe",
    "FinetuneResult",
    "KeyMapping",
    "Settings",
    "build_finetune_model",
    "evaluate",
    "finetune",
    "make_mixup",
    "make_optimizer",
    "map_export_keys",
    "resolve_recipe",
    "run",
    "train_transform",
]
