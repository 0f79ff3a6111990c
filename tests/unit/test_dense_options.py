"""Core-environment tests of the dense evaluations (ADE20K / COCO): options, data checks, launcher CLI.

Nothing here imports mmengine/mmcv/mmseg/mmdet: every test checks that no mm* module was imported while it ran.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import evals.dense as dense
import evals.dense.launch as launch
import evals.dense.tasks as tasks
from evals.dense.data import ade_pairs, check_ade_label_map, check_ade_root, check_coco_root
from evals.dense.launch import build_parser, job_hash, job_records, main, make_job, read_geometry
from evals.dense.options import (
    DenseError,
    DenseJob,
    DenseRecipe,
    DenseTask,
    ViTGeometry,
    cfg_options,
    check_geometry,
    vit_geometry,
)
from evals.dense.tasks import (
    ADE20K,
    COCO,
    DET_RECIPES,
    SEG_RECIPES,
    TASKS,
    ade_schedule,
    coco_schedule,
    det_pipelines,
    seg_pipelines,
)
from repro.config import ConfigError
from repro.export import EXPORT_META, EXPORT_WEIGHTS
from repro.records import read_records
from tests.dense.fixtures import make_ade, make_coco, make_export

MM = {"mmengine", "mmcv", "mmseg", "mmdet", "pycocotools"}
COCO_NAMES = ("person", "car", "dog")
VIT_B = ViTGeometry(depth=12, embed_dim=768, patch_size=16)
VIT_L = ViTGeometry(depth=24, embed_dim=1024, patch_size=16)


@pytest.fixture(autouse=True)
def _isolate():
    """No mm* import may happen in a test; restore the env vars and root log handlers ``main`` may touch."""
    before = set(sys.modules)
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "RANK")}
    os.environ.pop("WORLD_SIZE", None)
    os.environ.pop("RANK", None)
    handlers = logging.root.handlers[:]
    yield
    logging.root.handlers[:] = handlers
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    imported = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in MM)
    assert not imported, f"the test imported OpenMMLab modules: {imported[:5]}"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export") / "exp")


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_ade(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


def ade_job(recipe: DenseRecipe = SEG_RECIPES["ade20k"], geometry: ViTGeometry = VIT_B, **kw) -> DenseJob:
    args = dict(task=ADE20K, export=Path("/exports/vitb"), data_root=Path("/data/ADEChallengeData2016"),
                work_dir=Path("/work/ade"), recipe=recipe, geometry=geometry, train_split="training",
                val_split="validation", world_size=8, cuda=True)
    return DenseJob(**{**args, **kw})


def coco_job(recipe: DenseRecipe = DET_RECIPES["coco"], geometry: ViTGeometry = VIT_B, **kw) -> DenseJob:
    args = dict(task=COCO, export=Path("/exports/vitb"), data_root=Path("/data/coco"), work_dir=Path("/work/coco"),
                recipe=recipe, geometry=geometry, train_split="train2017", val_split="val2017", world_size=16,
                cuda=True)
    return DenseJob(**{**args, **kw})


def types_of(pipeline: list[dict]) -> list[str]:
    return [t["type"] for t in pipeline]


def assert_plain_json(value, where="opts") -> None:
    """Only JSON types (and tuples) all the way down: every path must already be a str."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            assert_plain_json(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            assert_plain_json(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, str | int | float | bool), f"{where}: {type(value).__name__}"


# geometry -----------------------------------------------------------------------------------------------------------


def test_vit_geometry_taps_and_rescales():
    assert VIT_B.out_indices() == (3, 5, 7, 11)
    assert VIT_B.rescales() == (4.0, 2.0, 1.0, 0.5)
    assert VIT_L.out_indices() == (7, 11, 15, 23)
    assert ViTGeometry(depth=12, embed_dim=384, patch_size=8).rescales() == (2.0, 1.0, 0.5, 0.25)
    # every tap is a valid block index, in order, the last one the final block
    for d in (3, 4, 6, 12, 24, 32):
        taps = ViTGeometry(depth=d, embed_dim=8, patch_size=16).out_indices()
        assert list(taps) == sorted(taps) and taps[-1] == d - 1 and taps[0] >= 0


@pytest.mark.parametrize(("patch", "depth", "needle"), [(12, 12, "patch size 12"), (16, 2, "depth 2"),
                                                        (1, 12, "patch size 1")])
def test_check_geometry_rejects_and_names_export(patch, depth, needle):
    with pytest.raises(DenseError, match=needle) as e:
        check_geometry(ViTGeometry(depth=depth, embed_dim=64, patch_size=patch), "/exports/odd")
    assert str(e.value).startswith("/exports/odd: ")
    check_geometry(ViTGeometry(depth=3, embed_dim=64, patch_size=2), "/exports/ok")  # the smallest accepted


