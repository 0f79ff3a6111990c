"""Explicit registries: one line per method and per evaluation. No import magic."""

from __future__ import annotations

from collections.abc import Callable

from baselines.conmim import ConMIM
from baselines.macrl import MACRL
from baselines.mae import MAE
from baselines.mimco import MimCo
from baselines.mocov3 import MoCoV3
from evals import dense, finetune, knn, linear
from repro.method import PretrainMethod
from repro.micl import MiCL

METHODS: dict[str, type[PretrainMethod]] = {
    "micl": MiCL,
    "mae": MAE,
    "mocov3": MoCoV3,
    "conmim": ConMIM,
    "mimco": MimCo,
    "macrl": MACRL,
}

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
evaluated again (``repro.run.eval_key``), and a table cell whose seeds disagree on them says so."""
