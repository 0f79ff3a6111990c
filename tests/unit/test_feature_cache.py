"""Frozen features are extracted once per export and reused from ``EXPORT_DIR/features/`` by later commands, never
when the export, the data or the precision changed, never from a corrupt file; the random-init floor of a seed is
one export, evaluated once for every method and budget."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

import evals.features as features
from evals.features import CACHE_DIR, EvalContext, feature_precision
from evals.registry import eval_settings
from repro.config import EvalValues
from repro.data import load_data
from repro.evaluate import eval_key, evaluate
from repro.pretrain import random_init_export
from repro.records import read_records
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def data():
    return load_data(tiny_config("mae").data)  # 64 train / 32 test built-in images


@pytest.fixture
def export(tmp_path, data) -> Path:
    return random_init_export(tiny_config("mae").model, data, 0, tmp_path / "runs", "tiny")


@pytest.fixture
def extractions(monkeypatch):
    """Counts calls of the real extraction (one per split)."""
    calls: list[str] = []
    real = features.extract

    def counted(model, split, meta, ctx, name, *a, **k):
        calls.append(name)
        return real(model, split, meta, ctx, name, *a, **k)

    monkeypatch.setattr(features, "extract", counted)
    monkeypatch.setenv("REPRO_CPU_BF16", "0")  # auto = fp32 on every test machine
    return calls


def context(data, **values) -> EvalContext:
    return EvalContext(data, eval_settings(EvalValues(tuple(values.items()))), torch.device("cpu"), progress=False)


def test_features_are_extracted_once_and_reloaded_by_a_later_command(data, export, extractions):
    ctx = context(data)
    f, meta = ctx.features(export, ctx.settings["knn"])
    assert extractions == ["train", "test"] and f.precision == "fp32" and f.train_x.dtype == torch.float32
    files = list((export / CACHE_DIR).glob("*.pt"))
    assert len(files) == 1
    again, meta2 = context(data).features(export, ctx.settings["linear"])  # a new command, the other protocol
    assert extractions == ["train", "test"] and meta2 == meta
    for a, b in [(f.train_x, again.train_x), (f.train_y, again.train_y), (f.test_x, again.test_x),
                 (f.test_y, again.test_y)]:
        assert torch.equal(a, b)
    context(data, train_subset=20).features(export, context(data, train_subset=20).settings["knn"])
    assert extractions == ["train", "test"] * 2 and len(list((export / CACHE_DIR).glob("*.pt"))) == 2


def test_a_changed_export_or_changed_data_never_reuses_stale_features(data, export, extractions, tmp_path):
    ctx = context(data)
    f, _ = ctx.features(export, ctx.settings["knn"])
    other = random_init_export(tiny_config("mae").model, data, 1, tmp_path / "other", "tiny")  # seed 1 weights
    for part in other.glob("backbone.safetensors*"):  # the weights (and their checksum, where exports have one)
        (export / part.name).write_bytes(part.read_bytes())
    g, _ = context(data).features(export, ctx.settings["knn"])
    assert extractions == ["train", "test"] * 2 and not torch.equal(f.test_x, g.test_x)
    shifted = load_data(tiny_config("mae", **{"data.builtin_seed": 7}).data)  # same name, sizes, other images
    context(shifted).features(export, ctx.settings["knn"])
    assert extractions == ["train", "test"] * 3


def test_a_corrupt_cache_file_is_extracted_again_with_a_warning(data, export, extractions, caplog):
    ctx = context(data)
    f, _ = ctx.features(export, ctx.settings["knn"])
    (path,) = (export / CACHE_DIR).glob("*.pt")
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="repro"):
        g, _ = context(data).features(export, ctx.settings["knn"])
    assert extractions == ["train", "test"] * 2 and torch.equal(f.test_x, g.test_x)
    assert any("unreadable feature cache" in r.getMessage() for r in caplog.records)
    torch.save({"key": "someone else's", "train_x": torch.zeros(1)}, path)  # loads, but is not these features
    context(data).features(export, ctx.settings["knn"])
    assert extractions == ["train", "test"] * 3
    context(data).features(export, ctx.settings["knn"])  # the rewritten file is good again
    assert extractions == ["train", "test"] * 3
    state = torch.load(path, weights_only=True)
    state["test_x"][0, 0] += 1.0  # a flipped number: loads, right key and shapes, wrong content
    torch.save(state, path)
    h, _ = context(data).features(export, ctx.settings["knn"])
    assert extractions == ["train", "test"] * 4 and torch.equal(h.test_x, f.test_x)


def test_feature_precision_resolves_per_machine_and_keys_only_new_numbers(data, export, extractions, monkeypatch):
    cpu = torch.device("cpu")
    assert feature_precision("auto", cpu) == "fp32" and feature_precision("bf16", cpu) == "bf16"
    assert feature_precision("auto", torch.device("cuda")) == "bf16"  # as extraction always was on CUDA
    ctx = context(data)
    # the kNN key of the defaults is the one from before eval.feature_precision wherever auto means fp32
    old = {"eval": "knn", "settings": {"train_subset": 0, "knn_k": 20, "knn_temperature": 0.07},
           "dataset": data.name, "test_split": data.test_split_name, "sizes": [len(data.train), len(data.test)]}
    assert eval_key("knn", ctx) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:10]
    assert eval_key("knn", context(data, feature_precision="fp32")) == eval_key("knn", ctx)
    bf16 = context(data, feature_precision="bf16")
    assert eval_key("knn", bf16) != eval_key("knn", ctx)
    monkeypatch.setenv("REPRO_CPU_BF16", "1")
    assert feature_precision("auto", cpu) == "bf16" and eval_key("knn", ctx) == eval_key("knn", bf16)
    fp32 = context(data, feature_precision="fp32")
    f32, _ = fp32.features(export, fp32.settings["knn"])
    b16, _ = bf16.features(export, bf16.settings["knn"])
    assert (f32.precision, b16.precision) == ("fp32", "bf16") and b16.test_x.dtype == torch.float32
    assert extractions == ["train", "test"] * 2 and len(list((export / CACHE_DIR).glob("*.pt"))) == 2
    assert torch.allclose(f32.test_x, b16.test_x, atol=0.1) and not torch.equal(f32.test_x, b16.test_x)


def test_the_random_init_floor_is_one_export_evaluated_once_per_seed(data, tmp_path, extractions):
    """repro.run builds the floor from (model, seed) alone: every method and budget of a results directory gets the
    same export, its cached features and its done-markers."""
    model = tiny_config("mae").model
    out, records = tmp_path / "runs", tmp_path / "results" / "records" / "x.jsonl"
    first = random_init_export(model, data, 0, out, "tiny")
    stamp = (first / "backbone.safetensors").stat().st_mtime_ns
    assert random_init_export(tiny_config("micl").model, data, 0, out, "tiny") == first  # another method's run
    assert (first / "backbone.safetensors").stat().st_mtime_ns == stamp
    small = {"linear_epochs": 2, "linear_warmup_epochs": 1, "linear_batch_size": 16}
    recs = evaluate(first, ["knn", "linear"], context(data, **small), records)
    assert [r.eval for r in recs] == ["knn", "linear"] and extractions == ["train", "test"]
    assert "features fp32" in recs[0].selection and "features fp32" in recs[1].selection
    assert evaluate(first, ["knn", "linear"], context(data, **small), records) == []  # the next budget: done
    again = evaluate(first, ["linear"], context(data, **{**small, "linear_epochs": 3}), records)  # new setting
    assert len(again) == 1 and extractions == ["train", "test"]  # measured again, from the cached features
    assert len(read_records(records)[0]) == 3


def test_the_linear_probe_chooses_on_images_outside_its_subset_and_keeps_the_chosen_head(data, export, extractions):
    """eval.train_subset=40 of 64 images leaves 24: the lr is chosen on a class-balanced 20 of those (extracted once,
    cached beside the export), the probes fit on all 40, and the reported probe is the chosen lr's head, which is
    exactly the probe that lr alone trains on the 40 (nothing retrained)."""
    import evals.linear as linear
    from repro.data import balanced_subset, held_out_of_subset

    values = dict(train_subset=40, linear_holdout=20, linear_epochs=4, linear_warmup_epochs=1, linear_batch_size=16,
                  linear_base_lrs=(0.1, 1.0, 10.0), linear_widenings=0)
    ctx = context(data, **values)
    cfg = ctx.settings["linear"]
    (rec,) = linear.run(ctx, export, cfg)
    assert extractions == ["train", "test", "held-out"]
    assert "on 20 held-out training images outside the 40 the probes train on" in rec.selection
    assert "retrained" not in rec.selection
    lr = float(rec.selection.split()[1])
    f, _ = ctx.features(export, cfg)
    alone = linear.train_probes(f.train_x, f.train_y, f.num_classes, (lr,), cfg, ctx.seed)
    assert linear.accuracies(alone, f.test_x, f.test_y)[0] == rec.value

    held = held_out_of_subset(data.train, 40, 20)
    inside = set(balanced_subset(data.train, 40).images.flatten(1).sum(1).tolist())
    assert held is not None and len(held) == 20 and not inside & set(held.images.flatten(1).sum(1).tolist())
    counts = torch.bincount(held.labels, minlength=len(data.train.classes))
    assert int(counts.max() - counts.min()) <= 1  # class-balanced
    assert held_out_of_subset(data.train, 50, 20) is None and held_out_of_subset(data.train, 0, 20) is None

    (again,) = linear.run(context(data, **values), export, cfg)  # a later command: every feature from the cache
    assert extractions == ["train", "test", "held-out"] and again.value == rec.value

    (old,) = linear.run(context(data, **values, linear_holdout_from="inside"), export,
                        context(data, **values, linear_holdout_from="inside").settings["linear"])
    assert "retrained on all train" in old.selection
    assert eval_key("linear", context(data, **values)) != eval_key("linear", context(data, **values,
                                                                                     linear_holdout_from="inside"))


def test_the_mocov3_linear_protocol_is_sgd_on_fresh_crops_with_a_per_epoch_cosine(data, export, monkeypatch):
    """eval.linear_protocol=mocov3 (main_lincls.py): SGD momentum 0.9, no weight decay, lr base x batch / 256 on a
    per-epoch half-cosine, every batch of every epoch (the last partial one kept) through the frozen encoder; its
    record is its own column, and the encoder is untouched."""
    import math

    import evals.linear as linear
    from repro.export import read_export

    steps: list[float] = []
    real_sgd = torch.optim.SGD

    class SpySGD(real_sgd):  # type: ignore[misc,valid-type]
        def __init__(self, params, lr, **kw):
            assert kw == {"momentum": 0.9, "weight_decay": 0.0}
            super().__init__(params, lr, **kw)

        def step(self, closure=None):
            steps.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    values = dict(linear_protocol="mocov3", linear_epochs=3, mocov3_batch_size=24, mocov3_base_lr=2.0)
    ctx = context(data, **values)
    before = read_export(export)[1]
    (rec,) = linear.run(ctx, export, ctx.settings["linear"])
    init = 2.0 * 24 / 256
    per_epoch = math.ceil(len(data.train) / 24)  # 64 images: 24 + 24 + 16
    assert steps == [pytest.approx(init * 0.5 * (1 + math.cos(math.pi * e / 3))) for e in range(3)
                     for _ in range(per_epoch)]
    assert rec.eval == "linear-mocov3" and rec.metric == "top1" and 0 <= rec.value <= 100
    assert "MoCo v3 protocol" in rec.selection and "last epoch" in rec.selection
    after = read_export(export)[1]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert eval_key("linear", ctx) != eval_key("linear", context(data))
    (again,) = linear.run(context(data, **values), export, ctx.settings["linear"])
    assert again.value == rec.value  # seeded: the same crops, the same head
