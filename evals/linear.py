"""Linear probe, MAE protocol, on cached frozen features.

Frozen encoder -> cls feature -> BatchNorm1d(affine=False, eps=1e-6) -> Linear (weights N(0, 0.01) truncated,
bias 0); LARS (momentum 0.9, trust ratio on weight matrices only, weight decay 0), lr = base_lr x batch / 256,
10 warmup epochs then cosine over 90 epochs (MAE ``main_linprobe.py``).

Selection: the base lr is chosen on ``eval.linear_holdout`` (5,000) held-out training images. Where
``eval.train_subset`` leaves that many training images unused (CIFAR-10's 50k with a 10k subset), they are a
class-balanced draw from outside the subset (``eval.linear_holdout_from=outside``): the probes train on the whole
subset and the chosen lr's head is the final probe, with nothing retrained. Otherwise (or with ``inside``) they are
taken from the probe's own training images (:func:`holdout_size` caps them for small sets), the probes training on
the rest, and the chosen lr is retrained on the whole train split. Every base lr of
``eval.linear_base_lrs`` is trained in one pass (one head each, one shared BN; each head is exactly the probe a
run with that lr alone would train: same init, same batches, and a BN without affine is input-only). When the
best held-out accuracy sits on an edge of the grid the grid is widened on that side by its own ratio, one lr at a
time, at most ``eval.linear_widenings`` times (only the new head is trained: it equals the head the first pass
would have trained). The chosen probe is reported on the test split at its last epoch. The test split never
chooses anything. The record's ``selection`` states the final grid, any
widening, the held-out accuracy of every lr and the precision of the features.

Deviation from MAE's protocol: features are extracted once from centre-cropped images and cached, so the
probe sees no RandomResizedCrop/flip augmentation (MAE augments every epoch). Cheap enough to sweep lrs;
stated in every record's ``selection`` field.

``eval.linear_protocol=mocov3`` is MoCo v3's own protocol instead (``main_lincls.py`` and ``CONFIG.md`` of
facebookresearch/moco-v3), the one its papers' linear numbers were measured with: the frozen encoder in eval mode,
a plain ``nn.Linear`` head (weights N(0, 0.01), bias 0, no BatchNorm) on the cls feature, SGD (momentum 0.9, no
weight decay) at lr ``eval.mocov3_base_lr`` (3 for ViTs) x ``eval.mocov3_batch_size`` (1024) / 256, a per-epoch
half-cosine to 0 over ``eval.linear_epochs`` (90), no warm-up, every epoch a fresh RandomResizedCrop (scale 0.08-1,
bilinear) + flip of each training image through the frozen encoder (no cache: the crops change), the last partial
batch kept, test images through the suite's evaluation view (as every protocol here). No lr is chosen. Its records
are ``linear-mocov3`` (their own table column, never averaged with MAE's protocol). One difference, stated in each
record: the official script keeps the best test-set epoch (``best_acc1``); the suite reports the last epoch, as it
never selects on test images.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import Tensor, nn
from tqdm import tqdm

from evals.features import EvalContext, FeatureSettings, make_record, precision_note, subset_note
from repro.config import ConfigError
from repro.export import load_export
from repro.precision import autocast
from repro.records import ResultRecord
from repro.schedules import cosine_after_warmup
from repro.seeds import epoch_seed


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
    """Base learning rates swept (x batch/256), ascending; MAE's default is 0.1. Widened on an edge the choice
    sits on (``eval.linear_widenings``)."""
    linear_holdout: int = 5000
    """Training images held out to choose the base lr: min(linear_holdout, n // 5) of the n probe-training images
    (``eval.train_subset`` or the whole split), so small sets (the 5k built-in images: 1000) keep 80% to fit on."""
    linear_holdout_from: str = "outside"
    """Where the held-out images come from: 'outside' = training images outside ``eval.train_subset`` when it leaves
    ``linear_holdout`` of them (else as 'inside'); 'inside' = min(linear_holdout, n // 5) of the probe's own n
    training images, then the chosen lr retrained on all n."""
    linear_widenings: int = 3
    """How many times the lr grid may be extended (by its own end ratio) on the side where the chosen lr sits on
    its edge; 0 = never."""
    linear_protocol: str = "mae"
    """'mae' (LARS + BatchNorm on cached centre-crop features, lr chosen on held-out images) or 'mocov3' (MoCo v3's
    SGD protocol on fresh crops; records ``linear-mocov3``): see the module docstring."""
    mocov3_base_lr: float = 3.0
    """MoCo v3 protocol: base lr, scaled by batch / 256 (CONFIG.md: 3 for ViT linear classification)."""
    mocov3_batch_size: int = 1024
    """MoCo v3 protocol: batch (main_lincls.py default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        lrs = self.linear_base_lrs
        if not lrs:
            raise ConfigError("eval.linear_base_lrs must not be empty")
        if any(lr <= 0 for lr in lrs) or any(a >= b for a, b in zip(lrs, lrs[1:], strict=False)):
            raise ConfigError("eval.linear_base_lrs must be positive and strictly ascending")
        if self.linear_protocol not in ("mae", "mocov3"):
            raise ConfigError(f"eval.linear_protocol must be mae or mocov3, got {self.linear_protocol!r}")
        if self.mocov3_base_lr <= 0 or self.mocov3_batch_size < 1:
            raise ConfigError("eval.mocov3_base_lr and eval.mocov3_batch_size must be positive")
        if self.linear_holdout_from not in ("outside", "inside"):
            raise ConfigError(f"eval.linear_holdout_from must be outside or inside, got {self.linear_holdout_from!r}")
        if self.linear_holdout < 1 or self.linear_widenings < 0:
            raise ConfigError("eval.linear_holdout must be >= 1 and eval.linear_widenings >= 0")
        if self.linear_epochs < 1 or self.linear_batch_size < 1 or self.linear_warmup_epochs < 0:
            raise ConfigError("eval.linear_epochs and eval.linear_batch_size must be positive, "
                              "eval.linear_warmup_epochs >= 0")


class ProbeHeads(nn.Module):
    """One BatchNorm (no affine) shared by ``n`` linear heads, one per learning rate, all starting from the same
    weights (MAE's init drawn once from ``seed``): head i is the probe a run with lr i alone would start from."""

    def __init__(self, dim: int, num_classes: int, n: int, seed: int = 0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n))
        w0 = torch.empty(num_classes, dim)
        # MAE: timm trunc_normal_(std=0.01), whose bounds (+-2) are absolute: at std 0.01 a plain normal in effect
        nn.init.trunc_normal_(w0, std=0.01, a=-2.0, b=2.0, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for h in self.heads:
                assert isinstance(h, nn.Linear)
                h.weight.copy_(w0)
                h.bias.zero_()

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.bn(x)
        return [h(z) for h in self.heads]


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on a CPU while the probe trains: its ops are tiny (a 256 x 192 by 192 x 10 matmul), so
    a second thread buys nothing and costs a barrier per op, which on shared, oversubscribed cores made the probe
    8-12x slower (measured: 5 epochs on 8k features took 14-45 s with 2 threads, 1.8-3.5 s with 1)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_probes(x: Tensor, y: Tensor, num_classes: int, base_lrs: tuple[float, ...], cfg: Settings,
                 seed: int) -> ProbeHeads:
    """Train one head per base lr for ``cfg.linear_epochs`` epochs over the rows of (x, y) (:func:`_fit`)."""
    with _one_cpu_thread(x.device):
        return _fit(x, y, num_classes, base_lrs, cfg, seed)


def _fit(x: Tensor, y: Tensor, num_classes: int, base_lrs: tuple[float, ...], cfg: Settings,
         seed: int) -> ProbeHeads:
    """Train one head per base lr for ``cfg.linear_epochs`` epochs over the rows of (x, y).

    Heads are independent: each has its own loss term, its own LARS parameter groups (the trust ratio is per
    tensor), and they share only the batches (one generator per call, seeded with ``seed``) and a BN that has no
    parameters, so head i is bit for bit what ``train_probes(x, y, C, (base_lrs[i],), cfg, seed)`` trains."""
    n = x.shape[0]
    batch = min(cfg.linear_batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = cfg.linear_epochs * steps_per_epoch
    warmup = cfg.linear_warmup_epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    probes = ProbeHeads(x.shape[1], num_classes, len(base_lrs), seed).to(x.device)
    groups = []
    for head, blr in zip(probes.heads, base_lrs, strict=True):
        assert isinstance(head, nn.Linear)
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


def holdout_size(n: int, cap: int) -> int:
    """Images held out of ``n`` to choose the lr: ``min(cap, n // 5)``, at least 1. The cap (``eval.linear_holdout``,
    5,000) is the size of the choice's test; ``n // 5`` keeps 80% of a small set to fit on (a probe fitted on
    much less than the final one would favour larger lrs: LARS travel grows with steps)."""
    if n < 2:
        raise ValueError(f"a linear probe needs at least 2 training images to hold one out, got {n}")
    return max(1, min(cap, n // 5))


def holdout_split(n: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, held-out) indices: a random ``k`` of ``n`` held out, fixed by ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[k:], perm[:k]


@dataclass
class Selection:
    """The outcome of the lr choice: the chosen base lr, the final (possibly widened) grid, every lr's held-out
    accuracy, the lrs added by widening (in order) and every lr's trained probe (its heads and the head's index)."""

    lr: float
    grid: list[float]
    val_acc: dict[float, float]
    widened: list[float]
    probes: dict[float, tuple[ProbeHeads, int]]

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Top-1 (%) of the chosen lr's probe on (x, y)."""
        probes, i = self.probes[self.lr]
        return (probes(x)[i].argmax(1) == y).float().mean().item() * 100


def _edge_extension(grid: list[float], best: float) -> float | None:
    """The next lr beyond the edge ``best`` sits on, by the grid's own ratio on that side (None: not on an edge,
    or a one-lr grid, which has no ratio)."""
    if len(grid) < 2:
        return None
    if best == grid[0]:
        return float(f"{grid[0] * grid[0] / grid[1]:.6g}")
    if best == grid[-1]:
        return float(f"{grid[-1] * grid[-1] / grid[-2]:.6g}")
    return None


def select_lr(x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, num_classes: int, cfg: Settings,
              seed: int) -> Selection:
    """Choose the base lr by held-out accuracy (ties: the smaller lr), widening the grid when the choice sits on
    its edge (:data:`Settings.linear_widenings`)."""
    grid = list(cfg.linear_base_lrs)
    first = train_probes(x, y, num_classes, tuple(grid), cfg, seed)
    probes = {lr: (first, i) for i, lr in enumerate(grid)}
    val_acc = dict(zip(grid, accuracies(first, xv, yv), strict=True))
    widened: list[float] = []
    while len(widened) < cfg.linear_widenings:
        new = _edge_extension(grid, max(grid, key=lambda lr: val_acc[lr]))
        if new is None:
            break
        probes[new] = (train_probes(x, y, num_classes, (new,), cfg, seed), 0)
        val_acc[new] = accuracies(probes[new][0], xv, yv)[0]
        grid = sorted([*grid, new])
        widened.append(new)
    return Selection(max(grid, key=lambda lr: val_acc[lr]), grid, val_acc, widened, probes)


def selection_text(sel: Selection, cfg: Settings, k: int, n: int, outside: bool = False) -> str:
    """How the lr was chosen, for the record's ``selection`` field."""
    accs = ", ".join(f"{lr:g}: {sel.val_acc[lr]:.2f}" for lr in sel.grid)
    text = f"base_lr {sel.lr:g} chosen from {[float(f'{lr:g}') for lr in sel.grid]}"
    if sel.widened:
        text += (f" (grid {list(cfg.linear_base_lrs)} widened {len(sel.widened)}x at its edge: "
                 f"{', '.join(f'{lr:g}' for lr in sel.widened)})")
    if _edge_extension(sel.grid, sel.lr) is not None:
        text += " (still on the grid's edge)"
    tail = "; cached centre-crop features (no probe augmentation)"
    if outside:
        return (text + f" on {k} held-out training images outside the {n} the probes train on (held-out top1 per "
                f"lr: {accs}); the chosen lr's probe, last epoch" + tail)
    return (text + f" on a held-out {k} of the {n} training images (held-out top1 per lr: {accs}); retrained on "
            "all train, last epoch" + tail)


def _mocov3_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of shuffled batches, the last partial one kept (the official DataLoader's drop_last=False)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()
    return [perm[i:i + batch] for i in range(0, n, batch)]


def run_mocov3(ctx: EvalContext, export_dir: Path, cfg: Settings) -> list[ResultRecord]:
    """MoCo v3's linear classification protocol (module docstring): a linear head on the frozen encoder's cls
    feature, trained with SGD on fresh random crops every epoch; the last epoch's test top-1."""
    from torchvision import transforms as T

    from evals.finetune.data import default_workers, image_dataset
    from repro.data import balanced_subset

    t0 = time.perf_counter()
    test, meta = ctx.features(export_dir, cfg)  # the test images' features, shared with the other protocols
    model, _ = load_export(export_dir)
    model.to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train = balanced_subset(ctx.data.train, cfg.train_subset)
    transform = T.Compose([T.RandomResizedCrop(meta.img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(meta.mean, meta.std)])
    dataset = image_dataset(train, transform)
    precision = test.precision
    head = nn.Linear(test.test_x.shape[1], test.num_classes).to(ctx.device)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=torch.Generator(device=ctx.device).manual_seed(ctx.seed))
        head.bias.zero_()
    batch = cfg.mocov3_batch_size
    init_lr = cfg.mocov3_base_lr * batch / 256
    opt = torch.optim.SGD(head.parameters(), init_lr, momentum=0.9, weight_decay=0.0)
    torch.manual_seed(ctx.seed)  # the crops' randomness (workers derive theirs from the loader's generator)
    for epoch in tqdm(range(cfg.linear_epochs), desc="linear (mocov3)", disable=not ctx.progress, leave=False):
        for g in opt.param_groups:  # main_lincls.adjust_learning_rate: per epoch, no warm-up
            g["lr"] = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.linear_epochs))
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=_mocov3_batches(len(train), batch, ctx.seed, epoch),
                                             num_workers=default_workers(ctx.device),
                                             generator=torch.Generator().manual_seed(epoch_seed(ctx.seed, epoch)))
        for views, y in loader:
            x = views[0].to(ctx.device, non_blocking=True)
            with torch.inference_mode(), autocast(ctx.device, precision):
                f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
            loss = F.cross_entropy(head(f.float().clone()), y.to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (head(test.test_x).argmax(1) == test.test_y).float().mean().item() * 100
    rule = (f"MoCo v3 protocol (main_lincls.py): SGD lr {cfg.mocov3_base_lr:g} x {batch}/256, momentum 0.9, no weight "
            f"decay, {cfg.linear_epochs} epochs half-cosine, fresh RandomResizedCrop + flip each epoch, no BatchNorm, "
            "nothing selected; last epoch (the official script keeps the best test epoch)"
            + subset_note(ctx, cfg) + precision_note(test))
    return [make_record(ctx, meta, "linear-mocov3", "top1", acc, rule, time.perf_counter() - t0)]


def run(ctx: EvalContext, export_dir: Path, cfg: Settings) -> list[ResultRecord]:
    if cfg.linear_protocol == "mocov3":
        return run_mocov3(ctx, export_dir, cfg)
    t0 = time.perf_counter()
    f, meta = ctx.features(export_dir, cfg)
    n = f.train_x.shape[0]
    held = ctx.held_out_features(export_dir, cfg, cfg.linear_holdout) if cfg.linear_holdout_from == "outside" \
        else None
    if held is not None:  # probes fit on the whole subset; the chosen one is the result
        sel = select_lr(f.train_x, f.train_y, held[0], held[1], f.num_classes, cfg, ctx.seed)
        rule = selection_text(sel, cfg, held[0].shape[0], n, outside=True) + subset_note(ctx, cfg) + precision_note(f)
        return [make_record(ctx, meta, "linear", "top1", sel.accuracy(f.test_x, f.test_y), rule,
                            time.perf_counter() - t0)]
    k = holdout_size(n, cfg.linear_holdout)
    fit_idx, val_idx = holdout_split(n, k, ctx.seed)
    dev = f.train_x.device
    fit_idx, val_idx = fit_idx.to(dev), val_idx.to(dev)
    sel = select_lr(f.train_x[fit_idx], f.train_y[fit_idx], f.train_x[val_idx], f.train_y[val_idx], f.num_classes,
                    cfg, ctx.seed)
    final = train_probes(f.train_x, f.train_y, f.num_classes, (sel.lr,), cfg, ctx.seed)
    test_acc = accuracies(final, f.test_x, f.test_y)[0]
    rule = selection_text(sel, cfg, k, n) + subset_note(ctx, cfg) + precision_note(f)
    return [make_record(ctx, meta, "linear", "top1", test_acc, rule, time.perf_counter() - t0)]


if __name__ == "__main__":
    import sys

    from evals.cli import main

    sys.exit(main("linear", __doc__))