def test_vit_geometry_of_meta_timm_models():
    with torch.device("meta"):
        b = timm.create_model("vit_base_patch16_224", pretrained=False)
        small = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=8, depth=6, img_size=64)
    assert vit_geometry(b) == ViTGeometry(depth=12, embed_dim=768, patch_size=16)
    assert vit_geometry(small) == ViTGeometry(depth=6, embed_dim=384, patch_size=8)
    fake = SimpleNamespace(patch_embed=SimpleNamespace(patch_size=14), blocks=[0] * 5, embed_dim=96)  # int patch
    assert vit_geometry(fake) == ViTGeometry(depth=5, embed_dim=96, patch_size=14)


def test_read_geometry_of_exports(export, tmp_path):
    assert read_geometry(export) == ViTGeometry(depth=3, embed_dim=64, patch_size=8)
    odd = make_export(tmp_path / "p12", patch=12, img=36)
    with pytest.raises(DenseError, match="patch size 12") as e:
        read_geometry(odd)
    assert str(odd) in str(e.value)
    shallow = make_export(tmp_path / "d2", depth=2)
    with pytest.raises(DenseError, match="depth 2"):
        read_geometry(shallow)


# ADE20K options -----------------------------------------------------------------------------------------------------


def test_task_records_and_their_recipes():
    assert TASKS["ade20k"] is ADE20K and TASKS["coco"] is COCO and all(TASKS[n].name == n for n in TASKS)
    assert ADE20K.recipes is SEG_RECIPES and COCO.recipes is DET_RECIPES
    assert all(r.task == "ade20k" for r in SEG_RECIPES.values()) and all(r.task == "coco" for r in DET_RECIPES.values())
    assert all(r.name == k for rs in (SEG_RECIPES, DET_RECIPES) for k, r in rs.items())
    for t in TASKS.values():
        assert t.config.is_file() and t.name in t.recipes, t.name
    for t in (ADE20K, COCO):
        assert t.argv == ("-m", t.module) and t.prog == t.module
    # a record whose recipes do not belong to it is refused when it is made
    with pytest.raises(ValueError, match="'voc'"):
        replace(ADE20K, name="voc")
    with pytest.raises(ValueError, match="'ade20k'"):
        replace(ADE20K, recipes={"ade20k": SEG_RECIPES["ade20k"], "tiny": DET_RECIPES["tiny"]})
    # a task without a package of its own runs as `python -m evals.dense <name>`
    voc = DenseTask(**{**{f: getattr(ADE20K, f) for f in ("config", "mm_package", "requires", "data_hint", "splits",
                                                              "metrics", "check_data", "options")},
                       "name": "voc", "recipes": {"voc": replace(SEG_RECIPES["ade20k"], name="voc", task="voc")}})
    assert voc.argv == ("-m", "evals.dense", "voc") and voc.prog == "evals.dense voc"
    assert [f.name for f in fields(voc.settings)] == [
        "voc_data", "voc_recipe", "voc_train_split", "voc_val_split"]
    assert voc.settings().voc_recipe == "voc"


def test_ade_cfg_options_paper_recipe():
    job = ade_job()
    o = cfg_options(job)
    r = SEG_RECIPES["ade20k"]
    assert o["train_dataloader.batch_size"] == 2  # 16 over 8 processes
    assert o["model.decode_head.in_channels"] == [768] * 4 and o["model.decode_head.channels"] == 768
    assert o["model.auxiliary_head.in_channels"] == 768
    assert o["model.backbone.export"] == "/exports/vitb"
    assert o["model.backbone.out_indices"] == [3, 5, 7, 11]
    assert o["model.backbone.rescales"] == [4.0, 2.0, 1.0, 0.5]
    assert o["model.backbone.drop_path_rate"] == 0.1
    assert o["work_dir"] == "/work/ade"
    assert o["train_cfg"]["type"] == "IterBasedTrainLoop" and o["train_cfg"]["max_iters"] == 160_000
    assert o["train_cfg"]["val_interval"] > o["train_cfg"]["max_iters"]  # tested once, at the end
    ow = o["optim_wrapper"]
    assert ow["_delete_"] is True
    assert ow["optimizer"]["type"] == "AdamW" and ow["optimizer"]["lr"] == 1e-4
    assert ow["optimizer"]["weight_decay"] == 0.05
    assert ow["constructor"] == "ReproLayerDecayOptimizerConstructor"
    assert ow["paramwise_cfg"]["layer_decay"] == 0.65
    assert ow["type"] == "AmpOptimWrapper" and ow["dtype"] == "bfloat16"
    lin, poly = o["param_scheduler"]
    assert lin["type"] == "LinearLR" and (lin["begin"], lin["end"]) == (0, 1500) and lin["start_factor"] == 1e-6
    assert poly["type"] == "PolyLR" and (poly["begin"], poly["end"]) == (1500, 160_000)
    assert poly["power"] == 1.0 and poly["eta_min"] == 0.0
    assert not lin["by_epoch"] and not poly["by_epoch"]
    assert o["train_dataloader.dataset.data_prefix"] == dict(img_path="images/training",
                                                             seg_map_path="annotations/training")
    for s in ("val", "test"):
        assert o[f"{s}_dataloader.dataset.data_prefix"] == dict(img_path="images/validation",
                                                                seg_map_path="annotations/validation")
        assert o[f"{s}_dataloader.dataset.data_root"] == "/data/ADEChallengeData2016"
    train, test = o["train_dataloader.dataset.pipeline"], o["val_dataloader.dataset.pipeline"]
    assert o["test_dataloader.dataset.pipeline"] == test
    crop = next(t for t in train if t["type"] == "RandomCrop")
    assert tuple(crop["crop_size"]) == (512, 512)
    resize = next(t for t in test if t["type"] == "Resize")
    assert tuple(resize["scale"]) == (2048, 512) and resize["keep_ratio"]
    for p in (train, test):
        names = types_of(p)
        assert names.index("ReproCheckSegMap") == names.index("LoadAnnotations") + 1
        assert next(t for t in p if t["type"] == "LoadAnnotations")["reduce_zero_label"] is True
    assert o["model.test_cfg"]["mode"] == "slide" and tuple(o["model.test_cfg"]["crop_size"]) == (512, 512)
    assert tuple(o["model.data_preprocessor.size"]) == (r.crop, r.crop)
    for s in ("train", "val", "test"):
        assert o[f"{s}_dataloader.num_workers"] == 4 and o[f"{s}_dataloader.persistent_workers"] is True
    assert not [k for k in o if k.startswith(("model.neck", "model.roi_head", "model.rpn_head"))]
    assert_plain_json(o)
    json.dumps(o)  # no default= needed: no Path (or other object) anywhere


