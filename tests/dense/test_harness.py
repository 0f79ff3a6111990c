"""The dense harnesses on OpenMMLab: adapter, pyramid, layer decay, guards, and 2-iteration train + test runs.

Needs the ``dense`` extra (mmengine, mmcv-lite, mmseg, mmdet); skipped as a whole without it. Harness runs go
through ``python -m evals.segmentation`` / ``evals.detection`` in a child process, exactly as a user runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmseg", reason="needs the dense extra: pip install -e '.[dense]'")
pytest.importorskip("mmdet", reason="needs the dense extra: pip install -e '.[dense]'")

from evals.dense.mmcv_ext import install  # noqa: E402

install()
import evals.dense.vit as dv  # noqa: E402
from evals.dense.options import DenseError  # noqa: E402
from repro.checkpoint import CheckpointError  # noqa: E402
from repro.export import read_export  # noqa: E402
from tests.conftest import ROOT, SHARED_DATA  # noqa: E402
from tests.dense.fixtures import make_ade, make_coco, make_export  # noqa: E402

pytestmark = pytest.mark.mm


@pytest.fixture(scope="module")
def export16(tmp_path_factory) -> Path:
    """ViT with 16-px patches and 6 blocks: taps blocks 1, 2, 3, 5 (L/3, L/2, 2L/3, L)."""
    return make_export(tmp_path_factory.mktemp("exp16") / "export", patch=16, depth=6, dim=64, img=64)


@pytest.fixture(scope="module")
def export8(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("exp8") / "export", patch=8, depth=3, dim=64, img=32)


@pytest.fixture(scope="module")
def coco_names() -> tuple[str, ...]:
    from evals.dense.tasks import coco_classes

    return coco_classes()


def test_backbone_holds_the_export_and_init_weights_keeps_it(export16):
    bb = dv.ReproViT(export=str(export16), rescales=[4, 2, 1, 0.5])
    _, state = read_export(export16)
    before = {k: v.clone() for k, v in bb.vit.state_dict().items()}
    bb.init_weights()
    for k, v in bb.vit.state_dict().items():
        assert torch.equal(v, state[k]), k
        assert torch.equal(v, before[k]), k
    assert bb.out_indices == [1, 2, 3, 5]
    assert "norm.weight" not in bb.vit.state_dict()  # pruned: unused by the pyramid


def test_mm_recursive_init_does_not_reinitialise_the_vit(export16):
    """OpenMMLab's BaseModule.init_weights recurses into children; timm's ViT has its own init_weights."""
    from mmengine.model import BaseModule

    class Wrapper(BaseModule):
        def __init__(self):
            super().__init__()
            self.backbone = dv.ReproViT(export=str(export16))

    w = Wrapper()
    w.init_weights()
    _, state = read_export(export16)
    assert all(torch.equal(v, state[k]) for k, v in w.backbone.vit.state_dict().items())


@pytest.mark.parametrize("patch,export_fixture", [(16, "export16"), (8, "export8")])
def test_pyramid_gives_strides_4_to_32_contiguous(patch, export_fixture, request):
    export = request.getfixturevalue(export_fixture)
    from evals.dense.launch import read_geometry

    g = read_geometry(export)
    bb = dv.ReproViT(export=str(export), rescales=list(g.rescales())).eval()
    x = torch.randn(2, 3, 128, 96)
    feats = bb(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(128 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert all(f.shape[1] == 64 and f.is_contiguous() for f in feats)
    bb_cl = bb.to(memory_format=torch.channels_last)
    assert all(f.is_contiguous() for f in bb_cl(x.to(memory_format=torch.channels_last)))


def test_block_features_are_the_vit_blocks_before_the_final_norm(export16):
    bb = dv.ReproViT(export=str(export16)).eval()  # no pyramid: raw tapped blocks
    vit, _ = dv.build_export_vit(export16)
    vit.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        outs = []
        for blk in vit.blocks:
            t = blk(t)
            outs.append(t[:, 1:].transpose(1, 2).reshape(1, 64, 4, 4))
        feats = bb(x)
    for f, i in zip(feats, [1, 2, 3, 5], strict=True):
        torch.testing.assert_close(f, outs[i])


def test_simple_fpn_outputs_five_levels():
    neck = dv.ReproSimpleFPN(in_channels=64, out_channels=32, rescales=[4.0, 2.0, 1.0, 0.5])
    outs = neck((torch.randn(2, 64, 8, 8),))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4),
                                              (2, 32, 2, 2)]
    up4 = neck.stages[0][0]
    assert [type(m).__name__ for m in up4] == ["ConvTranspose2d", "ReproLN2d", "GELU", "ConvTranspose2d"]
    assert up4[-1].out_channels == 16  # ViTDet halves the width per 2x up-sampling step


def test_ln2d_is_layernorm_over_channels():
    ln = dv.ReproLN2d(8)
    x = torch.randn(2, 8, 3, 5)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


def test_layer_decay_matches_mae_and_timm(export16):
    """Block i of L gets decay^(L - i), embeddings decay^(L + 1), pyramid/heads 1 — timm's rule on the same ViT."""
    import timm
    from timm.optim import param_groups_layer_decay

    model = torch.nn.Module()
    model.backbone = dv.ReproViT(export=str(export16), rescales=[4, 2, 1, 0.5])
    model.decode_head = torch.nn.Conv2d(64, 3, 1)
    depth, decay = 6, 0.5
    groups = dv.layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=decay, depth=depth)
    ours = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}
    # with a head, as MAE's fine-tuning: timm then puts norm/head at layer L + 1 (scale 1), the rule we follow
    ref_vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=depth, embed_dim=64,
                                num_heads=2, num_classes=3)
    ref = {}
    for g in param_groups_layer_decay(ref_vit, weight_decay=0.05, no_weight_decay_list=ref_vit.no_weight_decay(),
                                      layer_decay=decay):
        for p in g["params"]:
            ref[id(p)] = (g["lr_scale"], g["weight_decay"])
    ref_names = {id(p): n for n, p in ref_vit.named_parameters()}
    for pid, (scale, wd) in ref.items():
        name = "backbone.vit." + ref_names[pid]
        if name in ours:  # blocks and embeddings (the final norm is pruned from ours)
            assert ours[name][0] == pytest.approx(scale), name
            assert ours[name][1] == wd, name
    assert ours["backbone.vit.blocks.5.attn.qkv.weight"][0] == pytest.approx(decay ** 1)
    assert ours["backbone.vit.pos_embed"] == (pytest.approx(decay ** (depth + 1)), 0.0)
    assert ours["backbone.pyramid.0.0.weight"][0] == 1.0 and ours["decode_head.weight"] == (1.0, 0.05)


