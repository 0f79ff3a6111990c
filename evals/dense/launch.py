"""The launcher of every dense task: ``python -m evals.dense TASK``, and ``python -m evals.segmentation`` (ADE20K) /
``python -m evals.detection`` (COCO), which call :func:`main` with their task.

Validates the export and the data (the task's check), builds the task's native config +
:func:`evals.dense.options.cfg_options`, trains
with mmengine's ``Runner`` (resuming from the work directory's last checkpoint), tests once on the validation
split, and appends the numbers as result records to ``RESULTS/records/<pretraining dataset>.jsonl``, where the
report puts them in the same row as the export's kNN / linear / fine-tune numbers.

Everything mm* is imported inside :func:`run_job`; the rest of the file is importable in the core environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evals.dense.options import DenseError, DenseJob, cfg_options, read_geometry
from evals.dense.tasks import TASKS
from repro.checkpoint import CheckpointError, atomic_write_text
from repro.config import ConfigError, coerce, parse_set_args
from repro.export import read_export
from repro.records import ResultRecord, append_records

INSTALL_HINT = "pip install -e '.[dense]' (mmengine 0.10.7, mmsegmentation 1.2.2, mmdet 3.3.0, mmcv-lite 2.1.0)"


def build_parser(task: str, doc: str | None) -> argparse.ArgumentParser:
    t = TASKS[task]
    recipes = t.recipes
    train, val = t.splits
    fields = ", ".join(f.name for f in dataclasses.fields(next(iter(recipes.values())))
                       if f.name not in ("name", "task"))
    p = argparse.ArgumentParser(
        prog=f"python -m {t.prog}", description=(doc or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Recipe fields settable with --set: {fields}.\n"
               f"Needs the dense extra: {INSTALL_HINT}.\n"
               "The native config is " + str(t.config.relative_to(Path.cwd()) if t.config.is_relative_to(
                   Path.cwd()) else t.config) + "; everything the launcher changes in it is printed at start.\n"
               f"Errors print one line `{t.prog}: error: ...` and exit with status 2.")
    p.add_argument("--export", required=True, type=Path, metavar="DIR",
                   help="export directory (backbone.safetensors + backbone.json), e.g. a run directory of repro.run")
    p.add_argument("--data", required=True, type=Path, metavar="ROOT", help=t.data_hint)
    p.add_argument("--recipe", default=task, choices=sorted(recipes),
                   help=f"schedule (default {task}: the paper's; tiny: a few iterations for smoke tests)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. iters=2000 or batch_size=8 (repeatable)")
    p.add_argument("--train-split", default=train, help=f"training split (default {train})")
    p.add_argument("--val-split", default=val, help=f"evaluation split (default {val})")
    p.add_argument("--work-dir", type=Path, default=None,
                   help=f"mmengine work directory (default EXPORT/{task}-RECIPE-HASH, HASH of every setting); an "
                   "interrupted run resumes from its last checkpoint there")
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="results directory; records go to RESULTS/records/<pretraining dataset>.jsonl")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records-out", type=Path, default=None, metavar="FILE",
                   help="write the records as a JSON list to FILE instead of appending them under --results "
                   "(used by repro.run --evals, which appends them itself)")
    return p


def make_job(task: str, args: argparse.Namespace) -> DenseJob:
    t = TASKS[task]
    recipe = t.recipes[args.recipe]
    changes: dict[str, Any] = {}
    hints = typing.get_type_hints(type(recipe))
    for k, v in parse_set_args(args.sets).items():
        if k not in hints or k in ("name", "task"):
            settable = ", ".join(sorted(set(hints) - {"name", "task"}))
            raise ConfigError(f"--set {k}: not a recipe field (choose from {settable})")
        changes[k] = coerce(v, hints[k], k)
    if changes:
        recipe = dataclasses.replace(recipe, **changes)
    geometry = read_geometry(args.export)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    t.check_data(args.data, args.train_split, args.val_split)
    job = DenseJob(task=t, export=args.export.resolve(), data_root=args.data.resolve(),
                   work_dir=Path(args.work_dir or args.export).resolve(), recipe=recipe, geometry=geometry,
                   train_split=args.train_split, val_split=args.val_split, seed=args.seed, cuda=cuda,
                   world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if args.work_dir is None:
        job = dataclasses.replace(job, work_dir=job.work_dir / f"{task}-{recipe.name}-{job_hash(job)}")
    return job


def job_hash(job: DenseJob) -> str:
    """Names the default work directory: a changed recipe, split or seed never resumes another job's run."""
    opts = {k: v for k, v in cfg_options(job).items() if k != "work_dir"}
    return hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _trust_own_checkpoints(work_dir: Path) -> None:
    """mmengine's checkpoints pickle numpy/mmengine objects that ``weights_only=True`` refuses. Allow full
    unpickling for files inside this job's work directory only (written by this process or its earlier run);
    every other path mmengine may load keeps ``weights_only=True``. Our export is read with safetensors."""
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_local(filename: str, map_location: Any = None) -> Any:
        path = Path(filename).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{filename} can not be found.")
        if work_dir in path.parents:  # mmengine's own checkpoint of this job
            return torch.load(path, map_location=map_location, weights_only=False)  # safe-load: own work dir
        return torch.load(path, map_location=map_location, weights_only=True)

    CheckpointLoader.register_scheme(prefixes="", loader=load_local, force=True)