def test_ade_cfg_options_vit_l_cpu_and_tiny():
    o = cfg_options(ade_job(geometry=VIT_L, cuda=False, world_size=1))
    assert o["model.decode_head.in_channels"] == [1024] * 4 and o["model.decode_head.channels"] == 1024
    assert o["model.backbone.out_indices"] == [7, 11, 15, 23]
    assert o["train_dataloader.batch_size"] == 16
    ow = o["optim_wrapper"]
    assert ow["type"] == "OptimWrapper" and "dtype" not in ow and ow["_delete_"] is True
    t = cfg_options(ade_job(recipe=SEG_RECIPES["tiny"], world_size=1, cuda=False))
    assert t["model.decode_head.channels"] == 32  # head_channels overrides the width
    assert t["train_dataloader.num_workers"] == 0 and t["train_dataloader.persistent_workers"] is False
    assert [s["type"] for s in t["param_scheduler"]] == ["PolyLR"]  # warmup 0
    assert_plain_json(t)
    json.dumps(t)


def test_seg_pipelines_follow_recipe():
    r = replace(SEG_RECIPES["ade20k"], crop=640, test_scale=(2560, 640), scale_range=(0.5, 1.5))
    train, test = seg_pipelines(r)
    assert next(t for t in train if t["type"] == "RandomCrop")["crop_size"] == (640, 640)
    rr = next(t for t in train if t["type"] == "RandomResize")
    assert rr["scale"] == (2560, 640) and rr["ratio_range"] == (0.5, 1.5)
    assert next(t for t in test if t["type"] == "Resize")["scale"] == (2560, 640)
    assert types_of(train)[-1] == "PackSegInputs" and types_of(test)[-1] == "PackSegInputs"


# COCO options -------------------------------------------------------------------------------------------------------


def test_coco_cfg_options_vitdet_recipe():
    o = cfg_options(coco_job())
    assert o["train_dataloader.batch_size"] == 4  # 64 over 16 processes
    lin, step = o["param_scheduler"]
    assert lin["type"] == "LinearLR" and (lin["begin"], lin["end"]) == (0, 250) and lin["start_factor"] == 1e-3
    assert step["type"] == "MultiStepLR" and step["milestones"] == [163_889, 177_546] and step["gamma"] == 0.1
    assert (step["begin"], step["end"]) == (0, 184_375)
    assert all(isinstance(m, int) for m in step["milestones"])
    assert o["model.neck.in_channels"] == 768 and o["model.neck.out_channels"] == 256
    assert o["model.neck.rescales"] == [4.0, 2.0, 1.0, 0.5]
    head_keys = [k for k in o if k.startswith(("model.rpn_head.", "model.roi_head.")) and k.endswith("channels")]
    assert len(head_keys) >= 8
    assert {o[k] for k in head_keys} == {256}
    assert o["model.backbone.out_indices"] == [11] and o["model.backbone.rescales"] == []
    assert o["model.data_preprocessor.pad_size_divisor"] == 1024
    (pad,) = o["model.data_preprocessor.batch_augments"]
    assert pad["type"] == "BatchFixedSizePad" and tuple(pad["size"]) == (1024, 1024)
    assert o["optim_wrapper"]["optimizer"]["weight_decay"] == 0.1
    assert o["optim_wrapper"]["paramwise_cfg"]["layer_decay"] == 0.7
    train, test = o["train_dataloader.dataset.pipeline"], o["test_dataloader.dataset.pipeline"]
    assert "Pad" not in types_of(test) and "Pad" not in types_of(train)
    assert o["val_dataloader.dataset.pipeline"] == test
    assert tuple(next(t for t in test if t["type"] == "Resize")["scale"]) == (1024, 1024)
    lsj = next(t for t in train if t["type"] == "RandomResize")
    assert tuple(lsj["ratio_range"]) == (0.1, 2.0) and tuple(lsj["scale"]) == (1024, 1024)
    assert o["train_dataloader.dataset.ann_file"] == "annotations/instances_train2017.json"
    assert o["train_dataloader.dataset.data_prefix"] == dict(img="train2017/")
    for s in ("val", "test"):
        ann = o[f"{s}_evaluator.ann_file"]
        assert Path(ann).is_absolute() and ann == "/data/coco/annotations/instances_val2017.json"
        assert o[f"{s}_dataloader.dataset.ann_file"] == "annotations/instances_val2017.json"
        assert o[f"{s}_dataloader.dataset.data_prefix"] == dict(img="val2017/")
    assert o["model.test_cfg.rcnn.score_thr"] == 0.05
    assert not [k for k in o if k.startswith(("model.decode_head", "model.auxiliary_head"))]
    assert_plain_json(o)
    json.dumps(o)


