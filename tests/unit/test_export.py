"""One export module (issue 27, item 4): ``repro.export`` holds the metadata, its builders, writing, reading and the
record built from an export; the backbone knows nothing of exports or checkpoints; nothing else builds an
``ExportMeta`` by hand."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from repro import checkpoint, export, records
from repro.backbone import BackboneOptions, MaskedViT
from repro.data import load_data
from repro.export import (
    ExportMeta,
    export_backbone,
    load_export,
    random_init_meta,
    read_export,
    record_from_export,
    teacher_meta,
)
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _imports_anywhere(path: Path) -> set[str]:
    """Every module a file imports: top level, in functions, under TYPE_CHECKING."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_the_backbone_imports_neither_checkpoints_nor_exports():
    assert not _imports_anywhere(ROOT / "repro" / "backbone.py") & {"repro.checkpoint", "repro.export"}
    assert "repro.checkpoint" in _imports_anywhere(ROOT / "repro" / "export.py")  # so the check can fail


def test_only_the_export_module_builds_export_metadata():
    files = [p for pkg in ("repro", "baselines", "evals") for p in (ROOT / pkg).rglob("*.py")]
    built = sorted(str(p.relative_to(ROOT)) for p in files if re.search(r"\bExportMeta\(", p.read_text()))
    assert built == ["repro/export.py"]


