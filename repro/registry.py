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