def test_coco_cfg_options_tiny_and_splits():
    g = ViTGeometry(depth=3, embed_dim=64, patch_size=8)
    o = cfg_options(coco_job(recipe=DET_RECIPES["tiny"], geometry=g, world_size=1, cuda=False,
                             train_split="tr", val_split="va"))
    assert o["model.test_cfg.rcnn.score_thr"] == 0.0
    assert o["model.neck.in_channels"] == 64 and o["model.neck.out_channels"] == 32
    assert o["model.backbone.out_indices"] == [2]
    assert o["model.data_preprocessor.pad_size_divisor"] == 128
    assert o["test_evaluator.ann_file"] == "/data/coco/annotations/instances_va.json"
    assert o["train_dataloader.dataset.ann_file"] == "annotations/instances_tr.json"
    assert [s["type"] for s in o["param_scheduler"]] == ["MultiStepLR"]
    assert o["param_scheduler"][0]["milestones"] == [2]  # round(0.9 * 2)


def test_det_pipelines_pad_free_test():
    train, test = det_pipelines(replace(DET_RECIPES["coco"], crop=768))
    assert tuple(next(t for t in train if t["type"] == "RandomCrop")["crop_size"]) == (768, 768)
    assert types_of(test) == ["LoadImageFromFile", "Resize", "LoadAnnotations", "PackDetInputs"]
    assert "img_shape" in test[-1]["meta_keys"] and "scale_factor" in test[-1]["meta_keys"]


# option errors ------------------------------------------------------------------------------------------------------


def test_cfg_options_errors():
    with pytest.raises(DenseError, match="not divisible by 3"):
        cfg_options(ade_job(world_size=3))
    with pytest.raises(DenseError, match="not divisible"):
        cfg_options(coco_job(world_size=5))
    with pytest.raises(DenseError, match="is for ade20k, not coco"):
        cfg_options(coco_job(recipe=SEG_RECIPES["ade20k"]))
    with pytest.raises(DenseError, match="is for coco, not ade20k"):
        cfg_options(ade_job(recipe=DET_RECIPES["coco"]))
    with pytest.raises(DenseError, match="iters"):
        cfg_options(ade_job().with_recipe(iters=0))
    with pytest.raises(DenseError, match="batch_size"):
        cfg_options(ade_job(world_size=1).with_recipe(batch_size=0))
    with pytest.raises(DenseError, match="/exports/vitb: patch size 12"):
        cfg_options(ade_job(geometry=ViTGeometry(depth=12, embed_dim=768, patch_size=12)))


# schedules ----------------------------------------------------------------------------------------------------------


SCHEDULES = {"ade20k": ade_schedule, "coco": coco_schedule}


@pytest.mark.parametrize("task", ["ade20k", "coco"])
@pytest.mark.parametrize("warmup", [0, 1])
def test_no_linear_warmup_below_two_steps(task, warmup):
    r = replace(TASKS[task].recipes[task], warmup_iters=warmup)
    sched = SCHEDULES[task](r)
    assert [s["type"] for s in sched] == ["PolyLR" if task == "ade20k" else "MultiStepLR"]
    assert sched[0]["begin"] == 0 and sched[0]["end"] == r.iters


@pytest.mark.parametrize("task", ["ade20k", "coco"])
def test_linear_warmup_of_two_steps(task):
    r = replace(TASKS[task].recipes[task], warmup_iters=2)
    lin, main_sched = SCHEDULES[task](r)
    assert lin["type"] == "LinearLR" and (lin["begin"], lin["end"]) == (0, 2)
    assert main_sched["begin"] == (2 if task == "ade20k" else 0) and main_sched["end"] == r.iters


@pytest.mark.parametrize("iters", [1, 2, 1000, 1500])
def test_ade_schedule_valid_when_run_is_shorter_than_warmup(iters):
    r = replace(SEG_RECIPES["ade20k"], iters=iters)  # warmup_iters 1500
    for s in ade_schedule(r):
        assert s["end"] > s["begin"], s  # mmengine's _ParamScheduler raises otherwise
        if s["type"] == "LinearLR":
            assert s["end"] - s["begin"] >= 2, s


# job hash / make_job ------------------------------------------------------------------------------------------------


