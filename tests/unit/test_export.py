"""One export module (issue 27, item 4): ``repro.export`` holds the metadata, its builders, writing, reading and the
record built from an export; the backbone knows nothing of exports or checkpoints; nothing else builds an
``ExportMeta`` by hand."""

from __future__ import annotations

import ast
import re
from pathlib import Path

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


def test_the_moved_names_still_resolve_where_they_were():
    """evals/features.py and evals/dense/ import them from their old modules until they are pointed at repro.export."""
    from repro.checkpoint import ExportMeta as old_meta
    from repro.checkpoint import read_export as old_read
    from repro.records import record_from_export as old_record

    assert (old_meta, old_read, old_record) == (ExportMeta, read_export, record_from_export)
    with pytest.raises(AttributeError):
        checkpoint.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        records.no_such_name  # noqa: B018


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
