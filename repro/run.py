"""``python -m repro.run``: pre-train methods under one budget, export, evaluate, tabulate.

For each seed and method: resolve the config (method's paper defaults -> recipe -> --model -> --set),
calibrate the budget into a step count, pre-train with the one trainer, export the backbone
(safetensors + JSON), run the requested evaluations on the export, append result records and regenerate
the tables. Re-running the same command resumes an interrupted run and skips finished work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from evals import dense
from evals.registry import EVALS, eval_settings, normalized
from repro import distributed, monitor
from repro.budget import BudgetError
from repro.checkpoint import (
    CheckpointError,
    check_output_dir,
)
from repro.config import ConfigError, RunConfig, apply_overrides, parse_set_args
from repro.data import DataError, load_data
from repro.errors import NonFiniteLoss, say_line
from repro.evaluate import evaluate
from repro.lock import RunLocked
from repro.pretrain import has_pretrain_record, pretrain, pretrain_record, random_init_export
from repro.recipes import RECIPES, build_config, default_recipe
from repro.records import (
    append_records,
    run_dir_path,
)
from repro.registry import METHODS
from repro.signals import PREEMPTED_EXIT, Preempted

log = logging.getLogger("repro")

EPILOG = """examples:
  python -m repro.run micl mae --budget 90s                       # built-in data, CPU, minutes
  python -m repro.run micl --budget 20m --data /data/imagefolder --model vit_small_patch16_224
  torchrun --nproc-per-node 2 -m repro.run mae --budget 5m        # same command, DDP
  python -m repro.run micl --budget 200steps --evals none --out /tmp/runs --seed 1
  python -m repro.run mae --budget 300ep --set method.mask_ratio=0.8 --set train.batch_size=1024
  python -m repro.run mimco --budget 4m                           # trains its MoCo v3 teacher first (2m + 2m)
  python -m repro.run mimco --budget 2m --set method.teacher=runs/builtin-shapes/mocov3/<run>  # reuse one
  python -m repro.run mae --budget 30s --evals knn,ade20k,coco --set eval.ade20k_data=/data/ADEChallengeData2016 \
      --set eval.coco_data=/data/coco    # + UperNet mIoU and Mask R-CNN AP (pip install -e '.[dense]')

budgets (per method): 90s 3m 2h 2d = pre-training wall-clock on this hardware (calibrated into a fixed
step count); 300ep = epochs; 5000steps = optimizer steps; 2e18flop = analytic training FLOPs.

one command per run directory: a second command on a directory that another is training or evaluating exits
with an error naming the holder (or waits, --wait). SIGTERM/SIGUSR1 (Slurm pre-emption) save a checkpoint at the
next step boundary and exit with status 75; rerun the same command to resume exactly.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m repro.run", description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", metavar="METHOD", help=f"one or more of: {', '.join(METHODS)}")
    p.add_argument("--budget", required=True, help="per-method pre-training budget, e.g. 90s, 3m, 133h, 300ep, "
                   "5000steps, 2e18flop (a unit is required)")
    p.add_argument("--data", default=None, help="dataset root: ImageFolder (train/ + val/ or test/) or CIFAR "
                   "pickles; default: the built-in procedural shapes (no download)")
    p.add_argument("--model", default=None, help="timm ViT name, e.g. vit_small_patch16_224 (default: the recipe's)")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="preset: tiny (built-in/CPU, the default without --data), in1k (paper settings, the "
                   "default with --data)")
    p.add_argument("--evals", default="knn,linear", help=f"comma list of {', '.join(EVALS)}, or 'none' "
                   "(default: knn,linear). ade20k and coco (UperNet / Mask R-CNN via mmseg / mmdet) need the dense "
                   "extra and their data: --set eval.ade20k_data=ADEChallengeData2016 --set eval.coco_data=COCO_ROOT")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. method.mask_ratio=0.8, train.batch_size=256 (repeatable); "
                   "<method>.<field>=V sets a method field for that method only, e.g. macrl.bank_size=256")
    p.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0], help="seed(s); default 0")
    p.add_argument("--out", default="runs", help="where run directories (checkpoints, exports, metrics) go "
                   "(default: ./runs)")
    p.add_argument("--results", default="results", help="results directory: records/*.jsonl, tables, plots "
                   "(default: ./results)")
    p.add_argument("--no-report", action="store_true", help="do not regenerate tables and plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log", type=monitor.parse_log, default=(), metavar="none|tensorboard|wandb[,...]",
                   help="live monitoring besides metrics.jsonl (training metrics, then the evaluations; rank 0): "
                        "tensorboard = RUN_DIR/tensorboard/ (pip install -e '.[tensorboard]'); wandb = RUN_DIR/wandb/, "
                        "offline unless WANDB_MODE is set (pip install -e '.[wandb]'); both: tensorboard,wandb")
    p.add_argument("--wait", action="store_true", help="when another command holds a run directory (it is "
                   "training or evaluating it), wait for it instead of exiting with an error")
    return p


