"""Explicit registries: one line per method and per evaluation. No import magic."""

from __future__ import annotations

from collections.abc import Callable

from baselines.mae import MAE
from evals import knn, linear
from repro.method import PretrainMethod
from repro.micl import MiCL

METHODS: dict[str, type[PretrainMethod]] = {
    "micl": MiCL,
    "mae": MAE,
}

EVALS: dict[str, Callable] = {
    "knn": knn.run,
    "linear": linear.run,
}
