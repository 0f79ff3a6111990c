"""``repro.convert``: official checkpoints (the parity fixtures' state dicts, wrapped as the released files wrap
them) become exports whose encoder computes what the official encoder computes, and evaluate like ours; MoCo v3's
linear-classification and DeiT-format files too; the attention heads are never timm's silent default; a file of
another layout is refused in one line that names it."""

from __future__ import annotations

import argparse
import json
import pathlib
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from repro.convert import load_classifier, main
from repro.export import EXPORT_META, load_export
from tests.conftest import ROOT

PARITY = ROOT.parent / "shared" / "reference" / "parity"
pytestmark = pytest.mark.skipif(not PARITY.is_dir(), reason=f"parity fixtures absent ({PARITY})")


def fixture(method: str) -> dict:
    return torch.load(PARITY / f"{method}.pt", weights_only=True)


LAYOUTS = ["mae", "micl", "mocov3", "mocov3-lincls", "mocov3-deit"]
NUM_CLASSES = 10


def base_encoder(sd: dict) -> dict:
    """MoCo v3's base encoder without its projector, under timm's names (what convert_to_deit.py keeps)."""
    return {k.removeprefix("base_encoder."): v for k, v in sd.items()
            if k.startswith("base_encoder.") and not k.startswith("base_encoder.head.")}


def lincls_head(width: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"head.weight": torch.randn(NUM_CLASSES, width, generator=g), "head.bias": torch.randn(NUM_CLASSES,
                                                                                                  generator=g)}


def wrap_lincls(encoder: dict, head: dict) -> dict:
    """As main_lincls.py saves it: the DDP-wrapped classifier's state dict, best_acc1 a 0-d tensor, SGD state."""
    sd = {f"module.{k}": v for k, v in {**encoder, **head}.items()}
    return {"epoch": 90, "arch": "vit_small", "state_dict": sd, "best_acc1": torch.tensor(76.52),
            "optimizer": {"state": {0: {"momentum_buffer": torch.zeros_like(head["head.weight"])}},
                          "param_groups": [{"lr": 0.3, "momentum": 0.9, "params": [0, 1]}]}}


def released(layout: str, tmp_path: Path) -> tuple[Path, dict]:
    """The fixture's official state dict saved the way the released file holds it."""
    method = layout.split("-")[0]
    fx = fixture(method)
    sd = dict(fx["state_dict"])
    if layout == "mocov3":
        # the momentum encoder must not be what is exported: make it differ from the base encoder
        sd = {k: (v + 1.0 if k.startswith("momentum_encoder.") and v.is_floating_point() else v) for k, v in sd.items()}
        ckpt = {"epoch": 300, "arch": "vit_small", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}}
    elif layout == "mocov3-lincls":
        ckpt = wrap_lincls(base_encoder(sd), lincls_head(192))
    elif layout == "mocov3-deit":  # convert_to_deit.py: torch.save({'model': state_dict})
        ckpt = {"model": base_encoder(sd)}
    else:  # MAE's main_pretrain saves {"model", "optimizer", "epoch", "scaler", "args"}
        ckpt = {"model": sd, "epoch": 799, "optimizer": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}
    path = tmp_path / f"{layout}.pth"
    torch.save(ckpt, path)
    return path, fx


