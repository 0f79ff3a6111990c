from __future__ import annotations

import pytest
import torch

from repro.data import load_data
from repro.distributed import DistInfo
from repro.trainer import NonFiniteLoss, Plan, Trainer, build_optimizer, lr_at
from tests.conftest import build_method

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


def plan(total=100, warmup=10, lr=1.0, min_lr=0.1) -> Plan:
    return Plan(total, 8, 10, lr, min_lr, warmup, 0.05, (0.9, 0.95), "100steps", "steps", None, None, 0, 0.0, None)


def test_lr_schedule_warmup_then_cosine():
    p = plan()
    assert lr_at(0, p) == 0.0
    assert lr_at(5, p) == pytest.approx(0.5)
    assert lr_at(10, p) == pytest.approx(1.0)
    assert lr_at(55, p) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, p) == pytest.approx(0.1)
    assert all(lr_at(s, p) >= lr_at(s + 1, p) for s in range(10, 99))


def test_no_weight_decay_rule():
    cfg, m = build_method("mae")
    opt = build_optimizer(m, cfg, plan(), torch.device("cpu"))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[i] for i in decay}
    assert "backbone.vit.blocks.0.attn.qkv.weight" in decayed
    for n in ("backbone.vit.cls_token", "decoder.mask_token", "backbone.vit.blocks.0.norm1.weight",
              "backbone.vit.blocks.0.attn.qkv.bias"):
        assert n not in decayed
    assert "backbone.vit.pos_embed" not in names.values() or not m.backbone.vit.pos_embed.requires_grad


def _trainer(tmp_path, method="micl", budget="12steps", **over):
    cfg, m = build_method(method, **{"budget.spec": budget, "train.log_every": 3, "train.ckpt_every_s": 0.0,
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
    p = t._plan(lambda p: build_optimizer(m, t.cfg, p, torch.device("cpu")))
    assert p.seconds_per_step and p.seconds_per_step > 0 and p.total_steps == max(1, int(2 / p.seconds_per_step))
    assert p.calibration_steps >= t.cfg.budget.calib_min_steps
    for k, v in before.items():
        assert torch.equal(v, m.state_dict()[k]), k


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