def test_job_hash_tracks_settings():
    base = job_hash(ade_job())
    assert base == job_hash(ade_job()) and len(base) == 8
    assert job_hash(ade_job(work_dir=Path("/elsewhere"))) == base  # the work dir is named by the hash
    changed = [ade_job().with_recipe(iters=1000), ade_job(seed=1), ade_job(train_split="train2"),
               ade_job(val_split="val2"), ade_job(export=Path("/exports/other")),
               ade_job(data_root=Path("/data/other")), ade_job(cuda=False), ade_job(world_size=4)]
    hashes = [job_hash(j) for j in changed]
    assert base not in hashes and len(set(hashes)) == len(hashes)


def parse(task: str, export: Path, data: Path, *extra: str):
    return build_parser(task, "doc\n\nmore").parse_args(
        ["--export", str(export), "--data", str(data), "--recipe", "tiny", "--device", "cpu", *extra])


def test_make_job_defaults_and_sets(export, ade):
    job = make_job("ade20k", parse("ade20k", export, ade))
    assert job.recipe == SEG_RECIPES["tiny"] and job.geometry == ViTGeometry(depth=3, embed_dim=64, patch_size=8)
    assert job.work_dir == export.resolve() / f"ade20k-tiny-{job_hash(job)}"
    assert (job.train_split, job.val_split, job.cuda, job.world_size, job.seed) == ("training", "validation",
                                                                                    False, 1, 0)
    assert job.export == export.resolve() and job.data_root == ade.resolve()
    five = make_job("ade20k", parse("ade20k", export, ade, "--set", "iters=5", "--set", "head_channels=none"))
    assert five.recipe == replace(SEG_RECIPES["tiny"], iters=5, head_channels=None)
    assert five.work_dir != job.work_dir and five.work_dir.parent == job.work_dir.parent
    assert cfg_options(five)["model.decode_head.channels"] == 64  # None -> the ViT width
    own = make_job("ade20k", parse("ade20k", export, ade, "--work-dir", str(ade.parent / "wd"), "--seed", "3"))
    assert own.work_dir == (ade.parent / "wd").resolve() and own.seed == 3


@pytest.mark.parametrize(("setting", "needle"), [("bogus=1", "bogus"), ("iters=abc", "iters"),
                                                 ("name=x", "name"), ("iters", "key=value")])
def test_make_job_rejects_bad_sets(export, ade, setting, needle):
    with pytest.raises(ConfigError, match=needle):
        make_job("ade20k", parse("ade20k", export, ade, "--set", setting))


