"""The evaluation registry: one line per protocol, its ``run(ctx, export_dir, settings)`` and its settings
dataclass (whose fields are its ``eval.*`` keys; see :mod:`evals.settings`). No import magic. ``repro.run`` and
``repro.evaluate`` are the only ``repro`` modules that read it: the core never imports ``evals``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evals import finetune, knn, linear, settings
from evals.dense import TASKS, runner
from repro.config import EvalValues


@dataclass(frozen=True)
class Eval:
    run: Callable[..., list]
    """``run(ctx: EvalContext, export_dir: Path, settings) -> list[ResultRecord]``."""
    settings: type
    """Its frozen settings dataclass."""


EVALS: dict[str, Eval] = {
    "knn": Eval(knn.run, knn.Settings),
    "linear": Eval(linear.run, linear.Settings),
    "finetune": Eval(finetune.run, finetune.Settings),
    **{name: Eval(runner(name), task.settings) for name, task in TASKS.items()},  # ade20k, coco
}


def eval_settings(values: EvalValues) -> dict[str, Any]:
    """Every registered evaluation's settings object from a run's ``eval.*`` values (:class:`ConfigError` on an
    unknown key or a bad value)."""
    return settings.build({name: e.settings for name, e in EVALS.items()}, values.as_dict())


def normalized(values: EvalValues) -> EvalValues:
    """The run's ``eval.*`` values checked, typed and complete (every key at its resolved value)."""
    return EvalValues(tuple(sorted(settings.flat(eval_settings(values)).items())))