def test_exports_have_one_home():
    """ExportMeta, reading, loading and the record of an export live in repro.export alone: the old paths through
    repro.checkpoint and repro.records are gone, and no source file imports them from there."""
    for module, name in ((checkpoint, "ExportMeta"), (checkpoint, "read_export"), (checkpoint, "load_export"),
                         (records, "record_from_export")):
        assert not hasattr(module, name), f"{module.__name__}.{name}"
    root = Path(__file__).resolve().parents[2]
    moved = {"ExportMeta", "read_export", "load_export", "record_from_export", "EXPORT_META", "EXPORT_WEIGHTS"}
    offenders = []
    for path in [*root.glob("repro/**/*.py"), *root.glob("evals/**/*.py"), *root.glob("tests/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("repro.checkpoint", "repro.records"):
                offenders += [f"{path.relative_to(root)}: {a.name}" for a in node.names if a.name in moved]
    assert offenders == []


def test_random_init_and_teacher_exports_round_trip(tmp_path):
    cfg = tiny_config("micl", **{"data.builtin_train": 16, "data.builtin_test": 8})
    data = load_data(cfg.data)
    torch.manual_seed(0)
    bb = MaskedViT(cfg.model, BackboneOptions(pos_embed="sincos", init="mae"))
    floor = random_init_meta(bb, data, seed=3, recipe="tiny")
    assert (floor.method, floor.steps, floor.budget, floor.seed, floor.dataset) == ("random-init", 0, "-", 3, data.name)
    assert (floor.timm_model, floor.timm_kwargs, floor.img_size) == (bb.timm_name, bb.timm_kwargs, bb.img_size)
    written = export_backbone(tmp_path / "floor", bb.export_state_dict(), floor)
    model, read = load_export(tmp_path / "floor")
    assert read == floor and written is not None and read.weights_sha256 == written.weights_sha256 != ""
    rec = record_from_export(read, data.name, "knn", "top1", 12.5, "fixed k")
    assert (rec.method, rec.recipe, rec.pretrain_seconds, rec.export_sha256) == ("random-init", "tiny", 0.0,
                                                                                  written.weights_sha256)
    teacher = teacher_meta(bb, "mocov3")
    export_backbone(tmp_path / "teacher", bb.export_state_dict(), teacher)
    assert read_export(tmp_path / "teacher", weights=False)[0] == teacher
    assert export.EXPORT_META in {p.name for p in (tmp_path / "teacher").iterdir()}


# ------------------------------------------------------------------------- the run's facts as one typed record (item 2)

ARCH = {"img_size": 32, "mean": [0.485, 0.456, 0.406], "patch_size": 4, "std": [0.229, 0.224, 0.225],
        "timm_kwargs": {"depth": 6, "img_size": 32, "num_classes": 0, "patch_size": 4},
        "timm_model": "vit_tiny_patch16_224"}
# backbone.json files as earlier versions wrote them (copied from real exports, paths and numbers shortened)
TIMED = {**ARCH, "budget": "90s", "budget_seconds": 90.0, "config_hash": "50267a9975", "dataset": "builtin-shapes",
         "git_revision": "086a66db6b14", "method": "micl", "precision": "fp32", "seed": 0, "steps": 214,
         "extra": {"calibration_seconds": 7.05, "data_wait_share": 0.0108, "device": "cpu (x86_64, 2 threads)",
                   "device_hours": 0.0252, "epochs": 5.48, "final_loss": 1.41, "flops_per_image": 291253248.0,
                   "global_batch": 128, "images_per_second": 301.1, "lr": 0.0005, "pretrain_seconds": 90.9,
                   "recipe": "tiny", "seconds_per_step_calibrated": 0.513, "warmup_steps": 9, "world_size": 1}}
TWO_STAGES = {**ARCH, "budget": "1.5e+13flop", "budget_seconds": None, "config_hash": "a250084ce3",
              "dataset": "cifar10", "git_revision": "74e1eba00ad6", "method": "mimco", "precision": "fp32", "seed": 0,
              "steps": 39,
              "extra": {"calibration_seconds": 0.0, "data_wait_share": 0.0022, "device": "cpu (x86_64, 2 threads)",
                        "device_hours": 0.0382, "epochs": 0.1, "final_loss": 6.75, "flops_per_image": 1498826752.0,
                        "global_batch": 128, "images_per_second": 82.2, "lr": 0.0005,
                        "note": "budget 1.5e+13flop = stage 1 mocov3 teacher 7.5e+12flop (19 steps, 77s) + stage 2 "
                                "student 7.5e+12flop (39 steps, 61s)",
                        "pretrain_seconds": 137.5, "recipe": "cifar10-cpu", "seconds_per_step_calibrated": None,
                        "stage1": {"budget": "7.5e+12flop", "export": "runs/x/stage1-mocov3", "final_loss": 3.58,
                                   "method": "mocov3", "seconds": 76.8, "steps": 19},
                        "stage2": {"budget": "7.5e+12flop", "seconds": 60.6, "steps": 39},
                        "warmup_steps": 4, "world_size": 1}}
FLOOR = {**ARCH, "budget": "-", "budget_seconds": 0.0, "config_hash": "", "dataset": "builtin-shapes",
         "git_revision": "086a66db6b14-dirty", "method": "random-init", "precision": "", "seed": 0, "steps": 0,
         "extra": {"pretrain_seconds": 0.0, "recipe": "tiny"}}
CONVERTED = {**ARCH, "budget": "official", "budget_seconds": None, "config_hash": "", "dataset": "imagenet-1k",
             "git_revision": "abc", "method": "mocov3", "precision": "", "seed": 0, "steps": 0,
             "extra": {"converted_from": "/ckpt/linear-vit-s-300ep.pth.tar", "format": "mocov3",
                       "layout": "mocov3-lincls", "heads_from": "mocov3 release, width 384",
                       "dropped": {}, "epoch": 90,
                       "head": {"file": "head.safetensors", "num_classes": 1000, "best_acc1": 76.5, "epoch": 90,
                                "arch": None, "source": "linear-vit-s-300ep.pth.tar (mocov3-lincls)"},
                       "note": "official mocov3 checkpoint linear-vit-s-300ep.pth.tar, converted by repro.convert"}}
# the first exports (before precision, dataset, seed and the data-wait share existed)
FIRST = {**ARCH, "budget": "300ep", "budget_seconds": None, "config_hash": "0af4a62", "git_revision": "0af4a62",
         "method": "mae", "steps": 1000,
         "extra": {"pretrain_seconds": 12.5, "images_per_second": 40.0, "epochs": 300.0, "device": "cpu",
                   "world_size": 2, "recipe": "tiny", "calibration_seconds": 0.0,
                   "seconds_per_step_calibrated": None, "global_batch": 16, "lr": 0.001, "warmup_steps": 10,
                   "flops_per_image": None}}


def _said(d: dict) -> dict:
    """A JSON object without its null values (what the typed record leaves out: it says nothing)."""
    return {k: _said(v) if isinstance(v, dict) and k != "dropped" else v for k, v in d.items() if v is not None}


@pytest.mark.parametrize("old", [TIMED, TWO_STAGES, FLOOR, CONVERTED, FIRST],
                         ids=["timed", "two-stages", "floor", "converted", "first"])
def test_every_kind_of_backbone_json_loads_and_is_written_back_as_it_was(old, tmp_path):
    import json

    (tmp_path / "backbone.json").write_text(json.dumps(old))
    meta = ExportMeta.from_json(tmp_path / "backbone.json")
    again = json.loads(json.dumps(meta.to_json()))
    assert _said(again) == _said({**again, **old})  # every field it had, with its value; null says nothing
    assert ExportMeta.from_json(_write(tmp_path / "again.json", again)) == meta


def _write(path: Path, d: dict) -> Path:
    import json

    path.write_text(json.dumps(d))
    return path


def test_the_facts_are_typed_all_the_way_to_the_records(tmp_path):
    from repro.pretrain import pretrain_record

    meta = ExportMeta.from_json(_write(tmp_path / "b.json", TWO_STAGES))
    p = meta.pretraining
    assert (p.recipe, p.world_size, p.final_loss, p.seconds_per_step_calibrated) == ("cifar10-cpu", 1, 6.75, None)
    assert p.stage1 is not None and (p.stage1.method, p.stage1.steps, p.stage1.final_loss) == ("mocov3", 19, 3.58)
    assert p.stage2 is not None and (p.stage2.method, p.stage2.steps) == (None, 39) and meta.conversion is None
    rec = pretrain_record(meta, SimpleNamespace(name="cifar10"))  # type: ignore[arg-type]
    assert (rec.value, rec.data_wait_share, rec.note, rec.pretrain_seconds, rec.device_hours, rec.recipe) == (
        6.75, 0.0022, TWO_STAGES["extra"]["note"], 137.5, 0.0382, "cifar10-cpu")
    assert (rec.model, rec.budget, rec.steps, rec.epochs, rec.world_size) == (
        "vit_tiny_patch16_224 p4 @32 d6", "1.5e+13flop", 39, 0.1, 1)

    first = record_from_export(ExportMeta.from_json(_write(tmp_path / "f.json", FIRST)), "d", "knn", "top1", 1.0, "k")
    assert (first.world_size, first.device, first.device_hours, first.precision, first.seed) == (2, "cpu", None, "", 0)
    floor = record_from_export(ExportMeta.from_json(_write(tmp_path / "r.json", FLOOR)), "d", "knn", "top1", 1.0, "k")
    assert (floor.world_size, floor.device, floor.pretrain_seconds, floor.epochs, floor.recipe) == (1, "", 0.0, None,
                                                                                                    "tiny")
    conv = ExportMeta.from_json(_write(tmp_path / "c.json", CONVERTED))
    assert conv.conversion is not None and conv.conversion.head is not None
    assert (conv.conversion.layout, conv.conversion.head.best_acc1, conv.conversion.dropped) == ("mocov3-lincls", 76.5,
                                                                                                 {})
    assert conv.pretraining == export.Pretraining() and conv.note.startswith("official mocov3")
    assert not hasattr(conv, "extra")  # no string-keyed dict on the way


def test_a_failed_run_is_recorded_in_the_row_of_its_successful_runs(tmp_path, monkeypatch):
    """The failed-run record's model label is the one every record of the run's exports has."""
    from repro import pretrain as pretrain_module
    from repro.distributed import DistInfo
    from repro.errors import NonFiniteLoss
    from repro.records import read_records

    cfg = tiny_config("micl", **{"data.builtin_train": 16, "data.builtin_test": 8, "budget.spec": "2steps"})
    data = load_data(cfg.data)

    def diverges(self):
        raise NonFiniteLoss(1, self.run_dir)

    monkeypatch.setattr(pretrain_module.Trainer, "fit", diverges)
    with pytest.raises(NonFiniteLoss):
        pretrain_module.pretrain(cfg, data, DistInfo(0, 1, 0, torch.device("cpu"), None), tmp_path / "run", False,
                                 tmp_path / "records.jsonl")
    (failed,), _ = read_records(tmp_path / "records.jsonl")
    bb = MaskedViT(cfg.model, BackboneOptions(pos_embed="sincos", init="mae"))
    ok = record_from_export(random_init_meta(bb, data, cfg.seed, cfg.recipe), data.name, "knn", "top1", 1.0, "k")
    assert failed.status == "failed" and failed.model == ok.model == "vit_tiny_patch16_224 p4 @32 d2"
    assert cfg.model.name == "vit_tiny_patch16_224" != failed.model  # the bug: the bare timm name


def test_a_trained_export_states_what_the_trainer_planned_and_measured(tmp_path):
    from repro.plan import revise
    from repro.trainer import TrainResult
    from tests.unit.test_replan import time_plan

    plan = revise(time_plan(total=200, budget_s=100.0), 20, elapsed=10.0, seconds_per_step=0.25)
    result = TrainResult(plan, plan.total_steps, 95.0, 640.0, 1.25, "cpu (test)", 2, False, 0.125, "fp32")
    facts = result.facts("tiny")
    assert (facts.pretrain_seconds, facts.device_hours, facts.world_size, facts.data_wait_share) == (
        95.0, 95.0 * 2 / 3600, 2, 0.125)
    assert (facts.global_batch, facts.lr, facts.warmup_steps, facts.epochs) == (
        plan.global_batch, plan.lr, plan.warmup_steps, plan.epochs)
    assert (facts.seconds_per_step_calibrated, facts.planned_steps, facts.revisions) == (0.5, 200, ((20, 380),))
    cfg = tiny_config("micl", **{"data.builtin_train": 16, "data.builtin_test": 8, "budget.spec": "100s"})
    bb = MaskedViT(cfg.model, BackboneOptions(pos_embed="sincos", init="mae"))
    meta = export.trained_meta(cfg, bb, load_data(cfg.data), result)
    # tiny_config sets a smaller model and batch than the tiny recipe's: a variant of it, stated as such
    assert (meta.steps, meta.precision, meta.budget, meta.budget_seconds, meta.pretraining) == (
        380, "fp32", "100s", 100.0, dataclasses.replace(facts, variant="model.depth=2,train.batch_size=16"))
    export_backbone(tmp_path, bb.export_state_dict(), meta)
    assert read_export(tmp_path, weights=False)[0] == meta  # revisions and stages survive the JSON