def test_make_job_world_size_from_env(export, ade, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cfg_options(make_job("ade20k", parse("ade20k", export, ade)))["train_dataloader.batch_size"] == 1
    monkeypatch.setenv("WORLD_SIZE", "4")  # tiny's global batch is 2
    with pytest.raises(DenseError, match="not divisible by 4"):
        make_job("ade20k", parse("ade20k", export, ade))


# ADE20K data --------------------------------------------------------------------------------------------------------


def write_label(path: Path, value: int, mode: str = "L") -> None:
    a = np.ones((72, 96), dtype=np.uint8)
    a[3, 4] = value
    img = Image.fromarray(a, mode="L")
    (img.convert(mode) if mode != "L" else img).save(path)


def test_check_ade_root_counts_and_accepts_ignore(tmp_path):
    root = make_ade(tmp_path / "ade", n_train=3, n_val=2)
    assert check_ade_root(root, "training", "validation") == {"training": 3, "validation": 2}
    assert check_ade_root(root, "validation", "validation") == {"validation": 2}
    pairs = ade_pairs(root, "training")
    assert [p[1].name for p in pairs] == [p[0].stem + ".png" for p in pairs]
    write_label(pairs[0][1], 255)
    write_label(pairs[1][1], 150)
    check_ade_root(root, "training", "validation")  # 255 (ignore) and 150 (last class) are valid


def test_ade_label_value_151_named(tmp_path):
    root = make_ade(tmp_path / "ade")
    bad = sorted((root / "annotations" / "validation").glob("*.png"))[1]
    write_label(bad, 151)
    with pytest.raises(DenseError, match="label value 151") as e:
        check_ade_root(root, "training", "validation")
    assert str(e.value).startswith(f"{bad}: ")


def test_ade_rgb_label_map_rejected(tmp_path):
    path = tmp_path / "x.png"
    write_label(path, 3, mode="RGB")
    with pytest.raises(DenseError, match="mode RGB") as e:
        check_ade_label_map(path)
    assert str(path) in str(e.value)
    write_label(path, 3, mode="P")  # palette PNGs hold indices: accepted
    check_ade_label_map(path)
    path.write_bytes(b"not a png")
    with pytest.raises(DenseError, match="unreadable"):
        check_ade_label_map(path)


def test_ade_missing_label_and_folders(tmp_path):
    root = make_ade(tmp_path / "ade")
    missing = sorted((root / "annotations" / "training").glob("*.png"))[2]
    missing.unlink()
    with pytest.raises(DenseError, match="missing label map") as e:
        check_ade_root(root, "training", "validation")
    assert str(missing) in str(e.value)
    shutil.rmtree(root / "images" / "validation")
    with pytest.raises(DenseError, match="missing") as e:
        check_ade_root(root, "validation", "validation")
    assert str(root / "images" / "validation") in str(e.value)
    with pytest.raises(DenseError, match="does not exist"):
        check_ade_root(tmp_path / "nowhere", "training", "validation")
    (root / "images" / "empty").mkdir()
    (root / "annotations" / "empty").mkdir()
    with pytest.raises(DenseError, match="no .jpg images"):
        check_ade_root(root, "empty", "empty")


# COCO data ----------------------------------------------------------------------------------------------------------


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    path.write_text(json.dumps(fn(d)))


@pytest.fixture
def coco(tmp_path) -> Path:
    return make_coco(tmp_path / "coco", COCO_NAMES, n=3)


def test_check_coco_root_valid(coco):
    assert check_coco_root(coco, "train2017", "val2017", COCO_NAMES) == {"train2017": 3, "val2017": 3}
    assert check_coco_root(coco, "val2017", "val2017") == {"val2017": 3}


def test_coco_without_annotations_key(coco):
    ann = coco / "annotations" / "instances_val2017.json"
    edit_json(ann, lambda d: {k: v for k, v in d.items() if k != "annotations"})
    with pytest.raises(DenseError, match="'annotations'") as e:
        check_coco_root(coco, "train2017", "val2017")
    assert str(ann) in str(e.value)


@pytest.mark.parametrize(("key", "needle"), [("image_id", "image_id 987654"), ("category_id", "category_id 987654")])
def test_coco_dangling_annotation_ids(coco, key, needle):
    ann = coco / "annotations" / "instances_train2017.json"

    def corrupt(d):
        d["annotations"][1][key] = 987654
        return d

    edit_json(ann, corrupt)
    with pytest.raises(DenseError, match=needle) as e:
        check_coco_root(coco, "train2017", "val2017")
    assert str(ann) in str(e.value)


def test_coco_annotation_without_segmentation(coco):
    edit_json(coco / "annotations" / "instances_val2017.json",
              lambda d: {**d, "annotations": [{k: v for k, v in a.items() if k != "segmentation"}
                                              for a in d["annotations"]]})
    with pytest.raises(DenseError, match="segmentation"):
        check_coco_root(coco, "train2017", "val2017")


def test_coco_listed_image_missing(coco):
    gone = sorted((coco / "val2017").glob("*.jpg"))[0]
    gone.unlink()
    with pytest.raises(DenseError, match=r"1 of 3 missing") as e:
        check_coco_root(coco, "train2017", "val2017")
    assert str(e.value).startswith(f"{gone}: ")


def test_coco_class_names_and_shapes(coco, tmp_path):
    with pytest.raises(DenseError, match="zebra"):
        check_coco_root(coco, "train2017", "val2017", (*COCO_NAMES, "zebra"))
    ann = coco / "annotations" / "instances_train2017.json"
    ann.write_text("[]")
    with pytest.raises(DenseError, match="not an object") as e:
        check_coco_root(coco, "train2017", "val2017")
    assert str(ann) in str(e.value)
    ann.write_text("{not json")
    with pytest.raises(DenseError, match="unreadable COCO JSON"):
        check_coco_root(coco, "train2017", "val2017")
    with pytest.raises(DenseError, match="instances_test2017.json: missing"):
        check_coco_root(coco, "test2017", "test2017")
    with pytest.raises(DenseError, match="does not exist"):
        check_coco_root(tmp_path / "nowhere", "train2017", "val2017")


def test_coco_image_without_file_name(coco):
    def drop(d):
        del d["images"][0]["file_name"]
        return d

    edit_json(coco / "annotations" / "instances_val2017.json", drop)
    with pytest.raises(DenseError, match="instances_val2017.json"):
        check_coco_root(coco, "train2017", "val2017")


# check_ready / command ----------------------------------------------------------------------------------------------


def dense_settings(**kw) -> dict:
    """Both tasks' settings objects, as ``evals.registry.eval_settings`` hands them out."""
    return {name: t.settings(**{k: v for k, v in kw.items() if k.startswith(name)}) for name, t in dense.TASKS.items()}


def test_check_ready_errors(tmp_path, monkeypatch):
    # which mm* packages are installed is stated here, not read from the environment: the test holds with or
    # without the dense extra (pip install -e '.[dev]' alone)
    monkeypatch.setattr(dense.importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(ConfigError, match=r"--set eval\.ade20k_data="):
        dense.check_ready(dense_settings(), ["ade20k"])
    with pytest.raises(ConfigError, match=r"--set eval\.coco_data="):
        dense.check_ready(dense_settings(ade20k_data=str(tmp_path)), ["ade20k", "coco"])
    with pytest.raises(ConfigError, match="not a directory"):
        dense.check_ready(dense_settings(ade20k_data=str(tmp_path / "nowhere")), ["ade20k"])
    monkeypatch.setattr(dense.importlib.util, "find_spec", lambda name, *a: None if name == "mmseg" else object())
    with pytest.raises(ConfigError, match=r"dense extra \(mmseg missing\)"):
        dense.check_ready(dense_settings(ade20k_data=str(tmp_path)), ["ade20k"])
    dense.check_ready(dense_settings(coco_data=str(tmp_path)), ["coco"])  # mmseg is not needed for coco
    dense.check_ready(dense_settings(), [])  # nothing asked, nothing checked
    with pytest.raises(ConfigError, match=r"eval\.ade20k_recipe=bogus: unknown"):
        dense.check_ready(dense_settings(ade20k_data=str(tmp_path), ade20k_recipe="bogus"), ["ade20k"])


@pytest.mark.parametrize("task", ["ade20k", "coco"])
def test_command_round_trips_through_the_launcher_parser(task, tmp_path):
    cfg = dense_settings(ade20k_data=str(tmp_path / "ade20k"), ade20k_recipe="tiny", ade20k_train_split="tr-a",
                     ade20k_val_split="va-a", coco_data=str(tmp_path / "coco"), coco_recipe="tiny",
                     coco_train_split="tr-c", coco_val_split="va-c")
    out = tmp_path / "records.json"
    cmd = dense.command(cfg[task], task, tmp_path / "exp", "cpu", out)
    argv = dense.TASKS[task].argv
    assert cmd[0] == sys.executable and tuple(cmd[1:1 + len(argv)]) == argv == ("-m", dense.TASKS[task].module)
    suffix = "a" if task == "ade20k" else "c"
    for flag, value in (("--export", str(tmp_path / "exp")), ("--data", str(tmp_path / task)), ("--recipe", "tiny"),
                        ("--train-split", f"tr-{suffix}"), ("--val-split", f"va-{suffix}"), ("--device", "cpu"),
                        ("--records-out", str(out))):
        assert cmd[cmd.index(flag) + 1] == value
    args = build_parser(task, None).parse_args(cmd[1 + len(argv):])  # everything repro.run passes, the launcher accepts
    assert (args.export, args.data, args.recipe, args.records_out) == (tmp_path / "exp", tmp_path / task, "tiny", out)
    assert (args.train_split, args.val_split, args.device) == (f"tr-{suffix}", f"va-{suffix}", "cpu")


# launcher CLI -------------------------------------------------------------------------------------------------------


def ade_argv(export: Path, data: Path, results: Path, *extra: str) -> list[str]:
    return ["--export", str(export), "--data", str(data), "--recipe", "tiny", "--device", "cpu",
            "--results", str(results), *extra]


def fake_ade(seen: list):
    def fn(job: DenseJob):
        seen.append(job)
        return job_records(job, {"mIoU": 41.5, "mAcc": 52.0, "aAcc": 80.0}, 1.0)

    return fn


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


def test_main_ade_appends_records(export, ade, tmp_path, capsys):
    seen: list[DenseJob] = []
    results = tmp_path / "results"
    assert main("ade20k", None, ade_argv(export, ade, results), evaluate_fn=fake_ade(seen)) == 0
    (job,) = seen
    assert job.task is ADE20K and job.recipe.name == "tiny" and not job.cuda
    recs, problems = read_records(results / "records" / "fixture-data.jsonl")
    assert not problems
    assert {r.metric: r.value for r in recs} == {"mIoU": 41.5, "mAcc": 52.0}
    for r in recs:
        assert (r.eval, r.method, r.dataset, r.seed) == ("ade20k", "fixture", "fixture-data", 0)
        assert r.model == "vit_tiny_patch16_224 p8 @32 d3" and r.eval_seconds == 1.0
        assert "tiny recipe: 2 iterations" in r.selection and "validation" in r.selection
    out = capsys.readouterr().out
    assert "ade20k mIoU = 41.50" in out and "ade20k mAcc = 52.00" in out
    # a second run appends, it does not overwrite
    assert main("ade20k", None, ade_argv(export, ade, results), evaluate_fn=fake_ade(seen)) == 0
    assert len(read_records(results / "records" / "fixture-data.jsonl")[0]) == 4


def test_main_records_out(export, ade, tmp_path):
    results, out = tmp_path / "results", tmp_path / "out" / "records.json"
    rc = main("ade20k", None, ade_argv(export, ade, results, "--records-out", str(out)), evaluate_fn=fake_ade([]))
    assert rc == 0
    d = json.loads(out.read_text())
    assert isinstance(d, list) and [(x["eval"], x["metric"], x["value"]) for x in d] == [
        ("ade20k", "mIoU", 41.5), ("ade20k", "mAcc", 52.0)]
    assert not results.exists()


def test_main_nonzero_rank_writes_nothing(export, ade, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    results = tmp_path / "results"
    assert main("ade20k", None, ade_argv(export, ade, results), evaluate_fn=fake_ade([])) == 0
    assert not results.exists()


def test_main_bad_label_one_line(export, tmp_path, capsys):
    root = make_ade(tmp_path / "ade")
    bad = sorted((root / "annotations" / "training").glob("*.png"))[0]
    write_label(bad, 151)
    seen: list = []
    assert main("ade20k", None, ade_argv(export, root, tmp_path / "results"), evaluate_fn=fake_ade(seen)) == 2
    line = one_error_line(capsys, "evals.segmentation")
    assert bad.name in line and "label value 151" in line
    assert not seen and not (tmp_path / "results").exists()


def test_main_export_without_meta(export, ade, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(export / EXPORT_WEIGHTS, broken / EXPORT_WEIGHTS)
    assert main("ade20k", None, ade_argv(broken, ade, tmp_path / "r"), evaluate_fn=fake_ade([])) == 2
    assert EXPORT_META in one_error_line(capsys, "evals.segmentation")


def test_main_non_vit_export(ade, tmp_path, capsys):
    exp = tmp_path / "resnet"
    exp.mkdir()
    (exp / EXPORT_META).write_text(json.dumps(dict(timm_model="resnet18", timm_kwargs={"num_classes": 0},
                                                   mean=[0.5] * 3, std=[0.25] * 3)))
    save_file({"w": torch.zeros(1)}, str(exp / EXPORT_WEIGHTS))
    assert main("ade20k", None, ade_argv(exp, ade, tmp_path / "r"), evaluate_fn=fake_ade([])) == 2
    line = one_error_line(capsys, "evals.segmentation")
    assert "not a timm VisionTransformer" in line and "resnet18" in line


@pytest.mark.parametrize(("extra", "needle"), [(("--set", "bogus=1"), "bogus"), (("--set", "iters=0"), "iters")])
def test_main_bad_sets_one_line(export, ade, tmp_path, capsys, extra, needle):
    assert main("ade20k", None, ade_argv(export, ade, tmp_path / "r", *extra), evaluate_fn=fake_ade([])) == 2
    assert needle in one_error_line(capsys, "evals.segmentation")


def test_main_coco(export, tmp_path, monkeypatch, capsys):
    data = make_coco(tmp_path / "coco", COCO_NAMES, n=2)
    monkeypatch.setattr(tasks, "coco_classes", lambda: COCO_NAMES)
    seen: list[DenseJob] = []

    def fake(job):
        seen.append(job)
        return job_records(job, {"coco/bbox_mAP": 0.403, "coco/segm_mAP": 0.361}, 2.0)

    results = tmp_path / "results"
    assert main("coco", None, ade_argv(export, data, results), evaluate_fn=fake) == 0
    (job,) = seen
    assert (job.train_split, job.val_split) == ("train2017", "val2017")
    assert job.work_dir == export.resolve() / f"coco-tiny-{job_hash(job)}"
    recs, _ = read_records(results / "records" / "fixture-data.jsonl")
    assert {r.metric: r.value for r in recs} == pytest.approx({"box_AP": 40.3, "mask_AP": 36.1})
    assert all(r.eval == "coco" and r.note == "" for r in recs)
    capsys.readouterr()
    monkeypatch.setattr(tasks, "coco_classes", lambda: (*COCO_NAMES, "zebra"))
    assert main("coco", None, ade_argv(export, data, results), evaluate_fn=fake) == 2
    assert "zebra" in one_error_line(capsys, "evals.detection")
    assert len(seen) == 1


# records / errors ---------------------------------------------------------------------------------------------------


def test_job_records_coco_scaling_and_empty(export):
    job = coco_job(export=export, recipe=DET_RECIPES["coco"])
    recs = job_records(job, {"coco/bbox_mAP": 0.403, "coco/segm_mAP": 0.361, "coco/bbox_mAP_50": 0.6}, 3.0)
    assert [(r.metric, r.eval) for r in recs] == [("box_AP", "coco"), ("mask_AP", "coco")]
    assert [r.value for r in recs] == pytest.approx([40.3, 36.1])
    assert all(r.note == "" for r in recs)
    empty = job_records(job, {}, 3.0)
    assert [r.value for r in empty] == [0.0, 0.0]
    assert all("no detection scored above 0.05" in r.note and "val2017" in r.note for r in empty)
    with pytest.raises(DenseError, match="coco/segm_mAP"):
        job_records(job, {"coco/bbox_mAP": 0.4}, 3.0)


def test_job_records_ade_missing_miou(export):
    job = ade_job(export=export, recipe=SEG_RECIPES["tiny"], world_size=1)
    with pytest.raises(DenseError, match="'mIoU'"):
        job_records(job, {"mAcc": 52.0}, 1.0)
    assert [r.value for r in job_records(job, {"mIoU": 10.0, "mAcc": 20.0}, 1.0)] == [10.0, 20.0]  # no scaling


def test_one_line_keeps_the_worker_message():
    msg = "/data/ade/annotations/training/ADE_x.png: label value 151 outside 0..150 (and 255); ADE20K ..."
    for cls in ("DenseError", "evals.dense.options.DenseError"):
        e = RuntimeError("Caught DenseError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         'last):\n  File "/x/worker.py", line 308, in _worker_loop\n    data = fetcher.fetch(index)\n'
                         f"{cls}: {msg}\n")
        assert launch._one_line(e) == msg
    assert launch._one_line(DenseError("first line\nsecond line")) == "first line"
    assert launch._one_line(DenseError("")) == "DenseError"
