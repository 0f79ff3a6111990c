"""Atomic checkpoints (resume) and backbone exports (safetensors + JSON metadata).

Every file is written to a temporary name in the same directory, flushed and fsync'ed, then renamed over
the destination: an interrupted write leaves the previous file intact and is never loaded. Checkpoints
load with ``weights_only=True``; exports load strictly into the timm model named in ``backbone.json``
(missing or unexpected keys are an error, never a silent partial load).

Checksums: atomicity does not catch bytes that change after the rename (a bad disk, a partial copy, a flipped
bit), and a changed tensor still loads. So every checkpoint and export file gets ``<name>.sha256`` beside it
(``sha256sum -c`` format), computed from the temp file before its rename and written before it, so that at every
instant the file on disk matches a digest its sidecar lists (during the swap the sidecar lists the old and the new
digest). Loading hashes the file first and loads nothing that does not match; files from before checksums (no
sidecar) load with a one-line warning. The trainer keeps the last two good checkpoints (``checkpoint.pt``,
``checkpoint.prev.pt``; the previous one is a hard link, so it costs no disk while the next is written) and
resumes from the previous one when the newest fails its check. A write that runs out of disk (``ENOSPC``) removes
its temp file, leaves the previous file intact and raises :class:`OutputError` naming the directory and the space
needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
"""The checkpoint before :data:`CHECKPOINT`: what a run resumes from when the newest fails its checksum."""
EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_META = "backbone.json"
CHECKSUM_SUFFIX = ".sha256"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint or export that cannot be used; the message names the file."""


class ChecksumError(CheckpointError):
    """A file whose bytes are not those that were written (its ``.sha256`` sidecar names other digests)."""


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


def atomic_write(path: Path, write: Callable[[Path], object], *, checksum: bool = False,
                 need_bytes: int | None = None, durable: bool = True) -> str | None:
    """Call ``write(tmp)`` then fsync and rename ``tmp`` over ``path``; the temp file is removed on failure.

    ``checksum=True`` also keeps ``<path>.sha256`` (see the module docstring for the order that keeps file and
    sidecar consistent across a kill) and returns the digest. A write that fails for lack of space raises
    :class:`OutputError` naming the directory and ``need_bytes`` (the expected size of the file, when known).
    ``durable=False`` skips the fsyncs (still atomic, but a power cut may bring back the previous version): for writes
    whose loss is harmless.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    digest: str | None = None
    old: list[str] = []
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if checksum:
            digest = file_sha256(tmp)  # the bytes that were written, before anything else can touch them
            # while the swap runs the sidecar accepts the file in place (its last recorded digest: a file that no
            # longer matches it stays refused) and its successor
            old = [d for d in (read_checksum(path) or [])[-1:] if d != digest] if path.exists() else []
            atomic_write_text(checksum_path(path), _checksum_text(path, [*old, digest]))
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        full = isinstance(e, Exception) and not isinstance(e, OutputError) and _out_of_space(
            e, path.parent, written, need_bytes)
        tmp.unlink(missing_ok=True)
        if full:
            raise _no_space_error(path, need_bytes or written) from None
        raise
    if digest is not None and old:
        # the old digest no longer names anything; losing this write (a failure, a power cut) leaves a sidecar that
        # is still right, so it need not wait for the disk
        with contextlib.suppress(OSError, OutputError):
            atomic_write_text(checksum_path(path), _checksum_text(path, [digest]), durable=False)
    return digest


def _out_of_space(e: BaseException, directory: Path, written: int, need_bytes: int | None) -> bool:
    """Whether a failed write ran out of disk. ``torch.save`` to a path reports ENOSPC as a bare RuntimeError
    ('unexpected pos ...'), so besides the errno (anywhere in the exception chain) the free space decides: the file
    did not fit (``written`` + free < ``need_bytes``), or the filesystem is full."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cur) or "os error 28" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    try:
        free = free_bytes(directory)
    except OSError:
        return False
    return (need_bytes is not None and written + free < need_bytes) or free < 64 * 1024


def _no_space_error(path: Path, need: int) -> OutputError:
    try:
        free = _size(free_bytes(path.parent))
    except OSError:
        free = "?"
    return OutputError(f"{path.parent}: no space left on the device while writing {path.name} (it needs about "
                       f"{_size(need)}, {free} free); free some space there and rerun the same command: it resumes "
                       "from the last good checkpoint")