def test_wrong_arch_and_mismatched_weights_are_refused(tmp_path, export8):
    from safetensors.torch import save_file

    bad = tmp_path / "resnet"
    bad.mkdir()
    meta = json.loads((export8 / "backbone.json").read_text())
    (bad / "backbone.json").write_text(json.dumps({**meta, "timm_model": "resnet10t", "timm_kwargs": {
        "num_classes": 0}}))
    save_file({"x": torch.zeros(1)}, str(bad / "backbone.safetensors"))
    with pytest.raises(DenseError, match="not a timm VisionTransformer"):
        dv.ReproViT(export=str(bad))
    short = tmp_path / "short"
    short.mkdir()
    (short / "backbone.json").write_text((export8 / "backbone.json").read_text())
    _, state = read_export(export8)
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.2.")}, str(short / "backbone.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        dv.ReproViT(export=str(short))
    with pytest.raises(DenseError, match="export is not set"):
        dv.ReproViT(export=None)


def test_backbone_hook_refuses_changed_weights(export8):
    bb = dv.ReproViT(export=str(export8))
    model = SimpleNamespace(backbone=bb)
    runner = SimpleNamespace(iter=0, model=model)
    dv.ReproCheckBackboneHook().before_train(runner)  # untouched: passes
    with torch.no_grad():
        bb.vit.blocks[0].mlp.fc1.weight.add_(1.0)
    with pytest.raises(DenseError, match="differ from the export"):
        dv.ReproCheckBackboneHook().before_train(runner)
    dv.ReproCheckBackboneHook().before_train(SimpleNamespace(iter=5, model=model))  # resumed: its own weights


