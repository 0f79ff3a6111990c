"""The evaluation registry: one line per protocol (its ``run``) and the ``eval.*`` settings its numbers depend on.
No import magic. ``repro.run`` and ``repro.evaluate`` are the only ``repro`` modules that read it: the core never
imports ``evals``."""

from __future__ import annotations

from collections.abc import Callable

from evals import dense, finetune, knn, linear

EVALS: dict[str, Callable] = {
    "knn": knn.run,
    "linear": linear.run,
    "finetune": finetune.run,
    "ade20k": dense.ade20k,
    "coco": dense.coco,
}

EVAL_SETTINGS: dict[str, tuple[str, ...]] = {
    "knn": knn.SETTINGS,
    "linear": linear.SETTINGS,
    "finetune": finetune.SETTINGS,
    "ade20k": dense.ADE20K_SETTINGS,
    "coco": dense.COCO_SETTINGS,
}
"""Per evaluation, the ``eval.*`` settings its numbers depend on: an export evaluated again with other values is
evaluated again (``repro.evaluate.eval_key``), and a table cell whose seeds disagree on them says so."""
