"""Dense evaluations (ADE20K segmentation, COCO detection) on OpenMMLab, behind a process boundary.

``repro.run --evals ade20k,coco`` calls :func:`ade20k` / :func:`coco`, which run ``python -m evals.segmentation``
/ ``python -m evals.detection`` on the export in a child process and read back its result records. Nothing here
imports mm*: the core keeps working without the ``dense`` extra, and a missing extra is reported before any
pre-training starts (:func:`check_ready`).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from repro.config import ConfigError, EvalConfig
from repro.records import ResultRecord

MODULES = {"ade20k": "evals.segmentation", "coco": "evals.detection"}
REQUIRES = {"ade20k": ("mmengine", "mmcv", "mmseg"), "coco": ("mmengine", "mmcv", "mmdet", "pycocotools")}


def _settings(cfg: EvalConfig, task: str) -> tuple[str | None, str, str, str]:
    if task == "ade20k":
        return cfg.ade20k_data, cfg.ade20k_recipe, cfg.ade20k_train_split, cfg.ade20k_val_split
    return cfg.coco_data, cfg.coco_recipe, cfg.coco_train_split, cfg.coco_val_split


def check_ready(cfg: EvalConfig, tasks: list[str]) -> None:
    """Fail fast (before pre-training) when a requested dense eval lacks its data path or its packages."""
    from evals.dense.options import recipes_for

    for task in tasks:
        data, recipe = _settings(cfg, task)[:2]
        if recipe not in recipes_for(task):
            raise ConfigError(f"eval.{task}_recipe={recipe}: unknown (choose from {', '.join(recipes_for(task))})")
        if not data:
            raise ConfigError(f"--evals {task} needs its data: --set eval.{task}_data=PATH "
                              f"({'ADEChallengeData2016 folder' if task == 'ade20k' else 'COCO folder'})")
        if not Path(data).is_dir():
            raise ConfigError(f"eval.{task}_data={data}: not a directory")
        missing = [m for m in REQUIRES[task] if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--evals {task} needs the dense extra ({', '.join(missing)} missing): "
                              "pip install -e '.[dense]'")


def command(cfg: EvalConfig, task: str, export_dir: Path, device: str, records_out: Path) -> list[str]:
    data, recipe, train_split, val_split = _settings(cfg, task)
    return [sys.executable, "-m", MODULES[task], "--export", str(export_dir), "--data", str(data), "--recipe", recipe,
            "--train-split", train_split, "--val-split", val_split, "--device", device,
            "--records-out", str(records_out)]


def run_task(ctx: Any, export_dir: Path, task: str) -> list[ResultRecord]:
    """Run one dense eval of ``export_dir`` in a child process; its records come back through a JSON file."""
    check_ready(ctx.cfg, [task])
    with tempfile.TemporaryDirectory(prefix=f"repro-{task}-") as tmp:
        out = Path(tmp) / "records.json"
        cmd = command(ctx.cfg, task, Path(export_dir), ctx.device.type, out)
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise ConfigError(f"{MODULES[task]} failed on {export_dir} (exit {proc.returncode}); its log is above. "
                              f"Re-run alone: {' '.join(cmd[1:-2])}")
        return [ResultRecord.from_dict(d) for d in json.loads(out.read_text())]


ADE20K_SETTINGS = ("ade20k_data", "ade20k_recipe", "ade20k_train_split", "ade20k_val_split")
COCO_SETTINGS = ("coco_data", "coco_recipe", "coco_train_split", "coco_val_split")


def ade20k(ctx: Any, export_dir: Path) -> list[ResultRecord]:
    return run_task(ctx, export_dir, "ade20k")


def coco(ctx: Any, export_dir: Path) -> list[ResultRecord]:
    return run_task(ctx, export_dir, "coco")
