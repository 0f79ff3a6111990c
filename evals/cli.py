"""The command line shared by ``python -m evals.knn``, ``evals.linear`` and ``evals.finetune``.

Evaluates one existing export (or any timm checkpoint laid out as one) with exactly the harness
``repro.run`` uses: load the data, build an :class:`~evals.features.EvalContext`, call the eval's
``run(ctx, export_dir, settings)``, append the records to ``<results>/records/<dataset>.jsonl`` and print the numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from repro.checkpoint import CheckpointError
from repro.config import ConfigError, RunConfig, apply_overrides, parse_set_args
from repro.data import DataError, load_data
from repro.errors import NonFiniteLoss
from repro.export import EXPORT_META, EXPORT_WEIGHTS, read_export
from repro.recipes import RECIPES, build_config, default_recipe
from repro.records import ResultRecord, append_records

EPILOG = f"""\
An export directory holds {EXPORT_WEIGHTS} (a timm state dict) and {EXPORT_META}, which needs at least
  {{"timm_model": "vit_base_patch16_224", "timm_kwargs": {{"num_classes": 0}},
   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
so official weights become evaluable by saving their state dict under that name beside such a JSON file.

Settings: the recipe's eval.* and data.* overrides apply first (tiny without --data, in1k with it), then
--set. Only eval.*, data.* and seed keys apply here: the model is whatever the export says.
Records are appended to RESULTS/records/<dataset>.jsonl; `python -m repro.report` turns them into tables.
Errors print one line `evals: error: ...` on stderr and exit with status 2.
"""

_KEYS = ("eval.", "data.")


def build_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    summary = (doc or "").strip().split("\n\n")[0]
    p = argparse.ArgumentParser(prog=f"python -m evals.{name}", description=summary, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, type=Path, metavar="DIR",
                   help=f"export directory ({EXPORT_WEIGHTS} + {EXPORT_META}), e.g. a run directory of repro.run")
    p.add_argument("--data", default=None, help="dataset root: ImageFolder (train/ + val/ or test/) or CIFAR pickles; "
                   "default: the built-in procedural shapes (no download)")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="whose eval.*/data.* settings to start from (default: tiny without --data, in1k with it)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override an eval.*/data.* setting or the seed, e.g. eval.finetune_epochs=5 (repeatable)")
    p.add_argument("--results", default="results", type=Path,
                   help="results directory; records go to RESULTS/records/<dataset>.jsonl (default: ./results)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = CUDA when available (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve(args: argparse.Namespace) -> RunConfig:
    """Eval and data settings: the recipe's (eval/data keys only), the data path, then ``--set``."""
    from evals.registry import normalized  # deferred: the registry imports the evaluations, whose __main__ calls this

    cfg = build_config("", args.recipe or default_recipe(args.data), keys=lambda k: k.startswith(_KEYS))
    cfg = apply_overrides(cfg, {"data.path": args.data} if args.data is not None else {})
    sets = parse_set_args(args.sets)
    bad = [k for k in sets if not (k.startswith(_KEYS) or k == "seed")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: only eval.*, data.* and seed apply to an existing export")
    cfg = apply_overrides(cfg, sets)
    return replace(cfg, eval=normalized(cfg.eval))


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def run_cli(name: str, args: argparse.Namespace) -> list[ResultRecord]:
    from evals.features import EvalContext
    from evals.registry import EVALS, eval_settings  # deferred, as in resolve

    cfg = resolve(args)
    read_export(args.export, weights=False)  # fail on a bad export before loading any data
    device = _device(args.device)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = load_data(cfg.data)
    ctx = EvalContext(data, eval_settings(cfg.eval), device, seed=cfg.seed, progress=not args.no_progress)
    records = EVALS[name].run(ctx, args.export, ctx.settings[name])
    append_records(args.results / "records" / f"{data.name}.jsonl", records)
    return records


def main(name: str, doc: str | None = None, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m evals.<name>``; returns the exit status."""
    args = build_parser(name, doc).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[evals] %(message)s", stream=sys.stderr)
    try:
        records = run_cli(name, args)
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss) as e:
        print(f"evals: error: {e}", file=sys.stderr)
        return 2
    for r in records:
        print(f"{r.eval} {r.metric} = {r.value:.2f}  ({r.method}, {r.model}, {r.dataset}, {r.eval_seconds:.1f}s)")
    return 0
