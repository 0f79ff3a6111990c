"""An export: the encoder's weights as a plain timm state dict (``backbone.safetensors``) and what produced them
(``backbone.json``: :class:`ExportMeta`). Evaluations read nothing else, so any timm checkpoint (a released MAE or
MoCo v3 model, ``repro.convert``) is evaluated like ours.

Everything about an export is here: its metadata and how it is built for each kind of export (a pre-training run,
the random-init floor, a bench teacher, a converted release: one function each), writing it (weights first, the
metadata last: ``backbone.json`` marks the export complete), reading it back (each file checked against its
``.sha256``; the weights loaded strictly into the timm model the metadata names: missing or unexpected keys are an
error, never a silent partial load), and the result record built from it. Files are written atomically with their
checksums by :mod:`repro.checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from repro.backbone import MaskedViT, create_timm_model
from repro.checkpoint import CheckpointError, ChecksumError, atomic_write, read_checksum, verify_file, warn_unverified
from repro.records import ResultRecord, git_revision, model_label, now_iso

if TYPE_CHECKING:
    from repro.config import RunConfig
    from repro.data import DatasetSplits
    from repro.trainer import TrainResult

EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_META = "backbone.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of a two-stage pre-training (MimCo: its MoCo v3 teacher, then itself)."""

    budget: str
    steps: int
    seconds: float
    method: str | None = None
    """Stage 1: the method it trained (the teacher)."""
    final_loss: float | None = None
    """Stage 1: its last logged loss."""
    export: str | None = None
    """Stage 1: its export directory."""


@dataclass(frozen=True, kw_only=True)
class Pretraining:
    """What a pre-training run planned and measured, from the trainer (``repro.trainer.TrainResult.facts``) to
    ``backbone.json`` (its "extra" object) to every result record of the export (:func:`record_from_export`). None
    where an export does not say: the random-init floor states only its recipe and 0 s, older exports lack the
    fields added after them, converted releases state none."""

    recipe: str = ""
    pretrain_seconds: float | None = None
    """Wall-clock of the training steps on this hardware (calibration excluded); both stages' of a two-stage run."""
    device_hours: float | None = None
    """pretrain_seconds x world_size / 3600."""
    images_per_second: float | None = None
    final_loss: float | None = None
    """Mean loss of the last logging interval."""
    data_wait_share: float | None = None
    """Share of the wall-clock spent waiting for batches (``repro.records.DATA_BOUND_SHARE``)."""
    device: str = ""
    world_size: int | None = None
    epochs: float | None = None
    global_batch: int | None = None
    lr: float | None = None
    """Peak learning rate (after batch scaling)."""
    warmup_steps: int | None = None
    flops_per_image: float | None = None
    """Analytic training FLOPs per image (``repro.flops``); None for a method without a count."""
    seconds_per_step_calibrated: float | None = None
    """Wall-clock budgets: the measured seconds per step the first plan divided the budget by."""
    calibration_seconds: float | None = None
    planned_steps: int | None = None
    """Wall-clock budgets that re-planned: the first plan's step count (the export's ``steps`` are the last)."""
    revisions: tuple[tuple[int, int], ...] = ()
    """Wall-clock budgets: (step, new total steps) of each re-plan from the measured speed (``repro.plan``)."""
    stage1: Stage | None = None
    stage2: Stage | None = None
    variant: str = ""
    """How the run's settings differ from its recipe's (``RunConfig.variant``); '' for the recipe as it is."""

    @classmethod
    def from_json(cls, extra: dict[str, Any]) -> Pretraining:
        d = _known(cls, extra)
        d["revisions"] = tuple((int(s), int(t)) for s, t in d.get("revisions", ()))
        for name in ("stage1", "stage2"):
            if d.get(name) is not None:
                d[name] = Stage(**_known(Stage, d[name]))
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class ReleasedHead:
    """The trained linear classifier of a released linear-classification checkpoint, kept beside its export."""

    file: str
    num_classes: int
    best_acc1: float | None
    """The top-1 the release reports for it (``main_lincls.py``'s ``best_acc1``)."""
    epoch: float | None
    arch: str | None
    source: str


