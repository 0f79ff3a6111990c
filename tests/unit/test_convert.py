"""``repro.convert``: official checkpoints (the parity fixtures' state dicts, wrapped as the released files wrap
them) become exports whose encoder computes what the official encoder computes, and evaluate like ours."""

from __future__ import annotations

import argparse
import json
import pathlib
from pathlib import Path

import pytest
import timm
import torch

from repro.checkpoint import EXPORT_META, EXPORT_WEIGHTS, load_export
from repro.convert import main
from tests.conftest import ROOT

PARITY = ROOT.parent / "shared" / "reference" / "parity"
pytestmark = pytest.mark.skipif(not PARITY.is_dir(), reason=f"parity fixtures absent ({PARITY})")


def fixture(method: str) -> dict:
    return torch.load(PARITY / f"{method}.pt", weights_only=True)


def released(method: str, tmp_path: Path) -> tuple[Path, dict]:
    """The fixture's official state dict saved the way the released file holds it."""
    fx = fixture(method)
    sd = dict(fx["state_dict"])
    if method == "mocov3":
        # the momentum encoder must not be what is exported: make it differ from the base encoder
        sd = {k: (v + 1.0 if k.startswith("momentum_encoder.") and v.is_floating_point() else v) for k, v in sd.items()}
        ckpt = {"epoch": 300, "arch": "vit_small", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}}
    else:  # MAE's main_pretrain saves {"model", "optimizer", "epoch", "scaler", "args"}
        ckpt = {"model": sd, "epoch": 799, "optimizer": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}
    path = tmp_path / f"{method}.pth"
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


@pytest.mark.parametrize("method", ["mae", "micl", "mocov3"])
def test_converted_export_computes_the_official_encoder_features(method, tmp_path, capsys):
    path, fx = released(method, tmp_path)
    out = tmp_path / "export"
    assert main([method, str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    model, meta = load_export(out)  # strict: every key of the timm model filled, none left over
    model.eval()
    x = fx["inputs"]["x1" if method == "mocov3" else "imgs"]
    with torch.no_grad():
        got = model.forward_features(x)
    assert torch.equal(got, official_features(fx, method))
    assert (meta.method, meta.img_size, meta.patch_size, meta.timm_kwargs["depth"]) == (method, 32, 4, 2)
    dropped = meta.extra["dropped"]
    if method == "mocov3":
        assert set(dropped) == {"projector (base_encoder.head)", "momentum encoder", "predictor"}
        assert meta.timm_kwargs.get("num_heads") is None  # width 192: timm's 3 heads; only ViT-S differs
    elif method == "mae":
        assert set(dropped) == {"decoder"}
    else:
        assert dropped == {}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("repro.convert: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_unaccounted_key_is_an_error_and_nothing_is_written(tmp_path, capsys):
    fx = fixture("mae")
    sd = {**fx["state_dict"], "head.weight": torch.zeros(10, 192)}  # a fine-tuned checkpoint's classifier
    path = tmp_path / "ft.pth"
    torch.save({"model": sd}, path)
    assert main(["mae", str(path), "--out", str(tmp_path / "export")]) == 2
    assert "unexpected key 'head.weight'" in one_error_line(capsys)
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


def test_mocov3_vit_small_gets_its_twelve_heads(tmp_path, capsys):
    vit_s = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=0)
    sd = {f"module.base_encoder.{k}": v for k, v in vit_s.state_dict().items()}
    path = tmp_path / "vit-s.pth.tar"
    torch.save({"state_dict": sd}, path)
    assert main(["mocov3", str(path), "--out", str(tmp_path / "export")]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "export" / EXPORT_META).read_text())
    assert meta["timm_model"] == "vit_small_patch16_224" and meta["timm_kwargs"]["num_heads"] == 12
    assert (tmp_path / "export" / EXPORT_WEIGHTS).exists()


def test_a_converted_export_evaluates_like_ours(tmp_path, capsys):
    from evals.cli import main as eval_main

    path, _ = released("mae", tmp_path)
    out = tmp_path / "export"
    assert main(["mae", str(path), "--out", str(out)]) == 0
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
