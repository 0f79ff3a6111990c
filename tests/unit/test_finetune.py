"""MAE fine-tuning protocol: layer-decay groups, Mixup targets, the strict key mapping, smokes and the eval CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from evals.cli import main as cli_main
from evals.features import EvalContext
from evals.finetune import (
    FINETUNE_RECIPES,
    FinetuneKeyError,
    Settings,
    build_finetune_model,
    finetune,
    make_mixup,
    make_optimizer,
    map_export_keys,
    resolve_recipe,
    run,
    train_transform,
)
from repro.config import ConfigError, DataConfig, ModelConfig
from repro.data import FileImages, load_data
from repro.export import EXPORT_WEIGHTS, read_export
from repro.pretrain import random_init_export
from repro.trainer import NonFiniteLoss

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)
SMALL_DATA = DataConfig(builtin_train=64, builtin_test=32)
# 64 images / batch 16 = 4 steps per epoch; 2 epochs = 8 optimizer steps
SMOKE = Settings(finetune_recipe="small32", finetune_epochs=2, finetune_batch_size=16, feature_batch_size=32)


@pytest.fixture(scope="module")
def builtin():
    return load_data(SMALL_DATA)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, builtin) -> Path:
    return random_init_export(MODEL, builtin, seed=0, out=tmp_path_factory.mktemp("runs"), recipe="tiny")


def test_layer_decay_scales_follow_mae():
    depth, decay = 3, 0.5
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth, num_classes=10,
                              global_pool="avg")
    recipe = FINETUNE_RECIPES["small32"]
    opt = make_optimizer(model, type(recipe)(**{**recipe.__dict__, "layer_decay": decay}), lr=1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    scale, wd = {}, {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert names[id(p)] not in scale, "a parameter sits in two groups"
            scale[names[id(p)]], wd[names[id(p)]] = g["lr_scale"], g["weight_decay"]
    assert set(scale) == set(names.values())

    def expected(name: str) -> float:
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return decay ** (depth + 1)
        if name.startswith("blocks."):
            return decay ** (depth - int(name.split(".")[1]))
        assert name.startswith(("fc_norm.", "head.")), name
        return 1.0

    for name, s in scale.items():
        assert s == pytest.approx(expected(name)), name
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.125) and scale["head.weight"] == 1.0
    # MAE: no weight decay on biases, norms, pos_embed and cls_token; 0.05 on weight matrices
    assert wd["pos_embed"] == wd["cls_token"] == wd["blocks.1.norm1.weight"] == wd["head.bias"] == 0.0
    assert wd["blocks.1.mlp.fc1.weight"] == wd["head.weight"] == 0.05


def test_mixup_targets_are_soft_distributions():
    torch.manual_seed(0)
    mix = make_mixup(FINETUNE_RECIPES["vit-b"], num_classes=10)
    assert mix is not None
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8)
    xm, t = mix(x.clone(), y)
    assert t.shape == (8, 10)
    assert torch.allclose(t.sum(dim=1), torch.ones(8))
    assert (t >= 0).all() and t.max() < 1.0  # label smoothing 0.1 never leaves a one-hot row
    assert not torch.equal(xm, x)


def test_rand_augment_survives_posterize_at_full_magnitude():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    tf = train_transform(FINETUNE_RECIPES["small32"], 32, (0.5,) * 3, (0.5,) * 3)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    img = Image.new("RGB", (32, 32), (200, 120, 40))
    assert op.aug_fn(img, 0).getpixel((0, 0)) == (0, 0, 0)  # keep 0 bits -> black, as Pillow < 11 did
    assert op.aug_fn(img, 2).getpixel((0, 0)) == (192, 64, 0)
    out = tf(img)
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


def test_key_mapping_accepts_an_export_and_rejects_extra_missing_or_mis_shaped(export_dir):
    meta, state = read_export(export_dir)
    model, mapping = build_finetune_model(meta, state, 10, 0.1, "x")
    assert mapping.dropped == ("norm.bias", "norm.weight")
    assert mapping.fresh == ("fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight")
    assert set(mapping.loaded) | set(mapping.dropped) == set(state)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])
    assert model.head.weight.std() < 1e-4 and not model.head.bias.any()  # MAE: trunc_normal std 2e-5

    with pytest.raises(FinetuneKeyError, match="no place.*extra.weight"):
        map_export_keys(model, {**state, "extra.weight": torch.zeros(1)}, "x")
    with pytest.raises(FinetuneKeyError, match="no place.*head.weight"):
        map_export_keys(model, {**state, "head.weight": torch.zeros(10, 192)}, "x")
    lacking = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}
    with pytest.raises(FinetuneKeyError, match="lacks.*blocks.0.attn.qkv.weight"):
        map_export_keys(model, lacking, "x")
    with pytest.raises(FinetuneKeyError, match="shape mismatch for pos_embed"):
        map_export_keys(model, {**state, "pos_embed": torch.zeros(1, 17, 192)}, "x")


def test_recipe_overrides_and_unknown_recipe():
    r = resolve_recipe(Settings(finetune_recipe="small32", finetune_epochs=0.4, finetune_batch_size=8))
    assert r.epochs == 0.4 and r.warmup_epochs == 0.2 and r.batch_size == 8
    assert resolve_recipe(Settings()) == FINETUNE_RECIPES["vit-b"]
    assert FINETUNE_RECIPES["vit-l"].layer_decay == 0.75 and FINETUNE_RECIPES["vit-l"].drop_path == 0.2
    with pytest.raises(ConfigError, match="unknown recipe 'vit-x'"):
        Settings(finetune_recipe="vit-x")
    with pytest.raises(ConfigError, match="even"):
        Settings(finetune_batch_size=7)


def _assert_finetuned(ctx: EvalContext, export_dir: Path, s: Settings, steps: int) -> None:
    r, meta = finetune(ctx, export_dir, resolve_recipe(s), s.feature_batch_size)
    assert r.steps == steps
    assert torch.isfinite(torch.tensor(r.final_loss))
    assert 0.0 <= r.top1 <= r.top5 <= 100.0
    exported = load_file(str(export_dir / EXPORT_WEIGHTS))
    tuned = r.model.state_dict()
    for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"):
        assert not torch.allclose(tuned[k].cpu(), exported[k]), f"{k} did not move"


def test_finetune_smoke_builtin(builtin, export_dir):
    _assert_finetuned(EvalContext(builtin, {}, torch.device("cpu"), progress=False), export_dir, SMOKE, steps=8)
    one_step = Settings(finetune_recipe="small32", finetune_epochs=0.25, finetune_batch_size=16)
    recs = run(EvalContext(builtin, {}, torch.device("cpu"), progress=False), export_dir, one_step)
    assert [(r.eval, r.metric) for r in recs] == [("finetune", "top1"), ("finetune", "top5")]
    assert all(0.0 <= r.value <= 100.0 for r in recs)
    assert "LAST epoch" in recs[0].selection and "no best-epoch" in recs[0].selection


def test_finetune_smoke_cifar10_jpegs_streamed(cifar_jpeg_subset, tmp_path):
    data = load_data(DataConfig(path=str(cifar_jpeg_subset), in_memory="no", num_workers=0))
    assert isinstance(data.train, FileImages) and data.num_classes == 10
    export = random_init_export(MODEL, data, seed=0, out=tmp_path, recipe="tiny")
    cfg = Settings(finetune_recipe="small32", finetune_epochs=1, finetune_batch_size=32, feature_batch_size=64)
    _assert_finetuned(EvalContext(data, {}, torch.device("cpu"), progress=False), export, cfg, steps=200 // 32)


def test_non_finite_loss_stops_with_the_trainer_error(builtin, export_dir, tmp_path):
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "backbone.json").write_text((export_dir / "backbone.json").read_text())
    state = load_file(str(export_dir / EXPORT_WEIGHTS))
    save_file({**state, "blocks.0.mlp.fc1.bias": torch.full_like(state["blocks.0.mlp.fc1.bias"], float("nan"))},
              str(bad / EXPORT_WEIGHTS))
    cfg = Settings(finetune_recipe="small32", finetune_epochs=0.25, finetune_batch_size=16)
    with pytest.raises(NonFiniteLoss, match="not finite at step 0"):
        finetune(EvalContext(builtin, {}, torch.device("cpu"), progress=False), bad, resolve_recipe(cfg))


def test_cli_help_and_set_scope(capsys, export_dir):
    with pytest.raises(SystemExit) as e:
        cli_main("finetune", "Fine-tune.", ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--export DIR" in out and "backbone.json" in out and "exit with status 2" in out
    assert cli_main("knn", None, ["--export", str(export_dir), "--set", "model.depth=3"]) == 2
    assert "only eval.*, data.* and seed" in capsys.readouterr().err