@dataclass(frozen=True, kw_only=True)
class Conversion:
    """Where a converted export came from (``repro.convert``): the released file, its format and layout, where the
    head count came from, what was dropped (part -> tensor count) and the classifier kept, if any."""

    converted_from: str
    format: str
    layout: str
    heads_from: str
    dropped: dict[str, int]
    epoch: int | None
    head: ReleasedHead | None = None

    @classmethod
    def from_json(cls, extra: dict[str, Any]) -> Conversion:
        d = _known(cls, extra)
        d.setdefault("epoch", None)
        if d.get("head") is not None:
            d["head"] = ReleasedHead(**{"best_acc1": None, "epoch": None, "arch": None, **_known(ReleasedHead,
                                                                                                 d["head"])})
        return cls(**d)


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The items of a JSON object that are fields of the dataclass ``cls`` (keys it does not know are left out)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _said(obj: Any) -> dict[str, Any]:
    """A record as JSON: its fields that say something (None, '' and () are left out, as older exports lack them)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if v is None or v == "" or v == ():
            continue
        out[f.name] = _said(v) if is_dataclass(v) else [list(r) for r in v] if f.name == "revisions" else v
    return out


@dataclass(frozen=True)
class ExportMeta:
    """``backbone.json``: everything needed to rebuild and evaluate the exported encoder, and what produced it."""

    timm_model: str
    timm_kwargs: dict[str, Any]
    img_size: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str
    steps: int
    budget: str
    budget_seconds: float | None
    config_hash: str
    git_revision: str
    dataset: str = ""
    seed: int = 0
    precision: str = ""
    """The resolved precision pre-training ran in ('fp32' or 'bf16'); '' in exports written before it was recorded
    (fp32 on CPU, bf16 on CUDA) and in exports no training produced (random init, converted checkpoints)."""
    pretraining: Pretraining = field(default_factory=Pretraining)
    conversion: Conversion | None = None
    """Converted releases only (``repro.convert``)."""
    note: str = ""
    """A line for the pretrain record: how a two-stage budget was split, a teacher given from outside it, a release."""
    weights_sha256: str = field(default="", compare=False)
    """SHA-256 of the ``backbone.safetensors`` this metadata came with: set by :func:`read_export` from the bytes it
    verified (and by the export writers from the bytes they wrote); not stored in ``backbone.json`` (its sidecar
    ``backbone.safetensors.sha256`` is the record). Result records carry it (``export_sha256``)."""

    _TYPED = ("pretraining", "conversion", "note", "weights_sha256")

    def to_json(self) -> dict[str, Any]:
        """The ``backbone.json`` object. The run's facts, the conversion and the note share one "extra" object, the
        layout every export has had."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._TYPED}
        extra = {**_said(self.pretraining), **(_said(self.conversion) if self.conversion else {})}
        d["extra"] = {**extra, **({"note": self.note} if self.note else {})}
        return d

    @classmethod
    def from_json(cls, path: Path) -> ExportMeta:
        """Read ``backbone.json``, of any version: fields added later take their defaults."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable export metadata ({e})") from None
        missing = [k for k in ("timm_model", "timm_kwargs", "mean", "std") if k not in d]
        if missing:
            raise CheckpointError(f"{path}: missing fields {', '.join(missing)}")
        extra = d.get("extra") or {}
        d = {k: v for k, v in _known(cls, d).items() if k not in cls._TYPED}
        d.setdefault("img_size", int(d["timm_kwargs"].get("img_size", 224)))
        d.setdefault("patch_size", int(d["timm_kwargs"].get("patch_size", 16)))
        for k, default in (("method", "unknown"), ("steps", 0), ("budget", ""), ("budget_seconds", None),
                           ("config_hash", ""), ("git_revision", "")):
            d.setdefault(k, default)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        conversion = Conversion.from_json(extra) if "converted_from" in extra else None
        return cls(**d, pretraining=Pretraining.from_json(extra), conversion=conversion, note=extra.get("note", ""))


# ---------------------------------------------------------------------------------------------- building the metadata


def _meta(backbone: MaskedViT, **fields: Any) -> ExportMeta:
    """``backbone``'s timm architecture plus ``fields``."""
    return ExportMeta(timm_model=backbone.timm_name, timm_kwargs=backbone.timm_kwargs, img_size=backbone.img_size,
                      patch_size=backbone.patch_size, **fields)