def checksum_path(path: Path) -> Path:
    """``<path>.sha256``: the digest(s) of ``path`` as written."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (memory stays flat for multi-GB checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_text(path: Path, digests: list[str]) -> str:
    return "".join(f"{d}  {Path(path).name}\n" for d in digests)


def read_checksum(path: Path) -> list[str] | None:
    """The digests ``<path>.sha256`` accepts for ``path`` (None: no sidecar; []: a sidecar that names none, as an
    unreadable or garbled one does, so nothing matches it)."""
    side = checksum_path(path)
    try:
        text = side.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in text.splitlines():
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if len(word) == 64 and all(c in "0123456789abcdef" for c in word):
            out.append(word)
    return out


def write_checksum(path: Path) -> str:
    """Record the current bytes of ``path`` as good (``<path>.sha256``); returns the digest. For files this module
    did not write (a hand-made export); never needed after :func:`atomic_write` with ``checksum=True``."""
    digest = file_sha256(path)
    atomic_write_text(checksum_path(path), _checksum_text(path, [digest]))
    return digest


def verify_file(path: Path, what: str = "file") -> tuple[str, bool]:
    """Hash ``path`` and check it against its sidecar: ``(digest, True)`` when it matches, ``(digest, False)`` when
    there is no sidecar (written before checksums existed); :class:`ChecksumError` when it does not match."""
    path = Path(path)
    digest = file_sha256(path)
    accepted = read_checksum(path)
    if accepted is None:
        return digest, False
    if digest not in accepted:
        said = accepted[-1][:12] + "..." if accepted else "no valid digest"
        raise ChecksumError(f"{path}: unreadable {what}: its bytes changed after it was written (sha256 "
                            f"{digest[:12]}..., {checksum_path(path).name} says {said}: disk or copy corruption)")
    return digest, True


_WARNED: set[str] = set()


def _warn_unverified(path: Path, what: str) -> None:
    key = str(Path(path).absolute())
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s: no %s (written before checksums existed); %s loaded unverified", path,
                    checksum_path(path).name, what)


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    def write(p: Path) -> None:
        p.write_text(text)

    atomic_write(path, write, durable=durable)


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


def previous_checkpoint(path: Path) -> Path:
    """``checkpoint.prev.pt`` beside ``checkpoint.pt``: the last good checkpoint before the newest."""
    path = Path(path)
    return path.with_name(PREVIOUS_CHECKPOINT if path.name == CHECKPOINT else f"{path.stem}.prev{path.suffix}")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (a checkpoint's size, give or take its pickled structure)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _keep_as_previous(path: Path) -> None:
    """Before ``path`` is replaced: make it the previous checkpoint if it still verifies (a hard link: no disk while
    the next one is written), replacing the older previous one; drop it if it does not, keeping the previous one.
    Either way the disk holds at most two checkpoints during the write (what :func:`run_disk_bytes` budgets)."""
    prev = previous_checkpoint(path)
    try:
        digest, _ = verify_file(path, "checkpoint")
    except ChecksumError as e:
        log.warning("%s; not kept as the previous checkpoint (%s stays)", e, prev.name)
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
        return
    prev.unlink(missing_ok=True)  # file first, sidecar second: never a previous checkpoint without its sidecar
    checksum_path(prev).unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{prev.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # a filesystem without hard links: a copy (the disk then briefly holds three)
            shutil.copyfile(path, tmp)
        atomic_write_text(checksum_path(prev), _checksum_text(prev, [digest]))
        os.replace(tmp, prev)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space_error(prev, path.stat().st_size) from None
        raise


def save_checkpoint(path: Path, state: dict[str, Any], *, keep_previous: bool = True) -> None:
    """Write ``state`` atomically with its checksum; the checkpoint it replaces becomes the previous one
    (``keep_previous``). Out of disk: :class:`OutputError`, both earlier checkpoints intact."""
    path = Path(path)
    if keep_previous and path.exists():
        _keep_as_previous(path)
    atomic_write(path, lambda p: torch.save(state, p), checksum=True, need_bytes=_tensor_bytes(state) + (1 << 16))


def load_checkpoint(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` after checking its checksum (``verify``); a changed,
    truncated or foreign file is a CheckpointError and nothing of it is loaded."""
    if verify:
        _, checked = verify_file(path, "checkpoint")
        if not checked:
            _warn_unverified(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle payloads refused by weights_only, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


def resume_checkpoint(path: Path) -> tuple[dict[str, Any], Path, list[str]] | None:
    """The state to resume from: ``path`` if it verifies and loads, else the previous checkpoint. Returns the state,
    the file it came from and one line per newer file that was passed over (for the caller to print); None when
    there is no checkpoint. When none is usable: a one-line CheckpointError naming the file and what to do."""
    path = Path(path)
    candidates = [p for p in (path, previous_checkpoint(path)) if p.exists()]
    skipped: list[str] = []
    for p in candidates:
        try:
            return load_checkpoint(p), p, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    if not candidates:
        return None
    others = "; the previous checkpoint fails too" if len(candidates) > 1 else "; there is no previous checkpoint"
    raise CheckpointError(f"{skipped[0]}{others}: nothing was loaded. Restore {path.name} from a copy, or delete "
                          f"the run directory {path.parent} to train again from step 0")


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
    precision: str = ""
    """The resolved precision pre-training ran in ('fp32' or 'bf16'); '' in exports written before it was recorded
    (fp32 on CPU, bf16 on CUDA) and in exports no training produced (random init, converted checkpoints)."""
    extra: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = field(default="", compare=False)
    """SHA-256 of the ``backbone.safetensors`` this metadata came with: set by :func:`read_export` from the bytes it
    verified (and by the export writers from the bytes they wrote); not stored in ``backbone.json`` (its sidecar
    ``backbone.safetensors.sha256`` is the record). Result records carry it (``export_sha256``)."""

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
    d = asdict(meta)
    d.pop("weights_sha256")  # the weights' own sidecar is the record of their bytes
    atomic_write(Path(out_dir) / EXPORT_META, lambda p: p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n"),
                 checksum=True)
    return replace(meta, weights_sha256=(read_checksum(Path(out_dir) / EXPORT_WEIGHTS) or [""])[-1])


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
        _warn_unverified(path, what)
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
    from repro.backbone import create_timm_model

    meta, state = read_export(export_dir)
    meta_path, weights_path = Path(export_dir) / EXPORT_META, Path(export_dir) / EXPORT_WEIGHTS
    try:
        model = create_timm_model(meta.timm_model, dict(meta.timm_kwargs))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{meta_path}: cannot build timm model {meta.timm_model!r} ({e})") from None
    load_strict(model, state, str(weights_path))
    return model, meta
