"""Dense evaluations (ADE20K segmentation, COCO detection) on OpenMMLab, behind a process boundary.

Each task is one :class:`~evals.dense.options.DenseTask` record in :data:`TASKS` (:mod:`evals.dense.tasks`).
``evals.registry`` lists each as an evaluation whose ``run`` is :func:`runner` (task); ``repro.run --evals
ade20k,coco`` reaches it through ``repro.evaluate``, and :func:`run_task` runs the task's launcher (``python -m
evals.segmentation`` / ``evals.detection``, or ``python -m evals.dense <task>``) on the export in a child process and
reads back its result records. Nothing here imports mm*: the core keeps working without the ``dense`` extra, and a
missing extra is reported before any pre-training starts (:func:`check_ready`, which ``repro.run`` calls).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from evals.dense.tasks import TASKS
from repro.config import ConfigError
from repro.records import ResultRecord

__all__ = ["TASKS", "check_ready", "command", "run_task", "runner"]


def check_ready(settings: dict[str, Any], tasks: list[str]) -> None:
    """Fail fast (before pre-training) when a requested dense eval lacks its data path or its packages;
    ``settings`` maps each task to its settings object."""
    for task in tasks:
        data, recipe = TASKS[task].values(settings[task])[:2]
        if recipe not in TASKS[task].recipes:
            raise ConfigError(f"eval.{task}_recipe={recipe}: unknown (choose from {', '.join(TASKS[task].recipes)})")
        if not data:
            raise ConfigError(f"--evals {task} needs its data: --set eval.{task}_data=PATH ({TASKS[task].data_hint})")
        if not Path(data).is_dir():
            raise ConfigError(f"eval.{task}_data={data}: not a directory")
        missing = [m for m in TASKS[task].requires if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--evals {task} needs the dense extra ({', '.join(missing)} missing): "
                              "pip install -e '.[dense]'")


def command(s: Any, task: str, export_dir: Path, device: str, records_out: Path) -> list[str]:
    data, recipe, train_split, val_split = TASKS[task].values(s)
    return [sys.executable, *TASKS[task].argv, "--export", str(export_dir), "--data", str(data),
            "--recipe", recipe, "--train-split", train_split, "--val-split", val_split, "--device", device,
            "--records-out", str(records_out)]


def run_task(ctx: Any, export_dir: Path, task: str, s: Any) -> list[ResultRecord]:
    """Run one dense eval of ``export_dir`` in a child process; its records come back through a JSON file."""
    check_ready({task: s}, [task])
    with tempfile.TemporaryDirectory(prefix=f"repro-{task}-") as tmp:
        out = Path(tmp) / "records.json"
        cmd = command(s, task, Path(export_dir), ctx.device.type, out)
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise ConfigError(f"{TASKS[task].prog} failed on {export_dir} (exit {proc.returncode}); its log is "
                              f"above. Re-run alone: {' '.join(cmd[1:-2])}")
        return [ResultRecord.from_dict(d) for d in json.loads(out.read_text())]


def runner(task: str):
    """The task's ``run(ctx, export_dir, settings)``, as the registry lists it."""
    def run(ctx: Any, export_dir: Path, s: Any) -> list[ResultRecord]:
        return run_task(ctx, export_dir, task, s)
    return run
