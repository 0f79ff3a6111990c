"""Atomic, checksummed files and the training checkpoints (resume) written with them; exports are
:mod:`repro.export`.

Every file is written to a temporary name in the same directory, flushed and fsync'ed, then renamed over
the destination: an interrupted write leaves the previous file intact and is never loaded. Checkpoints
load with ``weights_only=True``.

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
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
"""The checkpoint before :data:`CHECKPOINT`: what a run resumes from when the newest fails its checksum."""
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


def warn_unverified(path: Path, what: str) -> None:
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
            warn_unverified(path, "checkpoint")
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
