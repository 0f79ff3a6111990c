"""Budgets: parse ``3m`` / ``133h`` / ``300ep`` / ``5000steps`` / ``2e18flop`` and turn them into a step count.

A budget string is parsed once, where it enters the program (:func:`parse_budget`, called by the config when
``--budget`` or ``--set budget.spec=`` is applied), into a :class:`Budget`; every later stage receives that value.

A wall-clock budget means *pre-training time on the hardware the run is given*. The trainer times a
few warm steps (``Trainer._calibrate`` in :mod:`repro.trainer`, giving a :class:`Calibration`), converts
the budget into a fixed ``total_steps`` (:func:`steps_for_budget`) that every rank uses, builds the LR
schedule over exactly those steps and trains to that count; a resumed run keeps the count. Epoch, step and
FLOP budgets are hardware-independent and need no timing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

BudgetKind = Literal["time", "epochs", "steps", "flop"]

_TIME_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]+)\s*$")


class BudgetError(ValueError):
    """A budget string that cannot be used; the message names it."""


@dataclass(frozen=True)
class Budget:
    """A parsed budget: what it is (kind), how much (amount) and how the user wrote it (text)."""

    kind: BudgetKind
    amount: float
    """Seconds for 'time', epochs, steps, or FLOPs."""
    text: str
    """The string the user gave, kept for records and run names (and the config hash)."""

    @property
    def seconds(self) -> float | None:
        return self.amount if self.kind == "time" else None

    def __str__(self) -> str:
        return self.text


def parse_budget(spec: str) -> Budget:
    """Parse a budget string; a bare number, a zero or negative amount, or an unknown unit is an error."""
    text = str(spec).strip()
    if text.startswith("-"):
        raise BudgetError(f"--budget {spec!r}: must be positive")
    m = _PATTERN.match(text)
    if not m:
        raise BudgetError(f"--budget {spec!r}: expected a number with a unit, e.g. 90s, 3m, 2h, 2d, 300ep, "
                          "5000steps, 2e18flop")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"--budget {spec!r}: must be positive")
    if unit in _TIME_UNITS:
        return Budget("time", value * _TIME_UNITS[unit], text)
    if unit in ("ep", "epoch", "epochs"):
        return Budget("epochs", value, text)
    if unit in ("step", "steps"):
        if value != int(value):
            raise BudgetError(f"--budget {spec!r}: steps must be a whole number")
        return Budget("steps", value, text)
    if unit in ("flop", "flops"):
        return Budget("flop", value, text)
    raise BudgetError(f"--budget {spec!r}: unknown unit {unit!r}; use s, m, h, d, ep, steps or flop")


def steps_for_budget(
    budget: Budget,
    *,
    steps_per_epoch: int,
    global_batch: int,
    seconds_per_step: float | None = None,
    flops_per_image: float | None = None,
) -> int:
    """The fixed number of optimizer steps a budget buys (at least 1)."""
    if budget.kind == "steps":
        n = budget.amount
    elif budget.kind == "epochs":
        n = budget.amount * steps_per_epoch
    elif budget.kind == "time":
        if seconds_per_step is None or seconds_per_step <= 0:
            raise BudgetError("a wall-clock budget needs a calibrated seconds_per_step")
        n = budget.amount / seconds_per_step
    else:
        if not flops_per_image:
            raise BudgetError("a FLOP budget needs the method's analytic FLOPs per image (repro.flops)")
        n = budget.amount / (flops_per_image * global_batch)
    return max(1, int(n))


@dataclass(frozen=True)
class Calibration:
    seconds_per_step: float
    timed_steps: int
    warmup_steps: int
    wall_seconds: float
    """Wall-clock spent calibrating (warm-up included); not part of the training budget."""


def format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


def split_budget(budget: Budget, fraction: float) -> tuple[Budget, Budget]:
    """Split a budget into two stages (MimCo: teacher, then student): ``fraction`` to the first stage.

    Two budgets of the same kind, written as a user would write them (``120s``, ``150ep``, ``1e+18flop``; amounts to
    6 significant digits, each exactly what its text says); step budgets are rounded, each stage keeping at least 1
    step.
    """
    if not 0.0 < fraction < 1.0:
        raise BudgetError(f"stage split {fraction}: must be in (0, 1)")
    if budget.kind == "steps":
        total = int(budget.amount)
        if total < 2:
            raise BudgetError(f"--budget {budget.text!r}: two stages need at least 2 steps")
        first = min(total - 1, max(1, round(budget.amount * fraction)))
        return Budget("steps", float(first), f"{first}steps"), Budget("steps", float(total - first),
                                                                      f"{total - first}steps")
    unit = {"time": "s", "epochs": "ep", "flop": "flop"}[budget.kind]
    parts = (f"{budget.amount * fraction:.6g}", f"{budget.amount * (1 - fraction):.6g}")
    return Budget(budget.kind, float(parts[0]), parts[0] + unit), Budget(budget.kind, float(parts[1]), parts[1] + unit)
