"""Everything the dense evaluations pass to mmseg/mmdet, built by one typed function (no mm* import here).

The native mmengine configs of the tasks (``evals/segmentation/configs``, ``evals/detection/configs``) hold the
papers' recipes and run as they are with OpenMMLab's own tools. The launcher never edits them: it starts from them
and applies the flat ``--cfg-options``-style dictionary that :func:`cfg_options` builds from a :class:`DenseJob`
(export geometry, data location, recipe, device, world size): the keys every task shares here, the task's own
(heads, pipelines, data layout, lr schedule) from its :class:`DenseTask` record (:mod:`evals.dense.tasks`). That
dictionary is the whole interface between this project and mm*, and it is unit-tested in the core environment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, make_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from repro.export import read_export


class DenseError(ValueError):
    """A bad dense-eval input (export, data, recipe, option), reported as one line."""


@dataclass(frozen=True, kw_only=True)
class DenseRecipe:
    """One training schedule for a dense task. The paper recipes' values cite their source."""

    name: str
    task: str
    iters: int
    """Training iterations (optimizer steps)."""
    batch_size: int
    """Global batch (images per iteration over all processes)."""
    lr: float
    """AdamW learning rate for the whole model (before layer decay)."""
    weight_decay: float
    layer_decay: float
    """Block i of L gets lr x layer_decay^(L + 1 - (i + 1)); embeddings layer_decay^(L + 1); heads x1."""
    warmup_iters: int
    crop: int
    """Training crop (ADE20K: square crop; COCO: the LSJ canvas, also the test pad size)."""
    drop_path: float
    checkpoint_interval: int
    """Iterations between mmengine checkpoints (the run resumes from the last one)."""
    workers: int
    """DataLoader workers per process."""
    head_channels: int | None = None
    """UperNet channels (None = the ViT width, as MAE's/BEiT's ADE20K configs) / FPN channels for COCO."""
    lr_steps: tuple[float, ...] = ()
    """COCO: fractions of ``iters`` where the lr drops x0.1 (ViTDet); ADE20K uses linear (poly 1.0) decay."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random resize range (ADE20K: of 2048x512; COCO LSJ: of the crop)."""
    test_scale: tuple[int, int] = (2048, 512)
    """ADE20K: single-scale test resize (long, short), keep ratio; COCO: unused (test = crop)."""
    log_interval: int = 50
    score_thr: float = 0.05
    """COCO: minimum detection score kept at test time (0.05 in Mask R-CNN/ViTDet)."""


