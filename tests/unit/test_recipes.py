"""Named recipes: every override applies to every method, and the cifar10 recipe builds what it says."""

from __future__ import annotations

import pytest

from evals.finetune import FINETUNE_RECIPES
from evals.registry import eval_settings
from repro.config import RunConfig
from repro.plan import resolve_hparams
from repro.recipes import RECIPES, build_config
from repro.registry import METHODS, build_method


def recipe_config(method: str, recipe: str, **extra) -> RunConfig:
    return build_config(method, recipe, extra)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_override_applies_and_states_a_reason(recipe, method):
    overrides = RECIPES[recipe](method)
    assert all(len(o.why) > 10 for o in overrides)
    eval_settings(recipe_config(method, recipe).eval)  # unknown keys or wrong types raise ConfigError


def test_cifar10_recipe_shares_model_batch_and_protocol():
    cfgs = {m: recipe_config(m, "cifar10") for m in METHODS}
    assert {(c.model.name, c.model.img_size, c.model.patch_size, c.train.batch_size) for c in cfgs.values()} \
        == {("vit_small_patch16_224", 32, 4, 512)}
    evals = [eval_settings(c.eval) for c in cfgs.values()]
    assert {e["finetune"].finetune_recipe for e in evals} == {"cifar10"}
    assert "cifar10" in FINETUNE_RECIPES
    assert len({e["linear"].linear_base_lrs for e in evals}) == 1


def test_cifar10_lrs_follow_each_papers_scaling_rule():
    for m in METHODS:
        hp = resolve_hparams(recipe_config(m, "cifar10"))
        paper = METHODS[m].paper_config()
        if paper.lr_is_absolute:  # ConMIM: 5e-4 at its batch 2048, scaled linearly to 512
            assert hp.lr == pytest.approx(paper.base_lr * 512 / paper.batch_size)
        else:
            assert hp.lr == pytest.approx(paper.base_lr * 512 / 256)


@pytest.mark.parametrize("method", ["micl", "mae", "conmim", "macrl"])
def test_cifar10_masking_leaves_enough_tokens(method):
    cfg = recipe_config(method, "cifar10", **{"model.depth": 1})
    m = build_method(cfg)
    assert m.backbone.num_patches == 64
    if method == "micl":
        assert m.len_keep // 2 >= 4  # at least ~4 tokens per MiCL view
    if method == "macrl":
        assert m.cfg.bank_size < 50_000  # below the training set
    if method == "conmim":
        assert m.cfg.min_mask_patches <= m.cfg.num_mask_patches < 64