def run_job(job: DenseJob) -> dict[str, float]:
    """Train and test with mmengine; returns the mm metrics dict of the test pass."""
    from evals.dense.mmcv_ext import install

    install()  # mmcv._ext from torchvision's ops, only when compiled mmcv is absent
    from mmengine.config import Config
    from mmengine.runner import Runner

    importlib.import_module(f"{job.task.mm_package}.utils").register_all_modules(init_default_scope=True)
    import evals.dense.vit  # noqa: F401  (registers ReproViT & co.)

    cfg = Config.fromfile(str(job.task.config))
    opts = cfg_options(job)
    cfg.merge_from_dict(opts)
    cfg.launcher = "pytorch" if job.world_size > 1 else "none"
    cfg.env_cfg = dict(cfg.get("env_cfg", {}), dist_cfg=dict(backend="nccl" if job.cuda else "gloo"))
    job.work_dir.mkdir(parents=True, exist_ok=True)
    _trust_own_checkpoints(job.work_dir)
    logging.getLogger("repro.dense").info("cfg-options: %s", json.dumps(opts, default=str))
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    import numbers

    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}


def job_records(job: DenseJob, metrics: dict[str, float], seconds: float) -> list[ResultRecord]:
    from evals.features import export_record

    meta, _ = read_export(job.export, weights=False)
    r = job.recipe
    rule = (f"{r.name} recipe: {r.iters} iterations, batch {r.batch_size}, crop {r.crop}, AdamW lr {r.lr:g}, "
            f"layer decay {r.layer_decay:g}; last iteration evaluated once on {job.val_split} "
            "(single scale); nothing selected")
    out = []
    metrics, note = job.task.fill_metrics(job, metrics)
    for metric, (key, scale) in job.task.metrics.items():
        if key not in metrics:
            raise DenseError(f"{job.work_dir}: the {job.task.name} test pass reported no {key!r} (got "
                             f"{sorted(metrics)})")
        rec = export_record(meta, meta.dataset or "unknown", job.task.name, metric, metrics[key] * scale, rule, seconds)
        out.append(dataclasses.replace(rec, note=note))
    return out


def evaluate(job: DenseJob) -> list[ResultRecord]:
    t0 = time.perf_counter()
    metrics = run_job(job)
    return job_records(job, metrics, time.perf_counter() - t0)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if "Traceback" in msg:  # re-raised from a DataLoader worker: keep the original message
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg.splitlines()[0] if msg else type(e).__name__


def main(task: str, doc: str | None, argv: list[str] | None = None,
         evaluate_fn: Callable[[DenseJob], list[ResultRecord]] = evaluate) -> int:
    t = TASKS[task]
    args = build_parser(task, doc).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{t.prog}] %(message)s", stream=sys.stderr)
    try:
        job = make_job(task, args)
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        records = evaluate_fn(job)
        if not records:
            raise DenseError(f"{job.work_dir}: the {task} run produced no numbers")
        if int(os.environ.get("RANK", "0")) == 0:
            if args.records_out is not None:
                atomic_write_text(args.records_out, json.dumps([dataclasses.asdict(r) for r in records]) + "\n")
            else:
                append_records(args.results / "records" / f"{records[0].dataset}.jsonl", records)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in t.requires:
            print(f"{t.prog}: error: {e.name} is not installed; {INSTALL_HINT}", file=sys.stderr)
            return 2
        raise
    except (DenseError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"{t.prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    for r in records:
        print(f"{r.eval} {r.metric} = {r.value:.2f}  ({r.method}, {r.model}, {r.eval_seconds:.1f}s)")
    return 0
