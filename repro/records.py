"""Result records: one JSON line per number, appended (never rewritten) under an exclusive file lock.

``results/records/<dataset>.jsonl`` is the source of truth; tables and plots are generated from it by
:mod:`repro.report`. A torn trailing line (power cut mid-append) is reported by :func:`read_records`,
not silently dropped and not fatal.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

DATA_BOUND_SHARE = 0.10
"""A run that spends more than this share of its pre-training wall-clock waiting for batches is data-bound: the
trainer says so when it ends and the tables flag it."""


@dataclass(frozen=True, kw_only=True)
class ResultRecord:
    method: str
    model: str
    dataset: str
    budget: str
    eval: str
    """'pretrain', 'knn', 'linear', ..."""
    metric: str
    """e.g. 'top1', 'final_loss'."""
    value: float
    seed: int
    selection: str = ""
    """How hyper-parameters/checkpoints were chosen (never on the reported split)."""
    device: str = ""
    world_size: int = 1
    budget_seconds: float | None = None
    pretrain_seconds: float | None = None
    steps: int | None = None
    epochs: float | None = None
    images_per_second: float | None = None
    device_hours: float | None = None
    """pretrain_seconds x world_size / 3600 (GPU-hours on CUDA, CPU-process-hours on CPU)."""
    data_wait_share: float | None = None
    """Share of the pre-training wall-clock spent waiting for batches (above :data:`DATA_BOUND_SHARE`: data-bound)."""
    precision: str = ""
    """The resolved precision of pre-training ('fp32' or 'bf16', from the export); '' in records older than it (fp32 on
    CPU, bf16 on CUDA)."""
    eval_seconds: float | None = None
    eval_key: str = ""
    """Hash of the evaluation's own settings and data (``repro.evaluate.eval_key``); empty for pre-training and for
    records older than it."""
    status: str = "ok"
    config_hash: str = ""
    git_revision: str = ""
    recipe: str = ""
    time: str = ""
    note: str = ""
    command: str = ""
    """The command line that produced the number (``--set`` overrides and paths included); filled on append."""
    versions: str = ""
    """Package versions of the process that produced it (python, torch, timm, mm* when used); filled on append."""
    variant: str = ""
    """How the run's settings differ from its recipe's (``RunConfig.variant``: ``augment=none``); '' for the recipe as
    it is and in records older than it. Tables and claims name such rows ``method[variant]``."""
    export_sha256: str = ""
    """SHA-256 of the ``backbone.safetensors`` the number was measured on (verified as it was loaded), so a record
    names the exact weights; '' in records older than it and where no export was read (``repro.report.integrity``
    flags one run whose records name different exports)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResultRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        rev = out.stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def current_command() -> str:
    """This process's command line as a user would retype it: ``python -m <module> <args>`` (under torchrun,
    ``torchrun --nnodes N --nproc-per-node P -m <module> <args>``), shell-quoted."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec is not None and spec.name else ""  # `-m package`
    head = ["python", "-m", name] if name else ["python", sys.argv[0]]
    local, world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        head = ["torchrun", "--nnodes", str(max(1, world // max(1, local))), "--nproc-per-node", str(local),
                *head[1:]]
    return shlex.join([*head, *sys.argv[1:]])


def package_versions() -> str:
    """``python 3.11.7, torch 2.14.1, timm 1.0.31`` plus mmengine/mmseg/mmdet/mmcv when this process imported them."""
    import platform

    out = [f"python {platform.python_version()}"]
    for name in ("torch", "timm", "torchvision", "mmengine", "mmcv", "mmseg", "mmdet"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            out.append(f"{name} {mod.__version__}")
    return ", ".join(out)


def append_records(path: Path, records: list[ResultRecord]) -> None:
    """Append whole lines under ``flock``; one ``write`` per batch, then fsync. Records without a command or
    versions get this process's (:func:`current_command`, :func:`package_versions`)."""
    if not records:
        return
    cmd, versions = current_command(), package_versions()
    records = [replace(r, command=r.command or cmd, versions=r.versions or versions) for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(r.to_json() + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a torn line left by a crash must not swallow our first record: start on a fresh line
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    payload = b"\n" + payload
        view = memoryview(payload)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(frozen=True)
class ReadProblem:
    path: str
    line: int
    reason: str


def read_records(path: Path) -> tuple[list[ResultRecord], list[ReadProblem]]:
    """All parseable records of one file, plus a problem entry for every line that is not a record."""
    records: list[ResultRecord] = []
    problems: list[ReadProblem] = []
    path = Path(path)
    if not path.exists():
        return records, problems
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last_unterminated = i == len(lines) and not raw.endswith(b"\n")
        try:
            records.append(ResultRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            reason = "truncated trailing line (interrupted write?)" if last_unterminated else f"not a record: {e}"
            problems.append(ReadProblem(str(path), i, reason))
    return records, problems


def read_all(records_dir: Path) -> tuple[list[ResultRecord], list[ReadProblem]]:
    recs: list[ResultRecord] = []
    probs: list[ReadProblem] = []
    for p in sorted(Path(records_dir).glob("*.jsonl")):
        r, q = read_records(p)
        recs += r
        probs += q
    return recs, probs


def model_label(name: str, timm_kwargs: dict) -> str:
    """Readable architecture label for tables, e.g. ``vit_tiny_patch16_224 p4 @32 d6``."""
    parts = [name]
    if "patch_size" in timm_kwargs:
        parts.append(f"p{timm_kwargs['patch_size']}")
    if "img_size" in timm_kwargs:
        parts.append(f"@{timm_kwargs['img_size']}")
    if "depth" in timm_kwargs:
        parts.append(f"d{timm_kwargs['depth']}")
    return " ".join(parts)


def run_dir_path(out: Path, dataset: str, method: str, model_name: str, budget: str, seed: int,
                 config_hash: str) -> Path:
    """Where a pre-training run lives: ``OUT/<dataset>/<method>/<model>-<budget>-s<seed>-<config hash>``. The one
    definition ``repro.run`` writes to and ``repro.report`` reads from."""
    return Path(out) / dataset / method / f"{model_name}-{budget.replace('/', '_')}-s{seed}-{config_hash}"