def test_full_unpickling_is_scoped_to_the_work_dir(tmp_path):
    """Only checkpoints inside the job's work dir load with weights_only=False; anything else stays safe."""
    import pickle

    from mmengine.runner.checkpoint import CheckpointLoader

    from evals.dense.launch import _trust_own_checkpoints

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())  # any callable: weights_only=True refuses to run it

    work = tmp_path / "work"
    work.mkdir()
    for where in (work / "iter_1.pth", tmp_path / "foreign.pth"):
        torch.save({"meta": Payload(), "state_dict": {}}, where)
    before = CheckpointLoader._schemes[""]
    try:
        _trust_own_checkpoints(work.resolve())
        assert CheckpointLoader.load_checkpoint(str(work / "iter_1.pth"))["meta"] == os.getcwd()
        with pytest.raises(pickle.UnpicklingError):
            CheckpointLoader.load_checkpoint(str(tmp_path / "foreign.pth"))
    finally:
        CheckpointLoader._schemes[""] = before


def test_seg_map_check_names_the_file():
    import numpy as np

    t = dv.ReproCheckSegMap()
    ok = {"gt_seg_map": np.array([[0, 149, 255]], dtype=np.uint8), "seg_map_path": "a.png", "reduce_zero_label": True}
    assert t.transform(ok) is ok
    with pytest.raises(DenseError, match=r"b\.png: label value 151"):
        t.transform({"gt_seg_map": np.array([[150]], dtype=np.uint8), "seg_map_path": "b.png",
                     "reduce_zero_label": True})


# ---- end to end: python -m evals.segmentation / evals.detection ------------------------------------------------


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", module, *args, "--device", "cpu"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _records(results: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((results / "records").glob("*.jsonl")) for line in f.read_text().split(
        "\n") if line.strip()]


def _train_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "Iter(train)" in ln]


