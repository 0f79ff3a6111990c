"""Linear probe, MAE protocol, on cached frozen features.

Frozen encoder -> cls feature -> BatchNorm1d(affine=False, eps=1e-6) -> Linear (weights N(0, 0.01) truncated,
bias 0); LARS (momentum 0.9, trust ratio on weight matrices only, weight decay 0), lr = base_lr x batch / 256,
10 warmup epochs then cosine over 90 epochs (MAE ``main_linprobe.py``).

Selection: every base lr in ``eval.linear_base_lrs`` is trained at once (one head each, one shared BN) on
train minus a held-out slice; the lr with the best held-out accuracy is then retrained on the whole train
split and reported on the test split at its last epoch. The test split never chooses anything.

Deviation from MAE's protocol: features are extracted once from centre-cropped images and cached, so the
probe sees no RandomResizedCrop/flip augmentation (MAE augments every epoch). Cheap enough to sweep lrs;
stated in every record's ``selection`` field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import Tensor, nn

from evals.features import EvalContext, FeatureSettings, make_record, subset_note
from repro.config import ConfigError
from repro.records import ResultRecord
from repro.schedules import cosine_after_warmup


@dataclass(frozen=True, kw_only=True)
class Settings(FeatureSettings):
    """``eval.*`` settings of the linear probe."""

    linear_epochs: int = 90
    """Linear-probe epochs (MAE protocol: 90)."""
    linear_warmup_epochs: int = 10
    """Linear-probe warmup epochs (MAE protocol: 10)."""
    linear_batch_size: int = 16384
    """Linear-probe batch (MAE protocol: 16384); capped at the training-set size."""
    linear_base_lrs: tuple[float, ...] = (0.025, 0.05, 0.1, 0.2, 0.4)
    """Base learning rates swept (x batch/256); MAE's default is 0.1."""
    holdout_fraction: float = 0.1
    """Slice of train held out to select the linear-probe learning rate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.holdout_fraction < 0.5:
            raise ConfigError("eval.holdout_fraction must be in (0, 0.5)")
        if not self.linear_base_lrs:
            raise ConfigError("eval.linear_base_lrs must not be empty")
        if self.linear_epochs < 1 or self.linear_batch_size < 1 or self.linear_warmup_epochs < 0:
            raise ConfigError("eval.linear_epochs and eval.linear_batch_size must be positive, "
                              "eval.linear_warmup_epochs >= 0")


class ProbeHeads(nn.Module):
    """One BatchNorm (no affine) shared by ``n`` linear heads, one per learning rate."""

    def __init__(self, dim: int, num_classes: int, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n))
        for h in self.heads:
            assert isinstance(h, nn.Linear)
            trunc_normal_(h.weight, std=0.01)
            nn.init.zeros_(h.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.bn(x)
        return [h(z) for h in self.heads]


def train_probes(x: Tensor, y: Tensor, num_classes: int, base_lrs: tuple[float, ...], cfg: Settings,
                 seed: int) -> ProbeHeads:
    """Train one head per base lr for ``cfg.linear_epochs`` epochs over the rows of (x, y)."""
    n = x.shape[0]
    batch = min(cfg.linear_batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = cfg.linear_epochs * steps_per_epoch
    warmup = cfg.linear_warmup_epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probes = ProbeHeads(x.shape[1], num_classes, len(base_lrs)).to(x.device)
    groups = []
    for head, blr in zip(probes.heads, base_lrs, strict=True):
        peak = blr * batch / 256
        # MAE's LARS adapts only matrices (p.ndim > 1); timm's Lars adapts a group when always_adapt is set
        groups.append({"params": [head.weight], "peak": peak, "always_adapt": True})
        groups.append({"params": [head.bias], "peak": peak, "always_adapt": False})
    opt = Lars(groups, lr=0.0, momentum=0.9, weight_decay=0.0)
    probes.train()
    step = 0
    for _ in range(cfg.linear_epochs):
        perm = torch.randperm(n, generator=g).to(x.device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            logits = probes(x[idx])
            loss = torch.stack([F.cross_entropy(lg, y[idx]) for lg in logits]).sum()
            for grp in opt.param_groups:
                grp["lr"] = cosine_after_warmup(step, warmup, grp["peak"], (step - warmup) / max(1, total - warmup))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probes.eval()
    return probes


@torch.no_grad()
def accuracies(probes: ProbeHeads, x: Tensor, y: Tensor) -> list[float]:
    return [(lg.argmax(1) == y).float().mean().item() * 100 for lg in probes(x)]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    k = max(1, int(round(n * fraction)))
    return perm[k:], perm[:k]


def run(ctx: EvalContext, export_dir: Path, cfg: Settings) -> list[ResultRecord]:
    t0 = time.perf_counter()
    f, meta = ctx.features(export_dir, cfg)
    fit_idx, val_idx = holdout_split(f.train_x.shape[0], cfg.holdout_fraction, ctx.seed)
    dev = f.train_x.device
    fit_idx, val_idx = fit_idx.to(dev), val_idx.to(dev)
    sweep = train_probes(f.train_x[fit_idx], f.train_y[fit_idx], f.num_classes, cfg.linear_base_lrs, cfg, ctx.seed)
    val_acc = accuracies(sweep, f.train_x[val_idx], f.train_y[val_idx])
    best = max(range(len(val_acc)), key=lambda i: val_acc[i])
    blr = cfg.linear_base_lrs[best]
    final = train_probes(f.train_x, f.train_y, f.num_classes, (blr,), cfg, ctx.seed)
    test_acc = accuracies(final, f.test_x, f.test_y)[0]
    rule = (f"base_lr {blr} chosen from {list(cfg.linear_base_lrs)} on a {cfg.holdout_fraction:.0%} held-out slice "
            f"of train (held-out top1 {val_acc[best]:.2f}); retrained on all train, last epoch; cached "
            "centre-crop features (no probe augmentation)" + subset_note(ctx, cfg))
    return [make_record(ctx, meta, "linear", "top1", test_acc, rule, time.perf_counter() - t0)]


if __name__ == "__main__":
    import sys

    from evals.cli import main

    sys.exit(main("linear", __doc__))
