"""The plan a budget buys: the run's hyper-parameters, the step count and schedule fixed before the first step, and the
re-plans of a wall-clock run.

A budget becomes a :class:`Plan` once (:func:`make_plan` is the one place a plan is built): the steps a budget buys
(:func:`steps_bought`; a wall-clock budget divided by the seconds per step the trainer measured), the warmup as a
share of them, and the lr schedule over exactly those steps (:func:`lr_at`). The plan is stored in every checkpoint
and in ``plan.json``, so a resumed run changes nothing. A wall-clock run re-fits its remaining steps at
:data:`REPLAN_AT` of the run from the speed it measures (:class:`Replanner`); the lr and the schedule progress continue
across each re-plan and still end at the last step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from repro.budget import Budget, BudgetError, Calibration, format_seconds, steps_for_budget
from repro.schedules import cosine_after_warmup

if TYPE_CHECKING:
    from repro.config import RunConfig
    from repro.method import MethodConfig

REPLAN_AT = (0.1, 0.25, 0.5, 0.75, 0.9)
"""Fractions of the planned steps at which a wall-clock run re-plans its remaining steps from its measured speed."""
MAX_STEPS = 10**9
"""A budget that buys more optimizer steps than this is refused as a unit mistake (1e30flop, 1e9h)."""


@dataclass(frozen=True)
class HParams:
    """The optimisation values of a run: the method's paper values (its ``MethodConfig``) under the run's ``train.*``
    overrides."""

    global_batch: int
    lr: float
    """Peak learning rate: the base lr scaled by global_batch / 256, unless the method's lr is absolute."""
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_fraction: float
    """Share of the planned steps spent in linear warmup (paper: warmup_epochs / epochs)."""