def _checkpoint_vit(work_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = max(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]  # our own mmengine checkpoint
    return {k[len("backbone.vit."):]: v for k, v in state.items() if k.startswith("backbone.vit.")}


def test_segmentation_trains_tests_records_and_resumes(tmp_path, export16):
    ade = make_ade(tmp_path / "ADEChallengeData2016")
    results, work = tmp_path / "results", tmp_path / "work"
    args = ("--export", str(export16), "--data", str(ade), "--recipe", "tiny", "--results", str(results),
            "--work-dir", str(work))
    p = _run("evals.segmentation", *args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    logs = p.stdout + p.stderr
    assert len(_train_lines(logs)) == 2
    recs = _records(results)
    assert [(r["eval"], r["metric"]) for r in recs] == [("ade20k", "mIoU"), ("ade20k", "mAcc")]
    assert all(0.0 <= r["value"] <= 100.0 and r["dataset"] == "fixture-data" for r in recs)
    assert "tiny recipe: 2 iterations" in recs[0]["selection"]
    # the backbone trained from the export's weights (the hook checked equality at iteration 0)
    _, export_state = read_export(export16)
    trained = _checkpoint_vit(work)
    assert set(trained) <= set(export_state)
    assert any(not torch.equal(v.float(), export_state[k].float()) for k, v in trained.items())
    # a second run resumes from the finished checkpoint (mmengine's own pickle, trusted only in the work dir)
    q = _run("evals.segmentation", *args, cwd=tmp_path)
    assert q.returncode == 0, q.stderr[-3000:]
    assert _train_lines(q.stdout + q.stderr) == []
    again = _records(results)[2:]
    assert [r["value"] for r in again] == [r["value"] for r in recs]


def test_detection_trains_tests_and_records(tmp_path, export16, coco_names):
    coco = make_coco(tmp_path / "coco", coco_names)
    results = tmp_path / "results"
    p = _run("evals.detection", "--export", str(export16), "--data", str(coco), "--recipe", "tiny", "--results",
             str(results), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(_train_lines(p.stdout + p.stderr)) == 2
    recs = _records(results)
    assert [(r["eval"], r["metric"]) for r in recs] == [("coco", "box_AP"), ("coco", "mask_AP")]
    assert all(0.0 <= r["value"] <= 100.0 for r in recs)
    work = next(export16.glob("coco-tiny-*"))
    assert (work / "last_checkpoint").is_file()


@pytest.mark.parametrize("case", ["label_151", "coco_no_annotations"])
def test_bad_inputs_exit_2_with_one_line(tmp_path, export8, coco_names, case):
    import numpy as np
    from PIL import Image

    if case == "label_151":
        root = make_ade(tmp_path / "ade")
        bad = sorted((root / "annotations" / "training").glob("*.png"))[0]
        Image.fromarray(np.full((72, 96), 151, dtype=np.uint8), mode="L").save(bad)
        p = _run("evals.segmentation", "--export", str(export8), "--data", str(root), "--recipe", "tiny",
                 cwd=tmp_path)
        expect = bad.name
    else:
        root = make_coco(tmp_path / "coco", coco_names)
        ann = root / "annotations" / "instances_val2017.json"
        d = json.loads(ann.read_text())
        del d["annotations"]
        ann.write_text(json.dumps(d))
        p = _run("evals.detection", "--export", str(export8), "--data", str(root), "--recipe", "tiny", cwd=tmp_path)
        expect = "no 'annotations'"
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("evals.") and expect in err[0], p.stderr[-2000:]
    assert not (tmp_path / "results").exists()


# ---- the real samples in ../shared/data (skipped when absent) --------------------------------------------------

ADE_SAMPLE = SHARED_DATA / "ade20k-sample" / "ADEChallengeData2016"
COCO_MINI = SHARED_DATA / "coco-mini"


@pytest.mark.skipif(not ADE_SAMPLE.is_dir(), reason="../shared/data/ade20k-sample absent")
def test_segmentation_on_real_ade20k_samples(tmp_path, export16):
    results = tmp_path / "results"
    p = _run("evals.segmentation", "--export", str(export16), "--data", str(ADE_SAMPLE), "--train-split",
             "validation", "--recipe", "tiny", "--results", str(results), "--work-dir", str(tmp_path / "w"),
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = {r["metric"]: r["value"] for r in _records(results)}
    assert set(recs) == {"mIoU", "mAcc"} and all(0.0 <= v <= 100.0 for v in recs.values())


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/data/coco-mini absent")
def test_detection_on_real_coco_images(tmp_path, export16):
    """Twelve real val2017 images with their full annotations (polygons and crowd RLE), in COCO's layout."""
    import shutil

    d = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    keep = sorted(d["images"], key=lambda im: im["id"])[:12]
    ids = {im["id"] for im in keep}
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for im in keep:
        shutil.copy(COCO_MINI / "val2017" / im["file_name"], root / "val2017" / im["file_name"])
    anns = [a for a in d["annotations"] if a["image_id"] in ids]
    assert any(a["iscrowd"] for a in d["annotations"])  # the sample has crowd RLE somewhere
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({**d, "images": keep,
                                                                             "annotations": anns}))
    results = tmp_path / "results"
    p = _run("evals.detection", "--export", str(export16), "--data", str(root), "--train-split", "val2017",
             "--recipe", "tiny", "--results", str(results), "--work-dir", str(tmp_path / "w"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = {r["metric"]: r["value"] for r in _records(results)}
    assert set(recs) == {"box_AP", "mask_AP"} and all(0.0 <= v <= 100.0 for v in recs.values())
