"""Dense evaluations (ADE20K segmentation, COCO detection) on OpenMMLab, behind a process boundary.

``evals.registry`` lists each :data:`TASKS` entry as an evaluation whose ``run`` is :func:`runner` (task);
``repro.run --evals ade20k,coco`` reaches it through ``repro.evaluate``, and :func:`run_task` runs ``python -m
evals.segmentation`` / ``python -m evals.detection`` on the export in a child process and reads back its result
records. Nothing here imports mm*: the core keeps working without the ``dense`` extra, and a missing extra is
reported before any pre-training starts (:func:`check_ready`, which ``repro.run`` calls).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.records import ResultRecord


@dataclass(frozen=True)
class DenseTask:
    """Everything this module knows about one dense evaluation. Its ``eval.*`` settings (``eval.<name>_data``,
    ``_recipe``, ``_train_split``, ``_val_split``: :attr:`settings`) and its registry entry follow from its
    :data:`TASKS` entry, but a new task needs more than that entry today: its module (native mmengine config + a
    ``__main__`` calling :func:`evals.dense.launch.main`), entries in ``launch.py``'s ``CONFIGS``, ``MODULE``,
    ``DEFAULT_SPLITS`` and ``METRICS`` and its branches there (data check, ``register_all_modules``), its name in
    ``options.py``'s ``TASKS``, its recipes and the ``task == ...`` branches of ``options.py``, and its name in
    ``repro.run``'s list of dense tasks (ARCHITECTURE.md, "Add a dense task")."""

    name: str
    module: str
    """``python -m <module>`` runs it on one export in a child process."""
    requires: tuple[str, ...]
    """Packages it imports (the ``dense`` extra)."""
    data_hint: str
    """What ``eval.<name>_data`` must point at."""
    recipe: str
    """Default ``eval.<name>_recipe`` (the paper schedule)."""
    splits: tuple[str, str]
    """Default ``eval.<name>_train_split`` and ``_val_split``."""
    settings: type = field(init=False)
    """The task's settings dataclass (every field keys its evaluations: the data path names the dataset)."""

    def __post_init__(self) -> None:
        n = self.name
        object.__setattr__(self, "settings", make_dataclass(f"{n.title()}Settings", [
            (f"{n}_data", str | None, field(default=None)),
            (f"{n}_recipe", str, field(default=self.recipe)),
            (f"{n}_train_split", str, field(default=self.splits[0])),
            (f"{n}_val_split", str, field(default=self.splits[1])),
        ], frozen=True, kw_only=True))

    def values(self, s: Any) -> tuple[str | None, str, str, str]:
        """(data, recipe, train split, val split) from an instance of :attr:`settings`."""
        n = self.name
        return (getattr(s, f"{n}_data"), getattr(s, f"{n}_recipe"), getattr(s, f"{n}_train_split"),
                getattr(s, f"{n}_val_split"))


TASKS = {t.name: t for t in (
    DenseTask("ade20k", "evals.segmentation", ("mmengine", "mmcv", "mmseg"), "ADEChallengeData2016 folder",
              "ade20k", ("training", "validation")),
    DenseTask("coco", "evals.detection", ("mmengine", "mmcv", "mmdet", "pycocotools"), "COCO folder", "coco",
              ("train2017", "val2017")),
)}


def check_ready(settings: dict[str, Any], tasks: list[str]) -> None:
    """Fail fast (before pre-training) when a requested dense eval lacks its data path or its packages;
    ``settings`` maps each task to its settings object."""
    from evals.dense.options import recipes_for

    for task in tasks:
        data, recipe = TASKS[task].values(settings[task])[:2]
        if recipe not in recipes_for(task):
            raise ConfigError(f"eval.{task}_recipe={recipe}: unknown (choose from {', '.join(recipes_for(task))})")
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
    return [sys.executable, "-m", TASKS[task].module, "--export", str(export_dir), "--data", str(data),
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
            raise ConfigError(f"{TASKS[task].module} failed on {export_dir} (exit {proc.returncode}); its log is "
                              f"above. Re-run alone: {' '.join(cmd[1:-2])}")
        return [ResultRecord.from_dict(d) for d in json.loads(out.read_text())]


def runner(task: str):
    """The task's ``run(ctx, export_dir, settings)``, as the registry lists it."""
    def run(ctx: Any, export_dir: Path, s: Any) -> list[ResultRecord]:
        return run_task(ctx, export_dir, task, s)
    return run