def resolve_hparams(cfg: RunConfig) -> HParams:
    """Merge the method's paper optimisation values with the run's overrides."""
    m: MethodConfig = cfg.method_cfg
    t = cfg.train
    batch = t.batch_size or m.batch_size
    base_lr = t.base_lr if t.base_lr is not None else m.base_lr
    return HParams(
        global_batch=batch,
        lr=base_lr if m.lr_is_absolute else base_lr * batch / 256,
        min_lr=t.min_lr if t.min_lr is not None else m.min_lr,
        weight_decay=t.weight_decay if t.weight_decay is not None else m.weight_decay,
        betas=(m.betas[0], m.betas[1]),
        warmup_fraction=t.warmup_fraction if t.warmup_fraction is not None else m.warmup_epochs / m.epochs,
    )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything fixed before the first step; stored in the checkpoint so a resume changes nothing. Built by
    :func:`make_plan` (read back by :func:`plan_from_dict`)."""

    total_steps: int
    global_batch: int
    steps_per_epoch: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    budget: str
    budget_kind: str
    budget_seconds: float | None
    seconds_per_step: float | None
    calibration_steps: int
    calibration_seconds: float
    flops_per_image: float | None
    revisions: tuple[tuple[int, int], ...] = ()
    """Wall-clock budgets only: (step, new total_steps) each time the remaining steps were re-planned from the
    measured speed (:data:`REPLAN_AT`). ``total_steps`` is the latest total; the first plan's is
    :attr:`planned_steps`. A resumed run replays these, so its schedule is the one the run had."""
    planned_steps: int = 0
    """The total of the first plan (before any revision); 0 in plans written before revisions existed."""

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    @property
    def first_total(self) -> int:
        return self.planned_steps or self.total_steps


def make_plan(hp: HParams, budget: Budget, *, steps_per_epoch: int, total_steps: int, warmup_steps: int | None = None,
              flops_per_image: float | None = None, calibration: Calibration | None = None) -> Plan:
    """The plan of ``total_steps`` steps: ``hp``'s values, warmup ``hp.warmup_fraction`` of the steps (unless given:
    the calibration plan and the bench have none), and what the budget and its calibration were."""
    warmup = int(round(hp.warmup_fraction * total_steps)) if warmup_steps is None else warmup_steps
    return Plan(total_steps=total_steps, global_batch=hp.global_batch, steps_per_epoch=steps_per_epoch, lr=hp.lr,
                min_lr=hp.min_lr, warmup_steps=warmup, weight_decay=hp.weight_decay, betas=hp.betas,
                budget=budget.text, budget_kind=budget.kind, budget_seconds=budget.seconds,
                seconds_per_step=calibration.seconds_per_step if calibration else None,
                calibration_steps=calibration.timed_steps if calibration else 0,
                calibration_seconds=calibration.wall_seconds if calibration else 0.0,
                flops_per_image=flops_per_image, planned_steps=total_steps)


def steps_bought(budget: Budget, hp: HParams, *, steps_per_epoch: int, flops_per_image: float | None,
                 calibration: Calibration | None, method: str) -> int:
    """The fixed number of steps ``budget`` buys ``method`` (``repro.budget.steps_for_budget``); a FLOP budget of a
    method without a FLOP count and a budget of more than :data:`MAX_STEPS` steps (a unit mistake) are refused."""
    if budget.kind == "flop" and flops_per_image is None:
        raise BudgetError(f"--budget {budget.text}: method {method} has no FLOP count")
    total = steps_for_budget(budget, steps_per_epoch=steps_per_epoch, global_batch=hp.global_batch,
                             seconds_per_step=calibration.seconds_per_step if calibration else None,
                             flops_per_image=flops_per_image)
    if total > MAX_STEPS:
        raise BudgetError(f"--budget {budget.text}: buys {total:.3g} steps ({total / steps_per_epoch:.3g} epochs) of "
                          f"{method}; is the unit right? (more than {MAX_STEPS:.0e} steps is refused)")
    return total


def plan_from_dict(d: dict[str, Any]) -> Plan:
    """A :class:`Plan` read back from a checkpoint or ``plan.json`` (JSON turns tuples into lists)."""
    d = {**d, "betas": tuple(d["betas"]), "revisions": tuple(tuple(r) for r in d.get("revisions", ()))}
    return Plan(**d)


# ---------------------------------------------------------------------------------------------- re-plans


def next_replan_step(plan: Plan) -> int | None:
    """The step at which the next re-plan happens (None: all done, or not a wall-clock budget)."""
    k = len(plan.revisions)
    if plan.budget_kind != "time" or k >= len(REPLAN_AT):
        return None
    last = plan.revisions[-1][0] if plan.revisions else 0
    at = max(last + 1, round(REPLAN_AT[k] * plan.total_steps))
    return at if at < plan.total_steps else None


def revise(plan: Plan, step: int, elapsed: float, seconds_per_step: float) -> Plan:
    """The plan with its remaining steps re-fitted to the budget at the measured ``seconds_per_step``."""
    assert plan.budget_seconds is not None
    remaining = max(0.0, plan.budget_seconds - elapsed)
    total = max(step + 1, plan.warmup_steps + 1, step + int(round(remaining / max(seconds_per_step, 1e-9))))
    return replace(plan, total_steps=int(total), revisions=(*plan.revisions, (step, int(total))),
                   planned_steps=plan.first_total)


class Replanner:
    """A wall-clock run's re-plans while it trains: the step of the next one, and the speed measured since the last
    (or since the segment started), which :func:`revise` fits the remaining budget to."""

    def __init__(self, plan: Plan, step: int, now: float) -> None:
        self.at = next_replan_step(plan)
        self.since_step, self.since = step, now

    def due(self, step: int) -> bool:
        return step == self.at

    def seconds_per_step(self, step: int, now: float) -> float:
        return (now - self.since) / max(1, step - self.since_step)

    def revise(self, plan: Plan, step: int, now: float, elapsed: float, seconds_per_step: float) -> Plan:
        """``plan`` re-fitted at ``step`` (``elapsed`` seconds of the budget used, ``seconds_per_step`` measured, the
        same on every rank); the next re-plan counts from here."""
        plan = revise(plan, step, elapsed, seconds_per_step)
        self.at, self.since_step, self.since = next_replan_step(plan), step, now
        return plan


# ---------------------------------------------------------------------------------------------- the schedule


def _continued(step: int, start: int, plan: Plan) -> float:
    """Progress in [0, 1] from ``start`` to the last step, continued across re-plans (each keeps the progress it
    found and spreads the rest over its new remaining steps)."""
    t, total = 0.0, plan.first_total
    for at, new_total in plan.revisions:
        if step < at:
            break
        t = t + (1.0 - t) * min(1.0, max(0, at - start) / max(1, total - start))
        start, total = max(at, start), new_total
    return min(1.0, t + (1.0 - t) * ((step - start) / max(1, total - start)))


def progress_at(step: int, plan: Plan) -> float:
    """The run's progress at ``step`` (``step / total_steps`` until a re-plan; continuous across re-plans)."""
    return _continued(step, 0, plan)


def lr_at(step: int, plan: Plan) -> float:
    """Per-iteration linear warmup from 0, then half-cycle cosine to ``min_lr`` (MAE's ``adjust_learning_rate``).

    After a re-plan at step ``s`` the cosine continues from the progress it had reached at ``s`` and spreads the
    rest over the new remaining steps: the lr is continuous and ends at ``min_lr`` on the last step.
    """
    t = _continued(step, plan.warmup_steps, plan) if step >= plan.warmup_steps else 0.0
    return cosine_after_warmup(step, plan.warmup_steps, plan.lr, t, plan.min_lr)


def describe_plan(name: str, plan: Plan) -> str:
    """The one line a run prints before its first step: what the budget bought and what it will take."""
    line = (f"{name}: plan {plan.total_steps} steps ({plan.epochs:.3g} epochs) of batch {plan.global_batch}, "
            f"lr {plan.lr:.3g}, warmup {plan.warmup_steps} steps, budget {plan.budget}")
    if plan.flops_per_image:
        line += f" ({plan.flops_per_image * plan.global_batch * plan.total_steps:.3g} FLOPs)"
    if plan.seconds_per_step:
        eta = format_seconds(plan.seconds_per_step * plan.total_steps)
        points = ", ".join(f"{f:.0%}" for f in REPLAN_AT)
        line += f"; calibrated {plan.seconds_per_step:.3f}s/step -> ~{eta}, re-planned at {points} of the run"
    return line
