"""The method registry: one line per method. No import magic. (Evaluations: ``evals.registry``.)"""

from __future__ import annotations

from baselines.conmim import ConMIM
from baselines.macrl import MACRL
from baselines.mae import MAE
from baselines.mimco import MimCo
from baselines.mocov3 import MoCoV3
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
