"""``python -m repro.run``: pre-train methods under one budget, export, evaluate, tabulate.

For each seed and method: resolve the config (method's paper defaults -> recipe -> --model -> --set),
calibrate the budget into a step count, pre-train with the one trainer, export the backbone
(safetensors + JSON), run the requested evaluations on the export, append result records and regenerate
the tables. Re-running the same command resumes an interrupted run and skips finished work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from evals.registry import EVAL_SETTINGS, EVALS
from repro import distributed
from repro.backbone import BackboneOptions, MaskedViT
from repro.budget import BudgetError, parse_budget, split_budget
from repro.checkpoint import (
    CHECKPOINT,
    EXPORT_META,
    EXPORT_WEIGHTS,
    CheckpointError,
    ExportMeta,
    atomic_write_text,
    check_output_dir,
    export_backbone,
    export_extra,
    run_disk_bytes,
    write_export_meta,
)
from repro.config import ConfigError, ModelConfig, RunConfig, apply_overrides, parse_set_args
from repro.data import DataError, DatasetSplits, load_data
from repro.errors import NonFiniteLoss
from repro.lock import PREEMPTED_EXIT, Preempted, RunLocked, run_lock
from repro.monitor import open_tensorboard
from repro.recipes import RECIPES, build_config, default_recipe
from repro.records import (
    ResultRecord,
    append_records,
    git_revision,
    now_iso,
    read_records,
    record_from_export,
    run_dir_path,
)
from repro.registry import METHODS, build_method
from repro.trainer import Trainer, TrainResult, read_summary

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
    p.add_argument("--log", choices=("none", "tensorboard"), default="none",
                   help="live monitoring besides metrics.jsonl: tensorboard = RUN_DIR/tensorboard/ (training "
                        "metrics, then the evaluations); needs pip install -e '.[tensorboard]'")
    p.add_argument("--wait", action="store_true", help="when another command holds a run directory (it is "
                   "training or evaluating it), wait for it instead of exiting with an error")
    return p


def resolve_config(method: str, args: argparse.Namespace, sets: dict[str, str]) -> RunConfig:
    cfg = build_config(method, args.recipe or default_recipe(args.data))
    cfg = replace(cfg, data=replace(cfg.data, path=args.data))
    if args.model:
        cfg = replace(cfg, model=replace(cfg.model, name=args.model))
    cfg = apply_overrides(cfg, {"budget.spec": args.budget})
    # "<method>.<field>" applies to that method only (e.g. macrl.bank_size=256 beside mae in one command)
    scoped = {k: v for k, v in sets.items() if k.split(".", 1)[0] in METHODS}
    shared = {k: v for k, v in sets.items() if k not in scoped}
    mine = {"method." + k.split(".", 1)[1]: v for k, v in scoped.items() if k.split(".", 1)[0] == method}
    return apply_overrides(cfg, {**shared, **mine})


def run_dir_for(out: Path, dataset: str, cfg: RunConfig) -> Path:
    return run_dir_path(out, dataset, cfg.method, cfg.model.name, cfg.budget.spec, cfg.seed, cfg.config_hash())


def export_meta(cfg: RunConfig, backbone: MaskedViT, data: DatasetSplits, steps: int, extra: dict) -> ExportMeta:
    budget = parse_budget(cfg.budget.spec)
    return backbone.export_meta(
        mean=tuple(data.mean), std=tuple(data.std), method=cfg.method, steps=steps, budget=cfg.budget.spec,
        budget_seconds=budget.seconds, config_hash=cfg.config_hash(), git_revision=git_revision(),
        dataset=data.name, seed=cfg.seed, extra=extra,
    )


def _extra(cfg: RunConfig, r: TrainResult) -> dict:
    return {
        "pretrain_seconds": r.pretrain_seconds, "images_per_second": r.images_per_second, "epochs": r.plan.epochs,
        "device": r.device, "world_size": r.world_size, "recipe": cfg.recipe,
        "device_hours": r.pretrain_seconds * r.world_size / 3600, "final_loss": r.final_loss,
        "calibration_seconds": r.plan.calibration_seconds, "seconds_per_step_calibrated": r.plan.seconds_per_step,
        "global_batch": r.plan.global_batch, "lr": r.plan.lr, "warmup_steps": r.plan.warmup_steps,
        "flops_per_image": r.plan.flops_per_image, "data_wait_share": r.data_wait_share,
    }


def pretrain(cfg: RunConfig, data: DatasetSplits, dist_info, run_dir: Path, progress: bool,
             records_path: Path, *, wait: bool = False) -> ExportMeta:
    """Train (or resume, or skip when finished) one method; returns the export's metadata.

    A method with a :class:`repro.method.Prerequisite` (MimCo's teacher) that the config does not name first trains
    it in ``run_dir/stage1-<method>`` on its share of the budget, then itself on the rest; its export metadata
    states both stages, and its pre-training time is their sum.
    """
    meta_path = run_dir / EXPORT_META
    if (run_dir / EXPORT_WEIGHTS).exists() and meta_path.exists() and read_summary(run_dir) is not None:
        if dist_info.rank == 0:
            log.info("%s: finished run found in %s, skipping pre-training", cfg.method, run_dir)
        return ExportMeta.from_json(meta_path)
    pre = METHODS[cfg.method].prerequisite
    if pre is None:
        return _train(cfg, data, dist_info, run_dir, progress, records_path, wait=wait)
    if not pre.missing(cfg.method_cfg):
        meta = _train(cfg, data, dist_info, run_dir, progress, records_path, write_export=False, wait=wait)
        note = (f"{pre.config_field} {getattr(cfg.method_cfg, pre.config_field)} given (its pre-training is not in "
                "this budget)")
        return _finish_export(run_dir, replace(meta, extra={**meta.extra, "note": note}), dist_info)
    teacher_method = pre.method
    s1_spec, s2_spec = split_budget(cfg.budget.spec, getattr(cfg.method_cfg, pre.fraction_field))
    s1_cfg = stage_config(teacher_method, cfg, s1_spec)
    s1_dir = run_dir / f"stage1-{teacher_method}"
    if dist_info.rank == 0:
        log.info("%s: stage 1 = %s teacher on %s of the %s budget, stage 2 = student on %s", cfg.method,
                 teacher_method, s1_spec, cfg.budget.spec, s2_spec)
    s1 = pretrain(s1_cfg, data, dist_info, s1_dir, progress, records_path, wait=wait)
    distributed.barrier()  # the teacher export is written by rank 0
    s2_cfg = apply_overrides(cfg, {f"method.{pre.config_field}": str(s1_dir.resolve()), "budget.spec": s2_spec})
    s2 = _train(s2_cfg, data, dist_info, run_dir, progress, records_path, write_export=False, wait=wait)
    x1, x2 = s1.extra, s2.extra
    t1, t2 = float(x1.get("pretrain_seconds") or 0.0), float(x2.get("pretrain_seconds") or 0.0)
    note = (f"budget {cfg.budget.spec} = stage 1 {teacher_method} teacher {s1_spec} ({s1.steps} steps, {t1:.0f}s) "
            f"+ stage 2 student {s2_spec} ({s2.steps} steps, {t2:.0f}s)")
    extra = {**x2, "pretrain_seconds": t1 + t2, "device_hours": float(x1.get("device_hours") or 0.0)
             + float(x2.get("device_hours") or 0.0), "note": note,
             "stage1": {"method": teacher_method, "budget": s1_spec, "steps": s1.steps, "seconds": t1,
                        "final_loss": x1.get("final_loss"), "export": str(s1_dir)},
             "stage2": {"budget": s2_spec, "steps": s2.steps, "seconds": t2}}
    budget = parse_budget(cfg.budget.spec)
    meta = replace(s2, budget=cfg.budget.spec, budget_seconds=budget.seconds, config_hash=cfg.config_hash(),
                   extra=extra)
    return _finish_export(run_dir, meta, dist_info)


def stage_config(method: str, parent: RunConfig, budget: str) -> RunConfig:
    """The config of a stage another method runs first: its own paper defaults and recipe overrides, the
    parent's model, data, training, evaluation and seed settings, and its share of the budget."""
    cfg = build_config(method, parent.recipe, keys=lambda k: k.startswith("method."))
    return replace(cfg, model=parent.model, data=parent.data, train=parent.train, eval=parent.eval, seed=parent.seed,
                   budget=replace(parent.budget, spec=budget))


def _finish_export(run_dir: Path, meta: ExportMeta, dist_info) -> ExportMeta:
    if dist_info.rank == 0:
        write_export_meta(run_dir, meta)  # the weights _train wrote; the metadata completes the export
    return meta


def _train(cfg: RunConfig, data: DatasetSplits, dist_info, run_dir: Path, progress: bool, records_path: Path,
           *, write_export: bool = True, wait: bool = False) -> ExportMeta:
    torch.manual_seed(cfg.seed)
    method = build_method(cfg)
    if dist_info.rank == 0:
        held = (run_dir / CHECKPOINT).stat().st_size if (run_dir / CHECKPOINT).is_file() else 0  # a resume holds one
        check_output_dir(run_dir, run_disk_bytes(method, method.eval_backbone()) - held)  # before anything is written
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    with run_lock(run_dir, main=dist_info.rank == 0, wait=wait):
        return _train_locked(cfg, method, data, dist_info, run_dir, progress, records_path, write_export)


def _train_locked(cfg: RunConfig, method, data: DatasetSplits, dist_info, run_dir: Path, progress: bool,
                  records_path: Path, write_export: bool) -> ExportMeta:
    trainer = Trainer(cfg, method, data, dist_info, run_dir, progress=progress)
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        if dist_info.rank == 0:
            rec = ResultRecord(method=cfg.method, model=cfg.model.name, dataset=data.name, budget=cfg.budget.spec,
                               eval="pretrain", metric="final_loss", value=float("nan"), seed=cfg.seed,
                               status="failed", note=str(e), config_hash=cfg.config_hash(),
                               git_revision=git_revision(), recipe=cfg.recipe, time=now_iso())
            append_records(records_path, [rec])
        raise
    meta = export_meta(cfg, method.eval_backbone(), data, result.steps, _extra(cfg, result))
    if dist_info.rank == 0:
        for name, state in method.extra_exports().items():
            export_extra(run_dir, name, state)
        # without write_export: weights only; the export is unfinished until the caller writes its metadata
        export_backbone(run_dir, method.eval_backbone().export_state_dict(), meta if write_export else None)
        log.info("%s: %d steps (%.1f epochs) in %.1fs, %.0f img/s (%.0f%% waiting for data), final loss %.4f -> %s",
                 cfg.method, result.steps, result.plan.epochs, result.pretrain_seconds, result.images_per_second,
                 100 * result.data_wait_share, result.final_loss, run_dir)
    return meta


def pretrain_record(meta: ExportMeta, data: DatasetSplits) -> ResultRecord:
    x = meta.extra
    return record_from_export(meta, data.name, "pretrain", "final_loss", float(x.get("final_loss", float("nan"))),
                              "last step", budget_seconds=parse_budget(meta.budget).seconds,
                              data_wait_share=x.get("data_wait_share"), git_revision=meta.git_revision,
                              note=str(x.get("note", "")))


def has_pretrain_record(records_path: Path, cfg: RunConfig) -> bool:
    """Whether the records hold this run's 'ok' pretrain row: a re-run adds none twice, and a run killed between
    its export and the append gets its row on the next run (an export alone is no proof of the record)."""
    h = cfg.config_hash()
    return any(r.eval == "pretrain" and r.status == "ok" and r.config_hash == h and r.method == cfg.method
               and r.seed == cfg.seed for r in read_records(records_path)[0])


def random_init_export(model: ModelConfig, data: DatasetSplits, seed: int, out: Path, recipe: str) -> Path:
    """The floor every method must beat: the same backbone at step 0 (MAE init, fixed sin-cos positions)."""
    cfg_key = f"{model.name}-{json.dumps(model.timm_kwargs(), sort_keys=True)}-{seed}"
    digest = hashlib.sha256(cfg_key.encode()).hexdigest()[:10]
    run_dir = out / data.name / "random-init" / f"{model.name}-s{seed}-{digest}"
    if (run_dir / EXPORT_WEIGHTS).exists() and (run_dir / EXPORT_META).exists():
        return run_dir
    torch.manual_seed(seed)
    bb = MaskedViT(model, BackboneOptions(pos_embed="sincos", init="mae"))
    meta = bb.export_meta(mean=tuple(data.mean), std=tuple(data.std), method="random-init", steps=0, budget="-",
                          budget_seconds=0.0, config_hash="", git_revision=git_revision(), dataset=data.name,
                          seed=seed, extra={"recipe": recipe, "pretrain_seconds": 0.0})
    export_backbone(run_dir, bb.export_state_dict(), meta)
    return run_dir


def evaluate(export_dir: Path, evals: list[str], ctx, records_path: Path, tensorboard: bool = False, *,
             wait: bool = False) -> list[ResultRecord]:
    """Run each requested eval once per export and eval settings (a marker file keyed by :func:`eval_key` makes
    re-runs skip finished evals); the export's run directory is locked meanwhile, so two commands never record the
    same evaluation twice."""
    with run_lock(export_dir, wait=wait):
        recs = _evaluate_locked(export_dir, evals, ctx, records_path)
    board = open_tensorboard(tensorboard and bool(recs), export_dir)
    if board is not None:
        board.scalars("eval", {f"{r.eval}_{r.metric}": r.value for r in recs}, int(recs[0].steps or 0))
        board.close()
    return recs


def eval_key(name: str, ctx) -> str:
    """What an evaluation's numbers depend on besides the export (whose seed it shares): its own settings
    (``EVAL_SETTINGS``) and the data (name, test split, split sizes). It names the done-marker and is stored in each
    record, so the tables can tell when the seeds of one cell were evaluated differently."""
    blob = {"eval": name, "settings": {f: getattr(ctx.cfg, f) for f in EVAL_SETTINGS[name]},
            "dataset": ctx.data.name, "test_split": ctx.data.test_split_name,
            "sizes": [len(ctx.data.train), len(ctx.data.test)]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _same(a: ResultRecord, b: ResultRecord) -> bool:
    return (a.eval_key, a.time, a.eval, a.metric, a.seed, a.method) == (b.eval_key, b.time, b.eval, b.metric, b.seed,
                                                                         b.method)


def _evaluate_locked(export_dir: Path, evals: list[str], ctx, records_path: Path) -> list[ResultRecord]:
    """Per eval: run it unless its marker (keyed by :func:`eval_key`) says done; then, as one idempotent step, save
    the records in the marker, append them to the records file unless a killed earlier attempt already did, and
    mark the marker appended. A kill anywhere in between neither loses the numbers nor records them twice."""
    done_dir = export_dir / "evals"
    out: list[ResultRecord] = []
    for name in evals:
        key = eval_key(name, ctx)
        marker = done_dir / f"{name}-{key}.json"
        state = json.loads(marker.read_text()) if marker.exists() else None
        if state is not None and state.get("appended"):
            continue
        if state is None:
            recs = [replace(r, eval_key=key, time=r.time or now_iso()) for r in EVALS[name](ctx, export_dir)]
            state = {"eval": name, "key": key, "settings": {f: getattr(ctx.cfg, f) for f in EVAL_SETTINGS[name]},
                     "records": [asdict(r) for r in recs], "appended": False}
            atomic_write_text(marker, json.dumps(state, indent=2, default=str) + "\n")
        else:  # measured, but a kill came before the marker said appended
            recs = [ResultRecord.from_dict(d) for d in state["records"]]
        present, _ = read_records(records_path)
        if not all(any(_same(r, p) for p in present) for r in recs):
            append_records(records_path, [r for r in recs if not any(_same(r, p) for p in present)])
        state["appended"] = True
        atomic_write_text(marker, json.dumps(state, indent=2, default=str) + "\n")
        for r in recs:
            log.info("%-12s %-7s %s = %.2f", r.method, r.eval, r.metric, r.value)
        out += recs
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[repro] %(message)s", stream=sys.stderr)
    try:
        return _main(args)
    except Preempted as e:
        print(f"repro: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ConfigError, BudgetError, DataError, CheckpointError, NonFiniteLoss, RunLocked) as e:
        print(f"repro: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


def _main(args: argparse.Namespace) -> int:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    parse_budget(args.budget)
    evals = [] if args.evals.strip().lower() == "none" else [e.strip() for e in args.evals.split(",") if e.strip()]
    bad = [e for e in evals if e not in EVALS]
    if bad:
        raise ConfigError(f"--evals: unknown evaluation {bad[0]!r}; choose from {', '.join(EVALS)} or none")
    sets = parse_set_args(args.sets)
    if args.log == "tensorboard":
        sets["train.tensorboard"] = "true"
    dense_tasks = [e for e in evals if e in ("ade20k", "coco")]
    idle = [k for k in sets if k.split(".", 1)[0] in METHODS and k.split(".", 1)[0] not in args.methods]
    if idle:
        raise ConfigError(f"--set {idle[0]}: {idle[0].split('.', 1)[0]} is not among the methods being run")
    configs = [resolve_config(m, args, {**sets, "seed": str(s)}) for s in args.seeds for m in args.methods]
    if dense_tasks:  # missing data paths or mm* packages fail now, not after hours of pre-training
        from evals.dense import check_ready

        check_ready(configs[0].eval, dense_tasks)

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
        if main_rank and not has_pretrain_record(records_path, cfg):
            append_records(records_path, [pretrain_record(meta, data)])
        exports.append(run_dir)
    distributed.barrier()
    if not main_rank:
        return 0
    distributed.shutdown()  # evaluations run on rank 0 alone

    if evals:
        from evals.features import EvalContext

        ctx = EvalContext(data, configs[0].eval, dist_info.device, seed=configs[0].seed, progress=progress)
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
