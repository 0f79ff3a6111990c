"""Pre-training orchestration: one method (and the stage it needs first) from its config to a finished export,
its metadata and its pretrain record; and the random-init floor every method must beat."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from repro import distributed
from repro.backbone import BackboneOptions, MaskedViT
from repro.budget import Budget, split_budget
from repro.checkpoint import CHECKPOINT, atomic_write_text, check_output_dir, run_disk_bytes
from repro.config import ModelConfig, RunConfig, apply_overrides
from repro.data import DatasetSplits
from repro.errors import NonFiniteLoss
from repro.export import (
    EXPORT_META,
    EXPORT_WEIGHTS,
    ExportMeta,
    Stage,
    export_backbone,
    export_extra,
    export_meta_with_checksum,
    random_init_meta,
    record_from_export,
    teacher_meta,
    trained_meta,
    write_export_meta,
)
from repro.lock import run_lock
from repro.recipes import build_config
from repro.records import ResultRecord, append_records, git_revision, model_label, now_iso, read_records
from repro.registry import METHODS, build_method
from repro.trainer import Trainer, read_summary

log = logging.getLogger("repro")


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
        return export_meta_with_checksum(run_dir)
    pre = METHODS[cfg.method].prerequisite
    if pre is None:
        return _train(cfg, data, dist_info, run_dir, progress, records_path, wait=wait)
    if not pre.missing(cfg.method_cfg):
        meta = _train(cfg, data, dist_info, run_dir, progress, records_path, write_export=False, wait=wait)
        note = (f"{pre.config_field} {getattr(cfg.method_cfg, pre.config_field)} given (its pre-training is not in "
                "this budget)")
        return _finish_export(run_dir, replace(meta, note=note), dist_info)
    teacher_method = pre.method
    s1_budget, s2_budget = split_budget(cfg.budget.spec, getattr(cfg.method_cfg, pre.fraction_field))
    s1_cfg = stage_config(teacher_method, cfg, s1_budget)
    s1_dir = run_dir / f"stage1-{teacher_method}"
    if dist_info.rank == 0:
        log.info("%s: stage 1 = %s teacher on %s of the %s budget, stage 2 = student on %s", cfg.method,
                 teacher_method, s1_budget, cfg.budget.spec, s2_budget)
    s1 = pretrain(s1_cfg, data, dist_info, s1_dir, progress, records_path, wait=wait)
    distributed.barrier()  # the teacher export is written by rank 0
    s2_cfg = apply_overrides(cfg, {f"method.{pre.config_field}": str(s1_dir.resolve()), "budget.spec": s2_budget})
    s2 = _train(s2_cfg, data, dist_info, run_dir, progress, records_path, write_export=False, wait=wait)
    p1, p2 = s1.pretraining, s2.pretraining
    t1, t2 = p1.pretrain_seconds or 0.0, p2.pretrain_seconds or 0.0
    note = (f"budget {cfg.budget.spec} = stage 1 {teacher_method} teacher {s1_budget} ({s1.steps} steps, {t1:.0f}s) "
            f"+ stage 2 student {s2_budget} ({s2.steps} steps, {t2:.0f}s)")
    both = replace(p2, pretrain_seconds=t1 + t2, device_hours=(p1.device_hours or 0.0) + (p2.device_hours or 0.0),
                   stage1=Stage(method=teacher_method, budget=s1_budget.text, steps=s1.steps, seconds=t1,
                                final_loss=p1.final_loss, export=str(s1_dir)),
                   stage2=Stage(budget=s2_budget.text, steps=s2.steps, seconds=t2))
    budget = cfg.budget.spec
    meta = replace(s2, budget=budget.text, budget_seconds=budget.seconds, config_hash=cfg.config_hash(),
                   pretraining=both, note=note)
    return _finish_export(run_dir, meta, dist_info)


def stage_config(method: str, parent: RunConfig, budget: Budget) -> RunConfig:
    """The config of a stage another method runs first: its own paper defaults and recipe overrides, the
    parent's model, data, training, evaluation and seed settings, and its share of the budget."""
    cfg = build_config(method, parent.recipe, keys=lambda k: k.startswith("method."))
    return replace(cfg, model=parent.model, data=parent.data, train=parent.train, eval=parent.eval, seed=parent.seed,
                   budget=replace(parent.budget, spec=budget))


