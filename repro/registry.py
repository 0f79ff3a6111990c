"""The method registry: one line per method. No import magic. (Evaluations: ``evals.registry``.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from baselines.conmim import ConMIM
from baselines.macrl import MACRL
from baselines.mae import MAE
from baselines.mimco import MimCo
from baselines.mocov3 import MoCoV3
from repro.backbone import MaskedViT
from repro.config import RunConfig, apply_overrides
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


def build_method(cfg: RunConfig) -> PretrainMethod:
    """The one way to build a method from its run config: its class, on the shared backbone with the options it
    asks for (initialised from the global RNG)."""
    cls = METHODS[cfg.method]
    return cls(cfg.method_cfg, MaskedViT(cfg.model, cls.backbone_options(cfg.method_cfg)))



def with_prerequisite(cfg: RunConfig, make_export: Callable[[str], Path]) -> RunConfig:
    """``cfg`` with the export its method's :class:`~repro.method.Prerequisite` needs (MimCo's MoCo v3 teacher):
    the one the config names, else ``make_export(<prerequisite method>)``'s. Unchanged for a method without one.
    For building a method outside ``repro.run`` (the benchmark, the tests); ``repro.pretrain`` trains the stage."""
    pre = METHODS[cfg.method].prerequisite
    if pre is None or not pre.missing(cfg.method_cfg):
        return cfg
    return apply_overrides(cfg, {f"method.{pre.config_field}": str(make_export(pre.method))})