def official_features(fx: dict, method: str) -> torch.Tensor:
    """What the official encoder computes: timm's ViT (which every official encoder subclasses) with the
    official encoder tensors, on the fixture's input images."""
    c = fx["config"]
    enc = timm.create_model(c["timm_model"], img_size=c["img_size"], patch_size=c["patch_size"], depth=c["depth"],
                            num_classes=0)
    prefix = "base_encoder." if method == "mocov3" else ""
    sd = {k[len(prefix):]: v for k, v in fx["state_dict"].items()
          if k.startswith(prefix) and not k.startswith(f"{prefix}head.")
          and not k.startswith(("decoder_", "mask_token", "momentum_encoder.", "predictor."))}
    enc.load_state_dict(sd, strict=True)
    enc.eval()
    x = fx["inputs"]["x1" if method == "mocov3" else "imgs"]
    with torch.no_grad():
        return enc.forward_features(x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_export_computes_the_official_encoder_features(layout, tmp_path, capsys):
    method = layout.split("-")[0]
    path, fx = released(layout, tmp_path)
    out = tmp_path / "export"
    # the tiny fixtures' 3 heads are no release's: they must be given
    assert main([method, str(path), "--out", str(out), "--heads", "3"]) == 0, capsys.readouterr().err
    model, meta = load_export(out)  # strict: every key of the timm model filled, none left over
    model.eval()
    x = fx["inputs"]["x1" if method == "mocov3" else "imgs"]
    with torch.no_grad():
        got = model.forward_features(x)
    assert torch.equal(got, official_features(fx, method))
    assert (meta.method, meta.img_size, meta.patch_size, meta.timm_kwargs["depth"]) == (method, 32, 4, 2)
    assert meta.timm_kwargs["num_heads"] == 3 and meta.conversion.heads_from == "--heads"
    dropped = meta.conversion.dropped
    expected_dropped = {"mae": {"decoder"}, "micl": set(), "mocov3-lincls": set(), "mocov3-deit": set(),
                        "mocov3": {"projector (base_encoder.head)", "momentum encoder", "predictor"}}[layout]
    assert set(dropped) == expected_dropped
    assert meta.conversion.layout == {"mocov3": "mocov3-pretrain", "mocov3-lincls": "mocov3-lincls",
                                         "mae": "mae-pretrain", "micl": "encoder", "mocov3-deit": "encoder"}[layout]
    assert (out / "head.safetensors").exists() == (layout == "mocov3-lincls")


def test_the_linear_classification_head_is_kept_with_its_released_top1(tmp_path, capsys):
    path, fx = released("mocov3-lincls", tmp_path)
    out = tmp_path / "export"
    assert main(["mocov3", str(path), "--out", str(out), "--heads", "3"]) == 0, capsys.readouterr().err
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["extra"]["head"]["best_acc1"] == pytest.approx(76.52, abs=1e-4)
    assert (meta["extra"]["head"]["num_classes"], meta["extra"]["head"]["epoch"]) == (NUM_CLASSES, 90)
    with safe_open(str(out / "head.safetensors"), "pt") as f:  # the file alone says what it is
        assert json.loads(f.metadata()["best_acc1"]) == pytest.approx(76.52, abs=1e-4)
        assert json.loads(f.metadata()["arch"]) == "vit_small"
    clf = load_classifier(out).eval()
    head = lincls_head(192)
    with torch.no_grad():
        got = clf(fx["inputs"]["x1"])
    # what main_lincls.py's model computes: the linear head on the final-norm cls token
    want = official_features(fx, "mocov3")[:, 0] @ head["head.weight"].T + head["head.bias"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def vit_s_encoder() -> dict:
    vit_s = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=0)
    return vit_s.state_dict()


def twelve_head_features(enc: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=0,
                              num_heads=heads)
    model.load_state_dict(enc, strict=True)
    with torch.no_grad():
        return model.eval().forward_features(x)


@pytest.mark.parametrize("layout", ["pretrain", "lincls", "deit"])
def test_mocov3_vit_small_gets_its_twelve_heads_in_every_layout(layout, tmp_path, capsys):
    enc = vit_s_encoder()
    if layout == "pretrain":
        ckpt = {"state_dict": {f"module.base_encoder.{k}": v for k, v in enc.items()}}
    elif layout == "lincls":
        ckpt = wrap_lincls(enc, lincls_head(384))
    else:
        ckpt = {"model": enc}
    path = tmp_path / "vit-s.pth.tar"
    torch.save(ckpt, path)
    out = tmp_path / "export"
    assert main(["mocov3", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["timm_model"] == "vit_small_patch16_224" and meta["timm_kwargs"]["num_heads"] == 12
    assert meta["extra"]["heads_from"] == "mocov3 release, width 384"
    model, _ = load_export(out)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.eval().forward_features(x)
    assert torch.equal(got, twelve_head_features(enc, x, 12))
    assert not torch.allclose(got, twelve_head_features(enc, x, 6))  # same shapes: only the numbers tell


def test_deit_format_vit_small_as_mae_asks_for_heads_instead_of_timms_six(tmp_path, capsys):
    path = tmp_path / "vit-s-deit.pth"
    torch.save({"model": vit_s_encoder()}, path)
    assert main(["mae", str(path), "--out", str(tmp_path / "export")]) == 2
    line = one_error_line(capsys)
    assert "--heads" in line and "width-384" in line
    assert not (tmp_path / "export").exists()
    assert main(["mae", str(path), "--out", str(tmp_path / "export"), "--heads", "12"]) == 0
    assert json.loads((tmp_path / "export" / EXPORT_META).read_text())["timm_kwargs"]["num_heads"] == 12


@pytest.mark.parametrize("method", ["mae", "micl", "mocov3"])
def test_an_unreleased_width_without_heads_is_refused(method, tmp_path, capsys):
    path, _ = released(method, tmp_path)
    assert main([method, str(path), "--out", str(tmp_path / "export")]) == 2
    assert "pass --heads N" in one_error_line(capsys)
    assert not (tmp_path / "export").exists()


def test_heads_that_do_not_divide_the_width_are_refused(tmp_path, capsys):
    path, _ = released("micl", tmp_path)
    assert main(["micl", str(path), "--out", str(tmp_path / "export"), "--heads", "5"]) == 2
    assert "does not divide the width 192" in one_error_line(capsys)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("repro.convert: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("fmt", "layout", "looks_like"), [
    ("mae", "mocov3", "a MoCo v3 pre-training checkpoint (main_moco.py"),
    ("micl", "mocov3-lincls", "a MoCo v3 linear-classification checkpoint (main_lincls.py"),
    ("mocov3", "mae", "an MAE-style pre-training checkpoint with its decoder"),
    ("mocov3", "finetuned", "a fine-tuned classifier"),
    ("mae", "finetuned", "a fine-tuned classifier"),
])
def test_a_file_of_another_layout_is_refused_naming_it(fmt, layout, looks_like, tmp_path, capsys):
    if layout == "finetuned":  # MAE's main_finetune.py: {'model': encoder + head}
        path = tmp_path / "ft.pth"
        torch.save({"model": {**fixture("mae")["state_dict"], "head.weight": torch.zeros(10, 192)}}, path)
    else:
        path, _ = released(layout, tmp_path)
    assert main([fmt, str(path), "--out", str(tmp_path / "export"), "--heads", "3"]) == 2
    line = one_error_line(capsys)
    assert f"not a {fmt} checkpoint: it looks like {looks_like}" in line, line
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(("layout", "extra_key"), [("mae", "foo.weight"), ("mocov3-lincls", "module.head.scale"),
                                                    ("mocov3", "module.queue")])
def test_an_unaccounted_key_is_an_error_and_nothing_is_written(layout, extra_key, tmp_path, capsys):
    path, _ = released(layout, tmp_path)
    with torch.serialization.safe_globals([argparse.Namespace]):  # MAE's saved arguments
        ckpt = torch.load(path, weights_only=True)
    ckpt["model" if layout == "mae" else "state_dict"][extra_key] = torch.zeros(3)
    torch.save(ckpt, path)
    assert main([layout.split("-")[0], str(path), "--out", str(tmp_path / "export"), "--heads", "3"]) == 2
    assert f"unexpected key {extra_key.removeprefix('module.')!r}" in one_error_line(capsys)
    assert not (tmp_path / "export").exists()


def test_a_checkpoint_needing_other_globals_is_refused(tmp_path, capsys):
    path = tmp_path / "odd.pth"
    torch.save({"model": fixture("micl")["state_dict"], "where": pathlib.PurePosixPath("/x")}, path)
    assert main(["micl", str(path), "--out", str(tmp_path / "export")]) == 2
    assert "weights_only=True" in one_error_line(capsys)
    assert not (tmp_path / "export").exists()


def test_conmim_is_refused_with_the_reason(tmp_path, capsys):
    path, _ = released("micl", tmp_path)
    assert main(["conmim", str(path), "--out", str(tmp_path / "export")]) == 2
    assert "relative position bias" in one_error_line(capsys)


def test_a_converted_export_evaluates_like_ours(tmp_path, capsys):
    from evals.cli import main as eval_main

    path, _ = released("mae", tmp_path)
    out = tmp_path / "export"
    assert main(["mae", str(path), "--out", str(out), "--heads", "3"]) == 0
    small = ["--set", "data.builtin_train=64", "--set", "data.builtin_test=32", "--set", "eval.linear_epochs=2",
             "--set", "eval.linear_warmup_epochs=1", "--set", "eval.finetune_epochs=1",
             "--set", "eval.finetune_batch_size=16"]
    for name in ("knn", "linear", "finetune"):
        rc = eval_main(name, None, ["--export", str(out), "--results", str(tmp_path / "res"), "--no-progress",
                                        "--device", "cpu", *small])
        assert rc == 0, capsys.readouterr().err
    recs = [json.loads(x) for x in (tmp_path / "res" / "records" / "builtin-shapes.jsonl").read_text().splitlines()]
    assert {r["eval"] for r in recs} == {"knn", "linear", "finetune"}
    assert all(r["method"] == "mae" and r["budget"] == "official" and 0 <= r["value"] <= 100 for r in recs)
