from __future__ import annotations

import pytest
import torch

from repro.budget import parse_budget
from repro.data import load_data
from repro.distributed import DistInfo
from repro.plan import HParams, Plan, lr_at, make_plan
from repro.trainer import NonFiniteLoss, Trainer, build_optimizer
from tests.conftest import tiny_method

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


def plan(total=100, warmup=10, lr=1.0, min_lr=0.1) -> Plan:
    hp = HParams(global_batch=8, lr=lr, min_lr=min_lr, weight_decay=0.05, betas=(0.9, 0.95), warmup_fraction=0.1)
    return make_plan(hp, parse_budget(f"{total}steps"), steps_per_epoch=10, total_steps=total, warmup_steps=warmup)


def test_lr_schedule_warmup_then_cosine():
    p = plan()
    assert lr_at(0, p) == 0.0
    assert lr_at(5, p) == pytest.approx(0.5)
    assert lr_at(10, p) == pytest.approx(1.0)
    assert lr_at(55, p) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, p) == pytest.approx(0.1)
    assert all(lr_at(s, p) >= lr_at(s + 1, p) for s in range(10, 99))


# Hand-written from each official code (METHODS.md, "Optimizer"): parameters that must be decayed, must not be
# decayed, or must not be optimised at all (frozen). Names at the tiny recipe's depth.
_ENC_W = ["backbone.vit.patch_embed.proj.weight", "backbone.vit.blocks.0.attn.qkv.weight",
          "backbone.vit.blocks.1.mlp.fc2.weight"]
_ENC_1D = ["backbone.vit.blocks.0.norm1.weight", "backbone.vit.blocks.0.attn.qkv.bias",
           "backbone.vit.blocks.1.mlp.fc1.bias", "backbone.vit.norm.weight", "backbone.vit.norm.bias"]
DECAY_SETS = {
    # MAE / OCL: timm add_weight_decay without skip list: 1-D and .bias not decayed, cls/mask tokens decayed
    "mae": (_ENC_W + ["backbone.vit.cls_token", "decoder.mask_token", "decoder.embed.weight", "decoder.pred.weight"],
            _ENC_1D + ["decoder.norm.weight", "decoder.embed.bias"], ["backbone.vit.pos_embed"]),
    "micl": (_ENC_W + ["backbone.vit.cls_token"], _ENC_1D, ["backbone.vit.pos_embed"]),
    # MoCo v3: AdamW(model.parameters()): everything trainable decayed, BN affine and biases included
    "mocov3": (_ENC_W[1:] + _ENC_1D + ["backbone.vit.cls_token", "projector.0.weight", "projector.1.weight",
                                       "projector.1.bias", "predictor.1.weight", "predictor.1.bias"], [],
               ["backbone.vit.pos_embed", "backbone.vit.patch_embed.proj.weight", "momentum_backbone.vit.cls_token",
                "momentum_projector.0.weight"]),
    # ConMIM (BEiT get_parameter_groups + no_weight_decay {pos_embed, cls_token}): the [MASK] token is decayed
    "conmim": (_ENC_W + ["backbone.mask_token", "projector.0.weight", "projector.3.weight"],
               _ENC_1D + ["backbone.vit.pos_embed", "backbone.vit.cls_token", "projector.1.weight",
                          "projector.1.bias"],
               ["teacher_backbone.vit.cls_token", "teacher_projector.0.weight"]),
    # MimCo (no code; assumption 7): BEiT's rule
    "mimco": (_ENC_W + ["backbone.mask_token", "patch_head.0.weight", "image_head.0.weight"],
              _ENC_1D + ["backbone.vit.pos_embed", "backbone.vit.cls_token", "patch_head.0.bias",
                         "image_head.1.weight"], []),
    # MACRL (no code; assumption 6): MAE's rule
    "macrl": (_ENC_W + ["backbone.vit.cls_token", "decoders.0.mask_token", "projector.0.weight"],
              _ENC_1D + ["projector.0.bias", "decoders.1.norm.weight"], ["backbone.vit.pos_embed"]),
}