def _finish_export(run_dir: Path, meta: ExportMeta, dist_info) -> ExportMeta:
    if dist_info.rank == 0:
        meta = write_export_meta(run_dir, meta)  # the weights _train wrote; the metadata completes the export
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
            # the label every successful row of this run uses, so a failure lands in the same table row
            rec = ResultRecord(method=cfg.method, model=model_label(cfg.model.name, cfg.model.timm_kwargs()),
                               dataset=data.name, budget=cfg.budget.spec.text,
                               eval="pretrain", metric="final_loss", value=float("nan"), seed=cfg.seed,
                               status="failed", note=str(e), config_hash=cfg.config_hash(),
                               git_revision=git_revision(), recipe=cfg.recipe, time=now_iso(),
                               precision=trainer.precision, variant=cfg.variant())
            append_records(records_path, [rec])
        raise
    meta = trained_meta(cfg, method.eval_backbone(), data, result)
    if dist_info.rank == 0:
        for name, state in method.extra_exports().items():
            export_extra(run_dir, name, state)
        # without write_export: weights only; the export is unfinished until the caller writes its metadata
        meta = export_backbone(run_dir, method.eval_backbone().export_state_dict(),
                               meta if write_export else None) or meta
        log.info("%s: %d steps (%.1f epochs) in %.1fs, %.0f img/s (%.0f%% waiting for data), final loss %.4f -> %s",
                 cfg.method, result.steps, result.plan.epochs, result.pretrain_seconds, result.images_per_second,
                 100 * result.data_wait_share, result.final_loss, run_dir)
    return meta


def pretrain_record(meta: ExportMeta, data: DatasetSplits) -> ResultRecord:
    """The export's pre-training row: its last loss, with the run's facts (:func:`repro.export.record_from_export`)."""
    p = meta.pretraining
    return record_from_export(meta, data.name, "pretrain", "final_loss",
                              float("nan") if p.final_loss is None else p.final_loss, "last step",
                              budget_seconds=meta.budget_seconds, data_wait_share=p.data_wait_share,
                              git_revision=meta.git_revision, note=meta.note)


def has_pretrain_record(records_path: Path, cfg: RunConfig, meta: ExportMeta) -> bool:
    """Whether the records hold this run's 'ok' pretrain row for this export: a re-run adds none twice, a run killed
    between its export and the append gets its row on the next run (an export alone is no proof of the record), and
    a run re-trained into a fresh directory (the README demo in a new clone, over the committed records) records its
    own pre-training, so its row's steps and loss are those of the export its evaluations measured.

    The export is known by its weights' checksum; a row without one (written before rows carried it) is this
    export's when its steps and final loss are the export's."""
    h = cfg.config_hash()
    loss = meta.pretraining.final_loss

    def same_export(r: ResultRecord) -> bool:
        if r.export_sha256:
            return r.export_sha256 == meta.weights_sha256
        return r.steps == meta.steps and loss is not None and r.value == loss

    return any(r.eval == "pretrain" and r.status == "ok" and r.config_hash == h and r.method == cfg.method
               and r.seed == cfg.seed and same_export(r) for r in read_records(records_path)[0])


def random_init_export(model: ModelConfig, data: DatasetSplits, seed: int, out: Path, recipe: str) -> Path:
    """The floor every method must beat: the same backbone at step 0 (MAE init, fixed sin-cos positions)."""
    cfg_key = f"{model.name}-{json.dumps(model.timm_kwargs(), sort_keys=True)}-{seed}"
    digest = hashlib.sha256(cfg_key.encode()).hexdigest()[:10]
    run_dir = out / data.name / "random-init" / f"{model.name}-s{seed}-{digest}"
    if (run_dir / EXPORT_WEIGHTS).exists() and (run_dir / EXPORT_META).exists():
        return run_dir
    torch.manual_seed(seed)
    bb = MaskedViT(model, BackboneOptions(pos_embed="sincos", init="mae"))
    export_backbone(run_dir, bb.export_state_dict(), random_init_meta(bb, data, seed, recipe))
    return run_dir


def random_teacher_export(cfg: RunConfig, out: Path, teacher: str = "mocov3") -> Path:
    """A ``teacher`` export (MoCo v3: backbone + projector) of ``cfg``'s architecture, at its random init (from the
    global RNG): a method's prerequisite (MimCo's frozen teacher) for ``repro.bench`` and the tests."""
    tcfg = build_config(teacher, cfg.recipe, {"train.batch_size": 2, "train.compile": False, "train.precision": "fp32"})
    tcfg = replace(tcfg, model=cfg.model)  # the teacher the same recipe trains, on this architecture
    moco = build_method(tcfg)
    bb = moco.eval_backbone()
    for name, state in moco.extra_exports().items():
        export_extra(out, name, state)
    export_backbone(out, bb.export_state_dict(), teacher_meta(bb, teacher))
    return out