def trained_meta(cfg: RunConfig, backbone: MaskedViT, data: DatasetSplits, result: TrainResult) -> ExportMeta:
    """The metadata of a pre-training run's export: its config, data and budget, and what the trainer planned and
    measured (``result``)."""
    return _meta(backbone, mean=tuple(data.mean), std=tuple(data.std), method=cfg.method, steps=result.steps,
                 budget=cfg.budget.spec.text, budget_seconds=cfg.budget.spec.seconds, config_hash=cfg.config_hash(),
                 git_revision=git_revision(), dataset=data.name, seed=cfg.seed, precision=result.precision,
                 pretraining=replace(result.facts(cfg.recipe), variant=cfg.variant()))


def random_init_meta(backbone: MaskedViT, data: DatasetSplits, seed: int, recipe: str) -> ExportMeta:
    """The metadata of the random-init floor: the backbone at step 0, no budget."""
    return _meta(backbone, mean=tuple(data.mean), std=tuple(data.std), method="random-init", steps=0, budget="-",
                 budget_seconds=0.0, config_hash="", git_revision=git_revision(), dataset=data.name, seed=seed,
                 pretraining=Pretraining(recipe=recipe, pretrain_seconds=0.0))


def teacher_meta(backbone: MaskedViT, method: str) -> ExportMeta:
    """The metadata of a randomly initialised ``method`` export that stands in for a trained teacher (``repro.bench``,
    the tests): no data, no budget."""
    return _meta(backbone, mean=(0.5,) * 3, std=(0.25,) * 3, method=method, steps=0, budget="-", budget_seconds=None,
                 config_hash="bench", git_revision="")


def converted_meta(timm_model: str, timm_kwargs: dict[str, Any], conversion: Conversion, note: str) -> ExportMeta:
    """The metadata of a released ImageNet-1k checkpoint converted by ``repro.convert`` (ImageNet mean and std)."""
    return ExportMeta(timm_model=timm_model, timm_kwargs=timm_kwargs, img_size=timm_kwargs["img_size"],
                      patch_size=timm_kwargs["patch_size"], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      method=conversion.format, steps=0, budget="official", budget_seconds=None, config_hash="",
                      git_revision=git_revision(), dataset="imagenet-1k", seed=0, conversion=conversion, note=note)


# ---------------------------------------------------------------------------------------------- writing and reading


EXPORT_ADVICE = "rerun the command that wrote the export (or restore a copy of it)"


def _safetensors_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 16)


def export_backbone(out_dir: Path, state: dict[str, Tensor], meta: ExportMeta | None) -> ExportMeta | None:
    """Write ``backbone.safetensors`` and ``backbone.json`` atomically (weights first, metadata last), each with its
    ``.sha256``; returns ``meta`` with ``weights_sha256`` set (None without ``meta``).

    ``meta=None`` writes the weights only: the export stays unfinished until :func:`write_export_meta`.
    """
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(out_dir / EXPORT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
                 checksum=True, need_bytes=_safetensors_bytes(tensors))
    if meta is not None:
        return write_export_meta(out_dir, meta)
    return None


def write_export_meta(out_dir: Path, meta: ExportMeta) -> ExportMeta:
    """Write ``backbone.json`` (+ its ``.sha256``), which completes an export; returns ``meta`` with the checksum of
    the weights already written beside it (``weights_sha256``; '' for weights without a checksum)."""
    d = meta.to_json()  # without weights_sha256: the weights' own sidecar is the record of their bytes
    atomic_write(Path(out_dir) / EXPORT_META, lambda p: p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n"),
                 checksum=True)
    return replace(meta, weights_sha256=_weights_checksum(out_dir))


def _weights_checksum(out_dir: Path) -> str:
    return (read_checksum(Path(out_dir) / EXPORT_WEIGHTS) or [""])[-1]


def export_meta_with_checksum(out_dir: Path) -> ExportMeta:
    """A finished export's ``backbone.json`` with its weights' checksum (``weights_sha256``) from their sidecar, as
    :func:`write_export_meta` returns it when the export is written: a run found finished and a run just finished
    name their export alike."""
    meta = ExportMeta.from_json(Path(out_dir) / EXPORT_META)
    return replace(meta, weights_sha256=_weights_checksum(out_dir))


def export_extra(out_dir: Path, name: str, state: dict[str, Tensor]) -> Path:
    """Write a method part beside the backbone as ``<name>.safetensors`` (e.g. MoCo v3's projector), checksummed."""
    path = Path(out_dir) / f"{name}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}), checksum=True,
                 need_bytes=_safetensors_bytes(tensors))
    return path


