"""The trainer in parts (issue 27, item 3): planning (``repro.plan``), checkpoints (cadence, resume), pre-emption and
the metrics, each on its own; and ``Trainer.fit``, the loop that calls them, stays short."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from repro.budget import Budget, BudgetError, Calibration, parse_budget
from repro.checkpoint import CheckpointError
from repro.distributed import DistInfo
from repro.errors import NonFiniteLoss
from repro.method import StepOutput
from repro.plan import (
    MAX_STEPS,
    REPLAN_AT,
    HParams,
    Plan,
    Replanner,
    lr_at,
    make_plan,
    next_replan_step,
    resolve_hparams,
    steps_bought,
)
from repro.signals import Preempted
from repro.trainer import Checkpoints, Finals, Preemption, Trainer, TrainLog, agree
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
HP = HParams(global_batch=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.95), warmup_fraction=0.1)


# ---------------------------------------------------------------------------------------------- planning


def test_a_plan_is_built_in_one_place():
    files = [p for pkg in ("repro", "baselines", "evals", "tests") for p in (ROOT / pkg).rglob("*.py")
             if p != Path(__file__).resolve()]
    built = sorted(str(p.relative_to(ROOT)) for p in files if re.search(r"(?<![\w.])Plan\(", p.read_text()))
    assert built == ["repro/plan.py"]
    assert len(re.findall(r"(?<![\w.])Plan\(", (ROOT / "repro" / "plan.py").read_text())) == 2  # make_plan; reading
    with pytest.raises(TypeError):
        Plan(10, 8, 1, 0.1, 0.0, 0, 0.0, (0.9, 0.95), "10steps", "steps", None, None, 0, 0.0, None)  # type: ignore


def test_make_plan_takes_the_hyper_parameters_the_budget_and_its_calibration():
    p = make_plan(HP, parse_budget("90s"), steps_per_epoch=10, total_steps=250, flops_per_image=2e9,
                  calibration=Calibration(0.36, 12, 2, 5.5))
    assert (p.total_steps, p.planned_steps, p.warmup_steps, p.global_batch, p.lr, p.betas) == (
        250, 250, 25, 64, 1e-3, (0.9, 0.95))
    assert (p.budget, p.budget_kind, p.budget_seconds) == ("90s", "time", 90.0)
    assert (p.seconds_per_step, p.calibration_steps, p.calibration_seconds, p.flops_per_image) == (0.36, 12, 5.5, 2e9)
    bare = make_plan(HP, parse_budget("3ep"), steps_per_epoch=10, total_steps=30, warmup_steps=0)
    assert (bare.warmup_steps, bare.seconds_per_step, bare.calibration_steps, bare.budget_seconds) == (0, None, 0, None)
    assert bare.epochs == 3.0


def test_hyper_parameters_are_typed_and_follow_the_overrides():
    cfg = tiny_config("mae", **{"train.batch_size": 512, "train.weight_decay": 0.01, "train.base_lr": 1e-3,
                                "train.warmup_fraction": None})
    hp = resolve_hparams(cfg)
    paper = cfg.method_cfg
    assert isinstance(hp, HParams) and hp.global_batch == 512 and hp.weight_decay == 0.01
    assert hp.lr == pytest.approx(1e-3 * 512 / 256) and hp.betas == tuple(paper.betas)
    assert hp.warmup_fraction == pytest.approx(paper.warmup_epochs / paper.epochs)


def test_steps_bought_by_each_kind_of_budget_and_the_refusals():
    assert steps_bought(parse_budget("3ep"), HP, steps_per_epoch=10, flops_per_image=None, calibration=None,
                        method="m") == 30
    assert steps_bought(parse_budget("6.4e12flop"), HP, steps_per_epoch=10, flops_per_image=1e9, calibration=None,
                        method="m") == 100
    assert steps_bought(parse_budget("90s"), HP, steps_per_epoch=10, flops_per_image=None,
                        calibration=Calibration(0.5, 10, 2, 6.0), method="m") == 180
    with pytest.raises(BudgetError, match="method m has no FLOP count"):
        steps_bought(parse_budget("1e12flop"), HP, steps_per_epoch=10, flops_per_image=None, calibration=None,
                     method="m")
    with pytest.raises(BudgetError, match="is the unit right"):
        steps_bought(parse_budget("1e30flop"), HP, steps_per_epoch=10, flops_per_image=1e9, calibration=None,
                     method="m")
    assert MAX_STEPS == 10**9


def test_the_replanner_revises_at_its_points_from_the_speed_it_measured():
    p = make_plan(HP, Budget("time", 100.0, "100s"), steps_per_epoch=10, total_steps=200,
                  calibration=Calibration(0.5, 5, 2, 3.0))
    r = Replanner(p, 0, now=1000.0)
    at = round(REPLAN_AT[0] * 200)
    assert [s for s in range(1, 200) if r.due(s)] == [at]
    assert r.seconds_per_step(at, 1000.0 + at * 0.25) == pytest.approx(0.25)
    q = r.revise(p, at, now=1005.0, elapsed=10.0, seconds_per_step=0.25)  # 90 s left at 0.25 s: 360 more steps
    assert q.total_steps == at + 360 and q.revisions == ((at, at + 360),) and q.planned_steps == 200
    assert r.at == next_replan_step(q) and r.at is not None and r.at > at
    assert r.seconds_per_step(r.at, 1005.0 + (r.at - at) * 0.5) == pytest.approx(0.5)  # measured from the re-plan
    assert Replanner(make_plan(HP, parse_budget("3ep"), steps_per_epoch=10, total_steps=30), 0, 0.0).at is None


# ---------------------------------------------------------------------------------------------- checkpoints


def _model_and_opt(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    return m, opt


def test_checkpoints_resume_the_newest_with_its_plan_and_refuse_another_configuration(tmp_path):
    plan = make_plan(HP, parse_budget("20steps"), steps_per_epoch=10, total_steps=20)
    ck = Checkpoints(tmp_path, "hash-a", every_s=60.0, main=True)
    assert ck.resume() is None
    m, opt = _model_and_opt()
    ck.save(7, 12.5, plan, m, opt)
    (tmp_path / ".checkpoint.pt.123.tmp").write_bytes(b"half")  # a killed write
    r = ck.resume()
    assert r is not None and (r.step, r.elapsed, r.plan) == (7, 12.5, plan)
    assert math.isnan(r.finals.final_loss) and r.finals.images_per_second == 0.0  # not a complete checkpoint
    assert not list(tmp_path.glob(".*.tmp"))
    assert all(torch.equal(v, r.model[k]) for k, v in m.state_dict().items())
    ck.save(20, 30.0, plan, m, opt, finals=Finals(0.5, 100.0, 0.2))
    r = ck.resume()
    assert r is not None and r.step == 20 and r.finals == Finals(0.5, 100.0, 0.2)
    with pytest.raises(CheckpointError, match="different configuration"):
        Checkpoints(tmp_path, "hash-b", every_s=60.0, main=True).resume()


def test_the_checkpoint_cadence_is_rank_0s_and_only_rank_0_writes(tmp_path):
    ck = Checkpoints(tmp_path, "h", every_s=60.0, main=True)
    ck.count_from(100.0)
    assert not ck.due(159.9) and ck.due(160.0)
    other = Checkpoints(tmp_path / "other", "h", every_s=60.0, main=False)
    other.count_from(100.0)
    assert not other.due(1e9)
    m, opt = _model_and_opt()
    other.save(1, 1.0, make_plan(HP, parse_budget("2steps"), steps_per_epoch=1, total_steps=2), m, opt)
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------- pre-emption


def test_preemption_catches_the_signal_stops_at_a_boundary_with_its_checkpoint_and_restores_handlers(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    saved: list[int] = []
    with Preemption(tmp_path, world_size=1) as p:
        assert p.signum == 0 and not p.stops_here(3, 10)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.signum == signal.SIGUSR1
        assert p.stops_here(3, 10) and not p.stops_here(10, 10)  # the last step ends the run normally
        with pytest.raises(Preempted, match="SIGUSR1 at step 3"):
            p.stop(p.signum, 3, lambda: saved.append(3))
    assert saved == [3] and signal.getsignal(signal.SIGUSR1) == before
    with Preemption(tmp_path, world_size=2) as p:  # several processes stop together at a logging step instead
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.signum == signal.SIGTERM and not p.stops_here(3, 10)
    with Preemption(tmp_path, world_size=1) as p:
        assert p.signum == 0  # a new segment starts without the last one's signal


# ---------------------------------------------------------------------------------------------- metrics


def _out(loss: float, part: float) -> StepOutput:
    return StepOutput(torch.tensor(loss, dtype=torch.float64), {"part": torch.tensor(part)})


def test_the_train_log_writes_interval_means_and_finds_the_first_non_finite_step(tmp_path):
    plan = make_plan(HP, parse_budget("10steps"), steps_per_epoch=10, total_steps=10, warmup_steps=2)
    log = TrainLog(tmp_path, "m", CPU, plan, start=0, t0=50.0, progress=False, tensorboard=False)
    with log:
        for step, (loss, part) in enumerate([(1.0, 0.5), (2.0, 1.0), (3.0, 1.5)]):
            log.add(_out(loss, part), step)
        assert int(log.first_bad) == -1
        log.write(3, plan, now=51.0, elapsed=7.0)
        log.add(_out(4.0, 0.0), 3)
        log.add(_out(float("nan"), 0.0), 4)
        log.add(_out(float("inf"), 0.0), 5)
        assert int(log.first_bad) == 4
        with pytest.raises(NonFiniteLoss, match="step 4"):
            log.check_finite(tmp_path)
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (line["step"], line["loss"], line["part"], line["lr"], line["elapsed_s"]) == (3, 2.0, 1.0, lr_at(2, plan),
                                                                                         7.0)
    assert line["img_per_s"] == pytest.approx(3 * 64 / 1.0) and line["data_wait"] == 0.0 and log.last_loss == 2.0


def test_the_train_log_times_the_wait_for_each_batch(tmp_path):
    import time

    plan = make_plan(HP, parse_budget("10steps"), steps_per_epoch=10, total_steps=10)
    log = TrainLog(tmp_path, "m", CPU, plan, start=0, t0=time.perf_counter(), progress=False, tensorboard=False)

    def slow():
        time.sleep(0.05)
        yield "batch"

    with log:
        assert log.wait_for(slow()) == "batch"  # type: ignore[comparison-overlap]
    assert 0.05 <= log.wait_total == log.wait_log < 1.0


def test_one_process_agrees_with_itself():
    a = agree(torch.tensor(-1), True, 0, torch.device("cpu"))
    assert (a.bad_step, a.checkpoint, a.signum) == (-1, True, 0)
    b = agree(torch.tensor(7), False, int(signal.SIGTERM), torch.device("cpu"))
    assert (b.bad_step, b.checkpoint, b.signum) == (7, False, int(signal.SIGTERM))


# ---------------------------------------------------------------------------------------------- the loop


def test_fit_is_the_loop_and_its_calls():
    source = inspect.getsource(Trainer.fit)
    assert len(source.splitlines()) <= 80, len(source.splitlines())
    for part in ("self.checkpoints.resume()", "self._plan()", "Replanner(", "TrainLog(", "self.preemption"):
        assert part in source, part
