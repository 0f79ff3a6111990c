"""Wall-clock budgets re-plan their remaining steps from the measured speed (issue 16, item 7).

What is checked here is the bookkeeping that must hold on any machine: the lr and the schedule progress stay
continuous across re-plans and still end at the end, a plan with no revisions computes exactly what the old
schedule did, revisions survive JSON and a resume, and absurd budgets are refused before the run starts. How close
runs land to their budget is measured, not asserted (README, "Budgets").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from repro.budget import Budget, Calibration
from repro.plan import (
    REPLAN_AT,
    HParams,
    Plan,
    describe_plan,
    lr_at,
    make_plan,
    next_replan_step,
    plan_from_dict,
    progress_at,
    revise,
)
from tests.unit.test_trainer import _trainer


def time_plan(total=200, warmup=20, lr=1.0, min_lr=0.0, budget_s=100.0) -> Plan:
    hp = HParams(global_batch=8, lr=lr, min_lr=min_lr, weight_decay=0.05, betas=(0.9, 0.95), warmup_fraction=0.1)
    return make_plan(hp, Budget("time", budget_s, f"{budget_s:g}s"), steps_per_epoch=10, total_steps=total,
                     warmup_steps=warmup, calibration=Calibration(0.5, 5, 2, 3.0))


def old_lr(step: int, p: Plan) -> float:
    """The schedule before re-plans existed (MAE's adjust_learning_rate), written out again."""
    if step < p.warmup_steps:
        return p.lr * step / p.warmup_steps
    t = min(1.0, (step - p.warmup_steps) / max(1, p.total_steps - p.warmup_steps))
    return p.min_lr + (p.lr - p.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def test_without_revisions_the_schedule_is_exactly_the_old_one():
    p = time_plan()
    assert all(lr_at(s, p) == old_lr(s, p) for s in range(0, 205))
    legacy = replace(p, planned_steps=0)  # plans written before revisions existed
    assert all(lr_at(s, legacy) == old_lr(s, legacy) for s in range(0, 205))


@pytest.mark.parametrize("new_totals", [(260, 300, 280), (150, 120, 125), (400, 130, 135)])
def test_lr_and_progress_are_continuous_across_revisions_and_end_at_the_end(new_totals):
    p = time_plan()
    at = [next_replan_step(p)]
    for i, total in enumerate(new_totals):
        step = at[-1]
        p = replace(p, total_steps=total, revisions=(*p.revisions, (step, total)))
        nxt = next_replan_step(p)
        if i + 1 < len(new_totals):
            assert nxt is not None and nxt > step
            at.append(nxt)
    lrs = [lr_at(s, p) for s in range(p.total_steps + 1)]
    prog = [progress_at(s, p) for s in range(p.total_steps + 1)]
    # no jump at a revision bigger than the largest ordinary step-to-step change in the whole run
    steps = [abs(a - b) for a, b in zip(lrs[p.warmup_steps:], lrs[p.warmup_steps + 1:], strict=False)]
    assert max(steps) < 0.05
    assert all(a >= b - 1e-12 for a, b in zip(lrs[p.warmup_steps:], lrs[p.warmup_steps + 1:], strict=False))
    assert all(b >= a for a, b in zip(prog, prog[1:], strict=False))
    assert lrs[p.total_steps] == pytest.approx(p.min_lr, abs=1e-12) and prog[p.total_steps] == pytest.approx(1.0)
    assert lrs[p.total_steps - 1] > p.min_lr  # the last step still learns


def test_revise_fits_the_remaining_budget_and_records_the_revision():
    p = time_plan(total=200, budget_s=100.0)
    q = revise(p, 20, elapsed=10.0, seconds_per_step=0.25)  # 90 s left at 0.25 s/step = 360 more steps
    assert q.total_steps == 380 and q.revisions == ((20, 380),) and q.planned_steps == 200
    r = revise(q, 95, elapsed=200.0, seconds_per_step=1.0)  # over budget already: stop at the next step
    assert r.total_steps == 96 and r.revisions[-1] == (95, 96) and r.planned_steps == 200


def test_replan_points_follow_the_fractions_and_stop_for_other_budgets():
    p = time_plan(total=1000)
    assert next_replan_step(p) == round(REPLAN_AT[0] * 1000)
    assert next_replan_step(replace(p, budget_kind="flop")) is None
    done = replace(p, revisions=tuple((i + 1, 1000) for i in range(len(REPLAN_AT))))
    assert next_replan_step(done) is None


def test_revisions_round_trip_through_json():
    p = revise(time_plan(), 20, 10.0, 0.3)
    assert plan_from_dict(json.loads(json.dumps(asdict(p)))) == p


def test_plan_line_states_steps_epochs_and_the_estimate():
    line = describe_plan("micl", time_plan())
    assert "200 steps" in line and "20 epochs" in line and "~100s" in line and "re-planned" in line


def test_a_wall_clock_run_records_its_revisions_and_a_resume_replays_them(tmp_path):
    t, _ = _trainer(tmp_path, "micl", budget="8s")
    real = t.source.batch
    killed_at: list[int] = []

    def dying(step):
        # die after the second re-plan has been written to a checkpoint
        if not (tmp_path / "plan.json").exists():  # calibration
            return real(step)
        p = json.loads((tmp_path / "plan.json").read_text())
        if len(p["revisions"]) >= 2 and (tmp_path / "checkpoint.pt").exists() and step % 3 == 1:
            killed_at.append(step)
            raise KeyboardInterrupt("simulated kill")
        return real(step)

    t.source.batch = dying
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    saved = plan_from_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["plan"])
    assert len(saved.revisions) >= 1 and saved.budget_kind == "time"
    resumed, _ = _trainer(tmp_path, "micl", budget="8s")
    result = resumed.fit()
    final = plan_from_dict(json.loads((tmp_path / "plan.json").read_text()))
    assert result.resumed and result.steps == final.total_steps
    assert final.revisions[:len(saved.revisions)] == saved.revisions  # what the run had is replayed, not redone
    assert final.planned_steps == saved.planned_steps
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == final.total_steps == (final.revisions[-1][1] if final.revisions else final.total_steps)


def test_an_absurd_budget_is_refused_before_training(tmp_path, capsys):
    from repro.run import main

    capsys.readouterr()
    rc = main(["micl", "--budget", "1e30flop", "--evals", "none", "--out", str(tmp_path / "runs"), "--results",
               str(tmp_path / "res"), "--no-progress", "--set", "data.builtin_train=256", "--set",
               "data.builtin_test=64"])
    stderr = capsys.readouterr().err
    assert rc == 2
    err = [ln for ln in stderr.splitlines() if ln.startswith("repro: error")]
    assert len(err) == 1 and "1e30flop" in err[0] and "steps" in err[0], stderr
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))
