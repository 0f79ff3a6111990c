"""The fine-tuning loop and its test pass."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm import tqdm

from evals.features import EvalContext
from evals.finetune.data import train_loader, train_transform
from evals.finetune.model import FinetuneNonFinite, KeyMapping, build_finetune_model, make_mixup, make_optimizer
from evals.finetune.recipes import FinetuneRecipe
from repro.config import ConfigError
from repro.data import Split
from repro.export import ExportMeta, read_export
from repro.sources import eval_batches


@dataclass(frozen=True)
class FinetuneResult:
    top1: float
    top5: float
    final_loss: float
    steps: int
    batch_size: int
    epochs: float
    lr: float
    mapping: KeyMapping
    model: nn.Module
    """The fine-tuned model (eval mode)."""


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, meta: ExportMeta, ctx: EvalContext, bs: int) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) on a whole split; top-5 is top-k with k = min(5, classes)."""
    model.eval()
    correct1 = correct5 = total = 0
    k = min(5, ctx.data.num_classes)
    for x, y in tqdm(eval_batches(split, meta.img_size, meta.mean, meta.std, bs, ctx.device),
                     total=(len(split) + bs - 1) // bs, desc="finetune test", disable=not ctx.progress, leave=False):
        # DEVIATION(2): the kNN/linear evaluation views (native size for in-memory images)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
            logits = model(x)
        top = logits.float().topk(k, dim=1).indices
        hit = top == y[:, None]
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        total += y.shape[0]
    return 100.0 * correct1 / total, 100.0 * correct5 / total


def finetune(ctx: EvalContext, export_dir: Path, recipe: FinetuneRecipe, eval_batch_size: int = 256,
             log_every: int = 10) -> tuple[FinetuneResult, ExportMeta]:
    """Fine-tune the export on ``ctx.data.train`` with the configured recipe; evaluate on the test split."""
    meta, state = read_export(Path(export_dir))
    where = str(Path(export_dir))
    torch.manual_seed(ctx.seed)
    random.seed(ctx.seed)  # RandAugment draws from `random`, timm Mixup from numpy
    np.random.seed(ctx.seed)
    model, mapping = build_finetune_model(meta, state, ctx.data.num_classes, recipe.drop_path, where)
    del state
    model.to(ctx.device)

    n = len(ctx.data.train)
    batch = min(recipe.batch_size, n - n % 2)  # DEVIATION(4): capped at the training set; even for Mixup
    if batch < 2:
        raise ConfigError(f"fine-tuning needs at least 2 training images, got {n}")
    steps_per_epoch = n // batch
    total = max(1, round(recipe.epochs * steps_per_epoch))
    warmup = min(round(recipe.warmup_epochs * steps_per_epoch), total - 1)
    lr = recipe.base_lr * batch / 256

    opt = make_optimizer(model, recipe, lr)
    sched = CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=recipe.min_lr, warmup_t=warmup,
                              warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    mixup = make_mixup(recipe, ctx.data.num_classes)
    criterion: nn.Module = SoftTargetCrossEntropy() if mixup is not None else \
        LabelSmoothingCrossEntropy(recipe.label_smoothing)
    loader = train_loader(ctx.data.train, train_transform(recipe, meta.img_size, meta.mean, meta.std), batch, total,
                          ctx.seed, ctx.device)
    cuda = ctx.device.type == "cuda"
    model.train()
    last = float("nan")
    bar = tqdm(loader, total=total, desc="finetune", disable=not ctx.progress, leave=False)
    for step, ((x,), y) in enumerate(bar):
        sched.step_update(step)
        x = x.to(ctx.device, non_blocking=True)
        y = y.to(ctx.device, non_blocking=True)
        target = y
        if mixup is not None:
            x, target = mixup(x, y)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = criterion(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == total - 1:  # the only host syncs of the loop
            last = loss.item()
            if not math.isfinite(last):
                raise FinetuneNonFinite(step, Path(export_dir))
            bar.set_postfix(loss=f"{last:.3f}", lr=f"{opt.param_groups[-1]['lr']:.2e}")
    bar.close()
    top1, top5 = evaluate(model, ctx.data.test, meta, ctx, eval_batch_size)
    return FinetuneResult(top1, top5, last, total, batch, total / steps_per_epoch, lr, mapping, model), meta
