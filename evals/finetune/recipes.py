"""Fine-tuning schedules: MAE's (``vit-b``, ``vit-l``) and the scaled-down ones for 32-px data (deviation 1 of
:mod:`evals.finetune`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class FinetuneRecipe:
    """One fine-tuning schedule; the fields without defaults are what MAE changes between model sizes."""

    epochs: float
    base_lr: float
    """lr = base_lr x batch / 256."""
    layer_decay: float
    drop_path: float
    batch_size: int
    warmup_epochs: float
    weight_decay: float = 0.05
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25


FINETUNE_RECIPES: dict[str, FinetuneRecipe] = {
    # MAE Table 9 / appendix A.3 and main_finetune.py (ViT-B; ViT-L/H use 50 epochs)
    "vit-b": FinetuneRecipe(epochs=100, base_lr=5e-4, layer_decay=0.65, drop_path=0.1, batch_size=1024,
                            warmup_epochs=5),
    "vit-l": FinetuneRecipe(epochs=50, base_lr=1e-3, layer_decay=0.75, drop_path=0.2, batch_size=1024,
                            warmup_epochs=5),
    # DEVIATION(1): 5k 32-px built-in images, 6-block ViT-Tiny, 2-core CPU, in about a minute. One step of batch
    # 128 over all 65 tokens costs ~0.75 s there (~170 img/s), so 3 epochs (117 steps) take ~1.5 min. Batch 128,
    # not 1024: the same images then give >100 optimizer steps rather than 15. Base lr 1e-3 (MAE's ViT-L value;
    # lr 5e-4 at batch 128): a short schedule has little time to travel. Layer decay 0.75: over 6 blocks the
    # embedding already sits at 0.75^7 = 0.13 of the top lr (ViT-B's 0.65 over 12 blocks gives 0.004, which
    # would all but freeze a shallow model's stem in so short a run). Drop path 0.1 as ViT-B (a shallow, narrow
    # model needs no more). Warmup 0.5 epoch (~20 steps; 5/100 of the run would be ~6). Mixup/CutMix/label
    # smoothing/RandAugment/erasing stay at MAE's values. Measured cost of the time limit: after 3 epochs the
    # train loss is still ~2.25 (ln 10 = 2.30) and top-1 is 17-26% for random-init and 90-s MAE/MiCL exports,
    # too close to chance to rank them; eval.finetune_epochs=10 (~5.5 min) reached 38-44% on held-out images.
    "small32": FinetuneRecipe(epochs=3, base_lr=1e-3, layer_decay=0.75, drop_path=0.1, batch_size=128,
                              warmup_epochs=0.5),
    # DEVIATION(1): CIFAR-10 (50k 32-px images), 12-block ViT-S/4, one GPU, the same for every export and for the
    # supervised-from-scratch row. 100 epochs of ViT-S at 65 tokens would take longer than the pre-training budget
    # it evaluates; 15 epochs of batch 512 (1,465 steps) fit in about a minute on an H100-class GPU. Base lr 1e-3
    # (lr 2e-3 at batch 512; MAE's ViT-L value, for a short schedule), layer decay 0.65 as ViT-B (12 blocks),
    # drop path 0.1, warmup 1 epoch; mixup/CutMix/label smoothing/RandAugment/erasing at MAE's values.
    # Chosen before any CIFAR result, not tuned.
    "cifar10": FinetuneRecipe(epochs=15, base_lr=1e-3, layer_decay=0.65, drop_path=0.1, batch_size=512,
                              warmup_epochs=1),
}