@pytest.mark.parametrize("method", sorted(DECAY_SETS))
def test_each_method_decays_what_its_official_code_decays(method):
    cfg, m = tiny_method(method)
    opt = build_optimizer(m, cfg, plan(), torch.device("cpu"))
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.05) for g in opt.param_groups)
    want_decay, want_no_decay, frozen = DECAY_SETS[method]
    all_names = set(names.values())
    for n in want_decay + want_no_decay + frozen:
        assert n in all_names, f"{method}: no parameter {n} (renamed? update the list)"
    assert set(want_decay) <= decayed, f"{method}: not decayed but should be: {set(want_decay) - decayed}"
    assert set(want_no_decay) <= not_decayed, f"{method}: decayed but should not be: {set(want_no_decay) & decayed}"
    assert not set(frozen) & (decayed | not_decayed), f"{method}: frozen tensors optimised"
    if method == "mocov3":
        assert not not_decayed  # every trainable tensor decayed


def _trainer(tmp_path, method="micl", budget="12steps", **over):
    cfg, m = tiny_method(method, **{"budget.spec": budget, "train.log_every": 3, "train.ckpt_every_s": 0.0,
                                     **over})
    data = load_data(cfg.data)
    return Trainer(cfg, m, data, CPU, tmp_path, progress=False), m


@pytest.mark.parametrize("method", ["micl", "mae"])
def test_interrupted_run_resumes_bit_identically(tmp_path, method):
    full, m_full = _trainer(tmp_path / "full", method)
    full.fit()
    ref = {k: v.clone() for k, v in m_full.state_dict().items()}

    crashed, _ = _trainer(tmp_path / "crash", method)
    real = crashed.source.batch

    def dying(step):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")
        return real(step)

    crashed.source.batch = dying
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed, m_res = _trainer(tmp_path / "crash", method)
    result = resumed.fit()
    assert result.resumed and result.steps == 12
    for k, v in ref.items():
        assert torch.equal(v, m_res.state_dict()[k]), k


def test_time_budget_calibration_leaves_no_trace(tmp_path):
    t, m = _trainer(tmp_path, "micl", budget="2s")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = t._plan()
    assert p.seconds_per_step and p.seconds_per_step > 0 and p.total_steps == max(1, int(2 / p.seconds_per_step))
    assert p.calibration_steps >= t.cfg.budget.calib_min_steps
    for k, v in before.items():
        assert torch.equal(v, m.state_dict()[k]), k


def test_time_spent_waiting_for_data_is_logged_and_a_data_bound_run_is_named(tmp_path, caplog):
    import json
    import logging
    import time

    t, _ = _trainer(tmp_path, "mae", budget="6steps")
    real = t.source.batch

    def slow(step):  # a batch source far slower than the step (~0.1 s idle; < 1 s on two heavily loaded cores)
        time.sleep(1.5)
        return real(step)

    t.source.batch = slow
    with caplog.at_level(logging.WARNING, logger="repro.trainer"):
        result = t.fit()
    assert result.data_wait_share > 0.5 and "waited for data" in caplog.text and "data-bound" in caplog.text
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0.5 < x["data_wait"] <= 1.0 for x in lines)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["data_wait_share"] == result.data_wait_share

    fast, _ = _trainer(tmp_path / "fast", "mae", budget="6steps")
    assert fast.fit().data_wait_share < 0.5  # in-memory batches: the step dominates


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    t, m = _trainer(tmp_path, "mae", budget="9steps")
    real = m.forward

    def poisoned(batch, step, **kw):
        out = real(batch, step, **kw)
        return out._replace(loss=out.loss * float("nan")) if step.step == 4 else out

    m.forward = poisoned
    with pytest.raises(NonFiniteLoss, match="step 4"):
        t.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and not state["complete"]  # the last good checkpoint survives