def resolve_config(method: str, args: argparse.Namespace, sets: dict[str, str]) -> RunConfig:
    cfg = build_config(method, args.recipe or default_recipe(args.data))
    cfg = replace(cfg, data=replace(cfg.data, path=args.data))
    if args.model:
        cfg = replace(cfg, model=replace(cfg.model, name=args.model))
    cfg = apply_overrides(cfg, {"budget.spec": args.budget})  # parsed here, once (a BudgetError names it)
    # "<method>.<field>" applies to that method only (e.g. macrl.bank_size=256 beside mae in one command)
    scoped = {k: v for k, v in sets.items() if k.split(".", 1)[0] in METHODS}
    shared = {k: v for k, v in sets.items() if k not in scoped}
    mine = {"method." + k.split(".", 1)[1]: v for k, v in scoped.items() if k.split(".", 1)[0] == method}
    cfg = apply_overrides(cfg, {**shared, **mine})
    return replace(cfg, eval=normalized(cfg.eval))  # eval.* keys are checked by the evaluations that own them


def run_dir_for(out: Path, dataset: str, cfg: RunConfig) -> Path:
    return run_dir_path(out, dataset, cfg.method, cfg.model.name, cfg.budget.spec.text, cfg.seed, cfg.config_hash())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[repro] %(message)s", stream=sys.stderr)
    try:
        return _main(args)
    except Preempted as e:
        say_line(f"repro: {e}")
        return PREEMPTED_EXIT
    except (ConfigError, BudgetError, DataError, CheckpointError, NonFiniteLoss, RunLocked) as e:
        say_line(f"repro: error: {e}")
        return 2
    finally:
        distributed.shutdown()


def _main(args: argparse.Namespace) -> int:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    evals = [] if args.evals.strip().lower() == "none" else [e.strip() for e in args.evals.split(",") if e.strip()]
    bad = [e for e in evals if e not in EVALS]
    if bad:
        raise ConfigError(f"--evals: unknown evaluation {bad[0]!r}; choose from {', '.join(EVALS)} or none")
    sets = parse_set_args(args.sets)
    monitor.select(args.log or ("tensorboard",))  # process state: the config holds only the on/off switch
    if args.log:
        sets["train.tensorboard"] = "true"
    dense_tasks = [e for e in evals if e in dense.TASKS]
    idle = [k for k in sets if k.split(".", 1)[0] in METHODS and k.split(".", 1)[0] not in args.methods]
    if idle:
        raise ConfigError(f"--set {idle[0]}: {idle[0].split('.', 1)[0]} is not among the methods being run")
    configs = [resolve_config(m, args, {**sets, "seed": str(s)}) for s in args.seeds for m in args.methods]
    settings = eval_settings(configs[0].eval)  # every config shares the --set eval.* values
    if dense_tasks:  # missing data paths or mm* packages fail now, not after hours of pre-training
        from evals.dense import check_ready

        check_ready(settings, dense_tasks)

    results_dir = Path(args.results)
    out = Path(args.out)
    dist_info = distributed.init(configs[0].train.device)
    main_rank = dist_info.rank == 0
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    else:  # read-only or misplaced output directories fail here, before data loading and training
        check_output_dir(out)
        check_output_dir(results_dir)
    if dist_info.device.type == "cpu" and dist_info.world_size == 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = load_data(configs[0].data)
    if main_rank:
        log.info("data: %s (%d train / %d %s, %d classes%s)", data.name, len(data.train), len(data.test),
                 data.test_split_name, data.num_classes, ", in memory" if data.in_memory else ", streaming")
        skipped = data.train.skipped + data.test.skipped
        if skipped:
            log.warning("skipped %d unreadable images (data.bad_images=skip)", skipped)
    progress = not args.no_progress
    records_path = results_dir / "records" / f"{data.name}.jsonl"

    exports: list[Path] = []
    for cfg in configs:
        run_dir = run_dir_for(out, data.name, cfg)
        meta = pretrain(cfg, data, dist_info, run_dir, progress, records_path, wait=args.wait)
        if main_rank and not has_pretrain_record(records_path, cfg, meta):
            append_records(records_path, [pretrain_record(meta, data)])
        exports.append(run_dir)
    distributed.barrier()
    if not main_rank:
        return 0
    distributed.shutdown()  # evaluations run on rank 0 alone

    if evals:
        from evals.features import EvalContext

        ctx = EvalContext(data, settings, dist_info.device, seed=configs[0].seed, progress=progress)
        for run_dir in exports:
            evaluate(run_dir, evals, ctx, records_path, tensorboard=configs[0].train.tensorboard, wait=args.wait)
        seen = set()
        for cfg in configs:
            key = (cfg.model, cfg.seed)
            if key in seen:
                continue
            seen.add(key)
            ri = random_init_export(cfg.model, data, cfg.seed, out, cfg.recipe)
            evaluate(ri, evals, replace(ctx, seed=cfg.seed), records_path, wait=args.wait)
    if not args.no_report:
        from repro import report

        written = report.generate(results_dir, out)
        for p in written:
            log.info("wrote %s", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
