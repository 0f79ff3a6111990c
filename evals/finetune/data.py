"""Fine-tuning data: MAE's training transform (timm ``create_transform`` with RandAugment and RandomErasing) on
PIL images, one seeded permutation per epoch."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from timm.data import create_transform
from timm.data.auto_augment import RandAugment

from evals.finetune.recipes import FinetuneRecipe
from repro.data import FileImages, Split, TensorImages, _FileDataset, pil_load
from repro.seeds import epoch_seed


def _posterize_any_bits(img, bits_to_keep, **_):
    """timm's ``posterize`` for every bit count: keeping 0 bits gives a black image, as Pillow < 11 did."""
    if bits_to_keep >= 8:
        return img
    mask = ~(2 ** (8 - max(0, int(bits_to_keep))) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def train_transform(recipe: FinetuneRecipe, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """MAE ``build_transform(is_train=True)``: timm ``create_transform`` with RandAugment and RandomErasing."""
    # color_jitter=None as MAE (no jitter; timm would drop it beside RandAugment anyway)
    tf = create_transform(size, is_training=True, color_jitter=None,  # type: ignore[arg-type]
                          auto_augment=recipe.rand_augment or None, interpolation="bicubic", re_prob=recipe.reprob,
                          re_mode="pixel", re_count=1, mean=mean, std=std)
    for t in getattr(tf, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_any_bits  # DEVIATION(3): Pillow >= 11 refuses bits=0
    return tf


class _TensorPilDataset(torch.utils.data.Dataset):
    """In-memory uint8 images handed to a PIL transform one at a time (RandAugment is a PIL pipeline)."""

    def __init__(self, split: TensorImages, transform) -> None:
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3) uint8
        self.labels = split.labels
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        from PIL import Image

        return (self.transform(Image.fromarray(self.images[i])),), int(self.labels[i])


class _EpochBatches(torch.utils.data.Sampler):
    """``steps`` drop-last batches; epoch e is a permutation seeded by (seed, e), as in repro.data.StepSampler."""

    def __init__(self, n: int, batch: int, steps: int, seed: int) -> None:
        self.n, self.batch, self.steps, self.seed = n, batch, steps, seed

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // self.batch
        perm = torch.empty(0, dtype=torch.long)
        for s in range(self.steps):
            epoch, i = divmod(s, per_epoch)
            if i == 0:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
            yield perm[i * self.batch:(i + 1) * self.batch].tolist()

    def __len__(self) -> int:
        return self.steps


def default_workers(device: torch.device) -> int:
    """Augmentation workers: on a CPU they would compete with the training threads, so none below 8 cores."""
    cpus = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if cpus < 8 else min(4, cpus // 4)
    return min(8, max(1, cpus - 1))


def image_dataset(split: Split, transform) -> torch.utils.data.Dataset:
    """Item i = ((transform(PIL image i),), label i), for in-memory and file splits alike."""
    if isinstance(split, TensorImages):
        return _TensorPilDataset(split, transform)
    assert isinstance(split, FileImages)
    return _FileDataset(split, pil_load(transform), "skip")


def train_loader(split: Split, transform, batch: int, steps: int, seed: int, device: torch.device):
    ds = image_dataset(split, transform)
    workers = default_workers(device)
    return torch.utils.data.DataLoader(
        ds, batch_sampler=_EpochBatches(len(split), batch, steps, seed), num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
