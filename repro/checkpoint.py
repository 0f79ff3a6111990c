"""Atomic checkpoints (resume) and backbone exports (safetensors + JSON metadata).

Every file is written to a temporary name in the same directory, flushed and fsync'ed, then renamed over
the destination: an interrupted write leaves the previous file intact and is never loaded. Checkpoints
load with ``weights_only=True``; exports load strictly into the timm model named in ``backbone.json``
(missing or unexpected keys are an error, never a silent partial load).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CHECKPOINT = "checkpoint.pt"
EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_META = "backbone.json"


class CheckpointError(RuntimeError):
    """A checkpoint or export that cannot be used; the message names the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then fsync and rename ``tmp`` over ``path``; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(p: Path) -> None:
        p.write_text(text)

    atomic_write(path, write)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files of :func:`atomic_write` calls that were killed before their cleanup ran.

    They are never loaded, but each killed checkpoint write would otherwise leave a checkpoint's worth of disk
    behind. Call only as the directory's single writer (rank 0 of a run directory, before it writes).
    """
    stale = [p for p in Path(directory).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class OutputError(CheckpointError):
    """An output directory that cannot take a run (not a directory, not writable, short of space)."""


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def run_disk_bytes(method: nn.Module, export: nn.Module) -> int:
    """Peak disk a run needs: while an atomic checkpoint save runs the old and the new file coexist (2 x model
    state + AdamW's two moments of every trainable parameter), plus the exported backbone."""
    state = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in method.parameters() if p.requires_grad)
    return 2 * (state + moments) + sum(t.numel() * t.element_size() for t in export.state_dict().values())


def check_output_dir(path: Path, need_bytes: int = 0) -> None:
    """Fail before any work, creating nothing: ``path``, or the nearest ancestor that exists, must be a writable
    directory with ``need_bytes`` free (an OutputError names the path)."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{path}: not a directory" if probe == path else f"{path}: cannot be created, {probe} "
                          "is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):  # O_TMPFILE where supported: nothing visible is created
            pass
    except OSError as e:
        where = "" if probe == path else f"{probe}: "
        raise OutputError(f"{path}: not writable ({where}{e.strerror or e})") from None
    free = free_bytes(probe) if need_bytes else 0
    if need_bytes and free < need_bytes:
        raise OutputError(f"{path}: {_size(free)} free, this run needs about {_size(need_bytes)} (two checkpoints "
                          "of model and optimizer state, and the export)")


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; a truncated or foreign file is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle payloads refused by weights_only, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


@dataclass(frozen=True)
class ExportMeta:
    """``backbone.json``: everything needed to rebuild and evaluate the exported encoder."""

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
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: Path) -> ExportMeta:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable export metadata ({e})") from None
        missing = [k for k in ("timm_model", "timm_kwargs", "mean", "std") if k not in d]
        if missing:
            raise CheckpointError(f"{path}: missing fields {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("img_size", int(d["timm_kwargs"].get("img_size", 224)))
        d.setdefault("patch_size", int(d["timm_kwargs"].get("patch_size", 16)))
        for k, default in (("method", "unknown"), ("steps", 0), ("budget", ""), ("budget_seconds", None),
                           ("config_hash", ""), ("git_revision", "")):
            d.setdefault(k, default)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def export_backbone(out_dir: Path, state: dict[str, Tensor], meta: ExportMeta | None) -> None:
    """Write ``backbone.safetensors`` and ``backbone.json`` atomically (weights first, metadata last).

    ``meta=None`` writes the weights only: the export stays unfinished until :func:`write_export_meta`.
    """
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(out_dir / EXPORT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if meta is not None:
        write_export_meta(out_dir, meta)


def write_export_meta(out_dir: Path, meta: ExportMeta) -> None:
    atomic_write_text(Path(out_dir) / EXPORT_META, json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")


def export_extra(out_dir: Path, name: str, state: dict[str, Tensor]) -> Path:
    """Write a method part beside the backbone as ``<name>.safetensors`` (e.g. MoCo v3's projector)."""
    path = Path(out_dir) / f"{name}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return path


def read_extra(export_dir: Path, name: str) -> dict[str, Tensor]:
    """The tensors of ``<name>.safetensors`` in an export directory (CheckpointError when absent/unreadable)."""
    path = Path(export_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None


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
    """``backbone.json`` and (unless ``weights=False``) the raw ``backbone.safetensors`` tensors of an export."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise CheckpointError(f"{export_dir}: export directory does not exist")
    meta_path, weights_path = export_dir / EXPORT_META, export_dir / EXPORT_WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (an export is {EXPORT_WEIGHTS} + {EXPORT_META})")
    meta = ExportMeta.from_json(meta_path)
    if not weights:
        return meta, {}
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{weights_path}: unreadable safetensors ({e})") from None
    return meta, state


def load_export(export_dir: Path) -> tuple[nn.Module, ExportMeta]:
    """Rebuild the timm model named in ``backbone.json`` and load ``backbone.safetensors`` into it strictly."""
    from repro.backbone import create_timm_model

    meta, state = read_export(export_dir)
    meta_path, weights_path = Path(export_dir) / EXPORT_META, Path(export_dir) / EXPORT_WEIGHTS
    try:
        model = create_timm_model(meta.timm_model, dict(meta.timm_kwargs))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{meta_path}: cannot build timm model {meta.timm_model!r} ({e})") from None
    load_strict(model, state, str(weights_path))
    return model, meta