def as_reported(job: DenseJob, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
    """The test pass's metrics as mm* reported them, and no note (:attr:`DenseTask.fill_metrics`' default)."""
    return metrics, ""


@dataclass(frozen=True, kw_only=True)
class DenseTask:
    """Everything task-specific about one dense evaluation, in one record (:data:`evals.dense.tasks.TASKS` lists
    them). From it follow the task's ``eval.*`` settings (:attr:`settings`), its entry in ``evals.registry``, the
    check before pre-training (``evals.dense.check_ready``, which ``repro.run`` calls for every listed task), its
    command line (``python -m evals.dense <name>``, or :attr:`module`'s), and in the launcher its data check, mm
    scope, native config, part of :func:`cfg_options` and records."""

    name: str
    """The evaluation's name: ``repro.run --evals <name>``, the ``eval`` field of its records."""
    config: Path
    """Its native mmengine config (runs as it is with OpenMMLab's tools; the launcher applies :func:`cfg_options`)."""
    mm_package: str
    """The OpenMMLab package whose ``utils.register_all_modules`` sets the default scope (mmseg, mmdet)."""
    requires: tuple[str, ...]
    """Packages it imports (the ``dense`` extra), checked before pre-training."""
    data_hint: str
    """What ``--data`` / ``eval.<name>_data`` must point at."""
    splits: tuple[str, str]
    """Default training and evaluation splits (``eval.<name>_train_split``, ``_val_split``)."""
    recipes: Mapping[str, DenseRecipe]
    """Its schedules by name; the one named like the task is the paper's and the default."""
    metrics: Mapping[str, tuple[str, float]]
    """Record metric -> (mm metric key of the test pass, scale to percent)."""
    check_data: Callable[[Path, str, str], object]
    """``check_data(root, train_split, val_split)`` raises :class:`DenseError` naming what is wrong (no mm*)."""
    options: Callable[[DenseJob], dict[str, Any]]
    """The task's own ``--cfg-options`` (backbone taps, heads, pipelines, data layout, lr schedule)."""
    fill_metrics: Callable[[DenseJob, dict[str, float]], tuple[dict[str, float], str]] = as_reported
    """The test pass's metrics as they are recorded, and a note for the records."""
    module: str | None = None
    """A package whose ``python -m`` runs it too (its ``__main__`` calls :func:`evals.dense.launch.main`); None:
    ``python -m evals.dense <name>`` only."""
    settings: type = field(init=False)
    """The task's settings dataclass: ``eval.<name>_data``, ``_recipe``, ``_train_split``, ``_val_split`` (every
    field keys its evaluations: the data path names the dataset)."""

    def __post_init__(self) -> None:
        n = self.name
        if n not in self.recipes or any(r.task != n or r.name != k for k, r in self.recipes.items()):
            raise ValueError(f"dense task {n!r}: its recipes must include {n!r} (the paper's), each keyed by its name "
                             "and naming this task")
        object.__setattr__(self, "settings", make_dataclass(f"{n.title()}Settings", [
            (f"{n}_data", str | None, field(default=None)),
            (f"{n}_recipe", str, field(default=n)),
            (f"{n}_train_split", str, field(default=self.splits[0])),
            (f"{n}_val_split", str, field(default=self.splits[1])),
        ], frozen=True, kw_only=True))

    def values(self, s: Any) -> tuple[str | None, str, str, str]:
        """(data, recipe, train split, val split) from an instance of :attr:`settings`."""
        n = self.name
        return (getattr(s, f"{n}_data"), getattr(s, f"{n}_recipe"), getattr(s, f"{n}_train_split"),
                getattr(s, f"{n}_val_split"))

    @property
    def argv(self) -> tuple[str, ...]:
        """The ``python`` arguments that start its launcher (the launcher's own options follow)."""
        return ("-m", self.module) if self.module else ("-m", "evals.dense", self.name)

    @property
    def prog(self) -> str:
        """Its command as help and error lines name it."""
        return self.module or f"evals.dense {self.name}"


@dataclass(frozen=True, kw_only=True)
class ViTGeometry:
    """What the adapter and heads need to know about an export (read from ``backbone.json``)."""

    depth: int
    embed_dim: int
    patch_size: int

    def out_indices(self) -> tuple[int, ...]:
        """Blocks feeding the pyramid: 4/6/8/12 (1-based) for ViT-B, 8/12/16/24 for ViT-L, i.e. L/3, L/2, 2L/3, L."""
        d = self.depth
        return (d // 3 - 1, d // 2 - 1, 2 * d // 3 - 1, d - 1)

    def rescales(self) -> tuple[float, ...]:
        """Resampling factors from the patch grid to strides 4, 8, 16, 32 (ViT-B/16: 4, 2, 1, 0.5)."""
        return tuple(self.patch_size / s for s in (4, 8, 16, 32))


def vit_geometry(vit: Any) -> ViTGeometry:
    """Depth, width and patch size of a timm ``VisionTransformer`` (real or on the meta device)."""
    p = vit.patch_embed.patch_size
    return ViTGeometry(depth=len(vit.blocks), embed_dim=int(vit.embed_dim),
                       patch_size=int(p[0] if isinstance(p, tuple | list) else p))


def check_geometry(g: ViTGeometry, where: str) -> None:
    p = g.patch_size
    if p < 2 or p & (p - 1):
        raise DenseError(f"{where}: patch size {p} is not a power of two >= 2; the feature pyramid resamples "
                         "the patch grid to strides 4/8/16/32 by factors of two")
    if g.depth < 3:
        raise DenseError(f"{where}: depth {g.depth} < 3 blocks; the pyramid taps blocks L/3, L/2, 2L/3 and L")


def read_geometry(export: Path) -> ViTGeometry:
    """Depth, width and patch size of an export's ViT, built on the meta device (no weights read)."""
    import timm.models.vision_transformer as tv

    from repro.backbone import create_timm_model

    meta, _ = read_export(export, weights=False)
    try:
        with torch.device("meta"):
            vit = create_timm_model(meta.timm_model, dict(meta.timm_kwargs))
    except Exception as e:  # noqa: BLE001
        raise DenseError(f"{export}: cannot build timm model {meta.timm_model!r} ({e})") from None
    if not isinstance(vit, tv.VisionTransformer):
        raise DenseError(f"{export}: {meta.timm_model} is a {type(vit).__name__}, not a timm VisionTransformer; "
                         "the dense evals take plain ViT exports")
    g = vit_geometry(vit)
    check_geometry(g, str(export))
    return g


@dataclass(frozen=True, kw_only=True)
class DenseJob:
    """One dense evaluation of one export."""

    task: DenseTask
    export: Path
    data_root: Path
    work_dir: Path
    recipe: DenseRecipe
    geometry: ViTGeometry
    train_split: str
    val_split: str
    seed: int = 0
    cuda: bool = False
    world_size: int = 1

    def with_recipe(self, **changes: Any) -> DenseJob:
        return replace(self, recipe=replace(self.recipe, **changes))


def warmup(r: DenseRecipe, start_factor: float) -> tuple[int, list[dict[str, Any]]]:
    """The linear warm-up every task's lr schedule starts with: (its length, [LinearLR] or [])."""
    # mmengine's LinearLR reaches its end factor only after end - begin >= 2 steps; shorter warm-ups are skipped,
    # and a run no longer than its warm-up is all warm-up.
    warm = min(r.warmup_iters, r.iters) if r.warmup_iters >= 2 and r.iters >= 2 else 0
    if not warm:
        return 0, []
    return warm, [dict(type="LinearLR", start_factor=start_factor, by_epoch=False, begin=0, end=warm)]


def cfg_options(job: DenseJob) -> dict[str, Any]:
    """The flat ``--cfg-options`` dictionary (dotted keys) applied on top of the task's native config: the keys
    every task shares, then the task's own (:attr:`DenseTask.options`)."""
    r, g = job.recipe, job.geometry
    if r.task != job.task.name:
        raise DenseError(f"recipe {r.name!r} is for {r.task}, not {job.task.name}")
    if r.iters < 1 or r.batch_size < 1:
        raise DenseError(f"recipe {r.name!r}: iters and batch_size must be >= 1")
    if r.batch_size % job.world_size:
        raise DenseError(f"recipe {r.name!r}: global batch {r.batch_size} is not divisible by {job.world_size} "
                         "processes")
    check_geometry(g, str(job.export))
    per_gpu = r.batch_size // job.world_size
    workers = dict(num_workers=r.workers, persistent_workers=r.workers > 0)
    opts: dict[str, Any] = {
        "work_dir": str(job.work_dir),
        "randomness": dict(seed=job.seed, deterministic=False),
        "model.backbone.export": str(job.export),
        "model.backbone.drop_path_rate": r.drop_path,
        "train_cfg": dict(type="IterBasedTrainLoop", max_iters=r.iters, val_interval=r.iters + 1),
        "optim_wrapper": dict(
            _delete_=True, type="AmpOptimWrapper" if job.cuda else "OptimWrapper",
            **(dict(dtype="bfloat16") if job.cuda else {}),
            optimizer=dict(type="AdamW", lr=r.lr, betas=(0.9, 0.999), weight_decay=r.weight_decay),
            constructor="ReproLayerDecayOptimizerConstructor",
            paramwise_cfg=dict(layer_decay=r.layer_decay)),
        "default_hooks.checkpoint": dict(type="CheckpointHook", by_epoch=False, interval=r.checkpoint_interval,
                                         max_keep_ckpts=1, save_last=True),
        "default_hooks.logger": dict(type="LoggerHook", interval=r.log_interval, log_metric_by_epoch=False),
        "train_dataloader.batch_size": per_gpu,
        "train_dataloader.dataset.data_root": str(job.data_root),
        "val_dataloader.dataset.data_root": str(job.data_root),
        "test_dataloader.dataset.data_root": str(job.data_root),
        "resume": True,
        "load_from": None,
    }
    for split in ("train", "val", "test"):
        for k, v in workers.items():
            opts[f"{split}_dataloader.{k}"] = v
    opts.update(job.task.options(job))
    return opts
