from __future__ import annotations

import pytest

from evals.registry import eval_settings, normalized
from repro.config import ConfigError, EvalValues, RunConfig, apply_overrides, parse_set_args
from repro.micl import MiCLConfig


def base() -> RunConfig:
    return RunConfig(method="micl", method_cfg=MiCLConfig())


def test_overrides_are_typed():
    cfg = apply_overrides(base(), {"train.batch_size": "64", "method.mask_ratio": "0.8", "model.img_size": "32",
                                   "train.precision": "fp32", "eval.linear_base_lrs": "0.1,0.2", "seed": "3",
                                   "method.loss_group_size": "none"})
    assert cfg.train.batch_size == 64 and cfg.method_cfg.mask_ratio == 0.8 and cfg.model.img_size == 32
    assert cfg.train.precision == "fp32" and cfg.seed == 3
    assert cfg.method_cfg.loss_group_size is None
    settings = eval_settings(cfg.eval)  # eval.* values are typed by the evaluation that owns them
    assert settings["linear"].linear_base_lrs == (0.1, 0.2)
    assert normalized(cfg.eval).as_dict()["linear_base_lrs"] == (0.1, 0.2)


def test_eval_keys_are_checked_by_the_evaluations_that_own_them():
    s = eval_settings(EvalValues((("train_subset", "100"), ("knn_k", "5"))))
    assert s["knn"].train_subset == s["linear"].train_subset == 100  # one key, shared by both protocols
    assert s["knn"].knn_k == 5 and not hasattr(s["linear"], "knn_k")
    full = normalized(EvalValues()).as_dict()
    assert full["knn_k"] == 20 and full["finetune_recipe"] == "vit-b" and full["coco_val_split"] == "val2017"
    for values, match in [((("knn_kk", "5"),), "unknown key 'eval.knn_kk'; valid keys under eval: "),
                          ((("knn_k", "many"),), "eval.knn_k: expected an integer"),
                          ((("linear_holdout", "0"),), "linear_holdout must be >= 1"),
                          ((("finetune_recipe", "vit-x"),), "unknown recipe 'vit-x'")]:
        with pytest.raises(ConfigError, match=match):
            eval_settings(EvalValues(values))
    with pytest.raises(ConfigError, match="eval.<setting>"):
        apply_overrides(base(), {"eval.linear.epochs": "3"})


@pytest.mark.parametrize(("key", "value", "match"), [
    ("train.lr", "1", "unknown key 'train.lr'"),
    ("method.nope", "1", "unknown key 'method.nope'"),
    ("bogus.x", "1", "unknown key"),
    ("train.batch_size", "big", "expected an integer"),
    ("method.mask_ratio", "lots", "cannot use|expected a number"),
    ("train.amp", "maybe", "true/false"),  # the deprecated alias of train.precision still checks its value
    ("train.precision", "fp16", "auto|fp32|bf16"),
    ("method.mask_ratio", "1.5", "mask_ratio"),
    ("train.optimizer", "sgd", "adamw|lars"),
])
def test_bad_overrides(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(base(), {key: value})


def test_parse_set_args():
    assert parse_set_args(["a.b=1", "c.d = x=y"]) == {"a.b": "1", "c.d": "x=y"}
    with pytest.raises(ConfigError):
        parse_set_args(["novalue"])


def test_config_hash_tracks_numbers_not_logging():
    c = base()
    assert apply_overrides(c, {"train.log_every": "5"}).config_hash() == c.config_hash()
    assert apply_overrides(c, {"budget.spec": "5m"}).config_hash() != c.config_hash()
    assert apply_overrides(c, {"method.kappa": "0.1"}).config_hash() != c.config_hash()


def test_a_new_builtin_generator_is_new_data(monkeypatch):
    import repro.config as config

    c, on_disk = base(), apply_overrides(base(), {"data.path": "/data/x"})
    before, before_disk = c.config_hash(), on_disk.config_hash()
    monkeypatch.setattr(config, "BUILTIN_DATA_VERSION", config.BUILTIN_DATA_VERSION + 1)
    assert c.config_hash() != before  # runs of the old generator are not resumed as if they were this data's
    assert on_disk.config_hash() == before_disk  # a user's dataset does not depend on it


def test_decode_mode_enters_the_hash_only_where_it_changes_pixels():
    c, on_disk = base(), apply_overrides(base(), {"data.path": "/data/x"})
    for cfg in (c, on_disk):  # the default (and workers) leave the hash of runs made before the field existed
        d = cfg.to_dict()
        assert d["data"].pop("decode") == "fast"
        assert apply_overrides(cfg, {"data.num_workers": "3"}).config_hash() == cfg.config_hash()
    assert apply_overrides(on_disk, {"data.decode": "pil"}).config_hash() != on_disk.config_hash()
    assert apply_overrides(c, {"data.decode": "pil"}).config_hash() == c.config_hash()  # built-in data: no decoding
    with pytest.raises(ConfigError, match="data.decode"):
        apply_overrides(c, {"data.decode": "nvjpeg"})


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        base().train.batch_size = 3  # type: ignore[misc]