def verify_export_file(path: Path, what: str) -> str:
    """Check one file of an export against its ``.sha256`` (a one-line warning when it has none: exports from before
    checksums still load); returns its digest. :class:`ChecksumError` (nothing loaded) on a mismatch."""
    try:
        digest, checked = verify_file(path, what)
    except ChecksumError as e:
        raise ChecksumError(f"{e}; {EXPORT_ADVICE}") from None
    if not checked:
        warn_unverified(path, what)
    return digest


def load_safetensors(path: Path) -> tuple[dict[str, Tensor], str]:
    """The tensors of a checksummed ``.safetensors`` file and its verified digest (CheckpointError when absent,
    changed since it was written, or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    digest = verify_export_file(path, "safetensors")
    try:
        return load_file(str(path)), digest
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None


def read_extra(export_dir: Path, name: str) -> dict[str, Tensor]:
    """The tensors of ``<name>.safetensors`` in an export directory (CheckpointError when absent/unreadable)."""
    return load_safetensors(Path(export_dir) / f"{name}.safetensors")[0]


def load_strict(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists the offending keys and names the file."""
    expected, got = set(model.state_dict().keys()), set(state.keys())
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}"
                         f"{', ...' if len(unexpected) > 4 else ''})")
        raise CheckpointError(f"{where}: weights do not match the model: {'; '.join(parts)}")
    mismatched = [k for k, v in model.state_dict().items() if tuple(v.shape) != tuple(state[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(f"{where}: shape mismatch for {k}: file {tuple(state[k].shape)} vs model "
                              f"{tuple(model.state_dict()[k].shape)} ({len(mismatched)} tensors differ)")
    model.load_state_dict(state, strict=True)


def read_export(export_dir: Path, weights: bool = True) -> tuple[ExportMeta, dict[str, Tensor]]:
    """``backbone.json`` and (unless ``weights=False``) the raw ``backbone.safetensors`` tensors of an export.

    Both files are checked against their checksums first, also with ``weights=False`` (a corrupted export fails
    before any data is loaded); the metadata returned carries the weights' digest (``weights_sha256``)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise CheckpointError(f"{export_dir}: export directory does not exist")
    meta_path, weights_path = export_dir / EXPORT_META, export_dir / EXPORT_WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (an export is {EXPORT_WEIGHTS} + {EXPORT_META})")
    verify_export_file(meta_path, "export metadata")
    meta = ExportMeta.from_json(meta_path)
    if not weights:
        return replace(meta, weights_sha256=verify_export_file(weights_path, "safetensors")), {}
    state, digest = load_safetensors(weights_path)
    return replace(meta, weights_sha256=digest), state


def load_export(export_dir: Path) -> tuple[nn.Module, ExportMeta]:
    """Rebuild the timm model named in ``backbone.json`` and load ``backbone.safetensors`` into it strictly."""
    meta, state = read_export(export_dir)
    meta_path, weights_path = Path(export_dir) / EXPORT_META, Path(export_dir) / EXPORT_WEIGHTS
    try:
        model = create_timm_model(meta.timm_model, dict(meta.timm_kwargs))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{meta_path}: cannot build timm model {meta.timm_model!r} ({e})") from None
    load_strict(model, state, str(weights_path))
    return model, meta


# ---------------------------------------------------------------------------------------------- the record


def record_from_export(meta: ExportMeta, dataset: str, eval_name: str, metric: str, value: float, selection: str,
                       **fields: Any) -> ResultRecord:
    """A result row for ``dataset``'s table: the export's pre-training facts (``backbone.json``) plus one number;
    ``fields`` set the rest (``eval_seconds``, ``note``, ...) or replace a default (``git_revision``: the code that
    measured the number unless given)."""
    p = meta.pretraining
    base: dict[str, Any] = dict(
        method=meta.method, model=model_label(meta.timm_model, meta.timm_kwargs), dataset=dataset,
        budget=meta.budget, eval=eval_name, metric=metric, value=float(value), seed=meta.seed, selection=selection,
        device=p.device, world_size=1 if p.world_size is None else p.world_size, budget_seconds=meta.budget_seconds,
        pretrain_seconds=p.pretrain_seconds, steps=meta.steps, epochs=p.epochs,
        images_per_second=p.images_per_second, device_hours=p.device_hours,
        config_hash=meta.config_hash, git_revision=git_revision(), recipe=p.recipe, time=now_iso(),
        export_sha256=meta.weights_sha256,
        precision=meta.precision, variant=p.variant,
    )
    return ResultRecord(**{**base, **fields})

