"""The method contract: what the trainer hands a method, what it gets back, and the base class.

A method is one file plus one line in :mod:`repro.registry`. It computes its loss and nothing else:
no ``backward()``, optimizer, AMP scaler or process groups (the trainer owns those). Schedules inside a
method (EMA momentum, ...) are functions of ``step.progress`` in [0, 1].
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from repro.backbone import BackboneOptions, MaskedViT
from repro.config import ConfigError
from repro.views import ViewSpec


class Batch(NamedTuple):
    """One step's input: the augmented views the method declared, each (B, 3, H, W), normalised."""

    views: tuple[Tensor, ...]
    labels: Tensor | None = None
    """Class labels; never used by pre-training losses (kept for monitors and supervised baselines)."""


class StepInfo(NamedTuple):
    step: int
    """0-based index of the optimizer step being computed."""
    total_steps: int
    """The run's step count (from the budget; the latest re-plan's for a wall-clock budget)."""
    replanned_progress: float | None = None
    """Set by the trainer once a wall-clock run has re-planned: the schedule's progress, continued smoothly."""

    @property
    def progress(self) -> float:
        if self.replanned_progress is not None:
            return self.replanned_progress
        return self.step / max(1, self.total_steps)


class StepOutput(NamedTuple):
    loss: Tensor
    """Scalar loss to back-propagate."""
    logs: dict[str, Tensor]
    """Named scalar parts of ``loss`` (their sum, or their stated combination, is ``loss``);
    keys starting with ``aux/`` are monitors that are not part of the loss."""


@dataclass(frozen=True)
class WeightDecayRule:
    """Which trainable parameters AdamW decays. Each official code has its own (METHODS.md, "Optimizer"), and the
    difference is not small: decaying LayerNorm gains or the cls token pulls them towards 0 every step."""

    skip_1d_and_bias: bool
    """Tensors with one dimension (norm gains and biases, BN affine) and names ending in ``.bias`` are not decayed
    (timm's ``add_weight_decay``, BEiT's ``get_parameter_groups``). False: every trainable tensor is decayed."""
    skip_names: tuple[str, ...] = ()
    """Further parameters (our names) not decayed: BEiT's ``no_weight_decay()`` list."""
    source: str = ""
    """The official code this rule reproduces."""

    def decays(self, name: str, param: Tensor) -> bool:
        if name in self.skip_names:
            return False
        return not (self.skip_1d_and_bias and (param.ndim == 1 or name.endswith(".bias")))


MAE_DECAY = WeightDecayRule(True, source="MAE and OCL main_pretrain.py: optim_factory.add_weight_decay(model, wd), "
                                         "no skip list (cls_token and mask_token are decayed)")
ALL_DECAY = WeightDecayRule(False, source="moco-v3 main_moco.py: torch.optim.AdamW(model.parameters(), "
                                          "weight_decay=args.weight_decay) (biases, norms, BN, cls_token decayed)")
BEIT_DECAY = WeightDecayRule(True, skip_names=("backbone.vit.pos_embed", "backbone.vit.cls_token"),
                             source="ConMIM optim_factory.get_parameter_groups with the model's no_weight_decay() = "
                                    "{pos_embed, cls_token} (mask_token is decayed)")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """The optimisation every method states from its paper. The six values without a default have none on purpose:
    a new method's config class must give each (as a field default), or building it fails, instead of silently
    inheriting another paper's batch, lr or schedule."""

    batch_size: int
    """Global pre-training batch."""
    base_lr: float
    """Base learning rate; the actual lr is base_lr * batch / 256 unless ``lr_is_absolute``."""
    lr_is_absolute: bool = False
    """True when the paper gives an absolute lr (no batch scaling)."""
    weight_decay: float
    """AdamW weight decay, on the parameters the method's :class:`WeightDecayRule` selects."""
    betas: tuple[float, float]
    """AdamW betas."""
    warmup_epochs: float
    """Linear-warmup epochs of the paper schedule (a budgeted run keeps the ratio warmup_epochs / epochs)."""
    epochs: float
    """Paper pre-training epochs (reference for the warmup ratio)."""
    min_lr: float = 0.0
    """Floor of the half-cycle cosine."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.base_lr <= 0 or self.epochs <= 0:
            raise ConfigError("batch_size, base_lr and epochs must be positive")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError("warmup_epochs must be in [0, epochs)")


@dataclass(frozen=True)
class Prerequisite:
    """A stage another method must train before this one (MimCo's MoCo v3 teacher). ``repro.run`` trains
    ``method`` on the ``fraction_field`` share of the budget, then this method with ``config_field`` pointing at its
    export, unless the user already gave one; benchmarks and tests give a random one of the same architecture."""

    method: str
    """The registered method trained first."""
    config_field: str
    """Field of this method's config naming the prerequisite's export directory (None = train it)."""
    fraction_field: str
    """Field of this method's config: the prerequisite's share of the run's budget."""

    def missing(self, method_cfg: MethodConfig) -> bool:
        return getattr(method_cfg, self.config_field) is None


class PretrainMethod(nn.Module, abc.ABC):
    """Base class of every pre-training method (see DESIGN.md, "The method contract").

    A subclass must define ``name``, ``config_cls`` and ``weight_decay_rule`` (checked when the class is defined:
    :meth:`__init_subclass__` raises ``TypeError``) and :meth:`forward`, :attr:`views`, :meth:`flops_per_image`
    (abstract: Python refuses to build an instance of a class that misses one).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]]
    """The method's config class, whose field defaults are its paper's values."""
    prerequisite: ClassVar[Prerequisite | None] = None
    """A stage that must be trained first (:class:`Prerequisite`); None for most methods."""
    weight_decay_rule: ClassVar[WeightDecayRule]
    """Which parameters AdamW decays, as the official code does (no default: each method states its own)."""
    sync_batchnorm: ClassVar[bool] = True
    """Whether BatchNorm statistics span every device under DDP (MoCo v3 converts to SyncBN; ConMIM does not)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        missing = []
        if not (isinstance(getattr(cls, "name", None), str) and cls.name):
            missing.append("name (a non-empty str: its key in repro.registry.METHODS)")
        config_cls = getattr(cls, "config_cls", None)
        if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
            missing.append("config_cls (a MethodConfig subclass)")
        if not isinstance(getattr(cls, "weight_decay_rule", None), WeightDecayRule):
            missing.append("weight_decay_rule (a WeightDecayRule: what the official code decays)")
        if missing:
            raise TypeError(f"method class {cls.__qualname__} must define {'; '.join(missing)} (repro.method)")

    def __init__(self, cfg: MethodConfig, backbone: MaskedViT) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone

    @classmethod
    def paper_config(cls) -> MethodConfig:
        """The method's configuration as its paper states it: its config class's field defaults."""
        return cls.config_cls()  # type: ignore[call-arg]  # a subclass gives every field a default

    @classmethod
    def backbone_options(cls, cfg: MethodConfig) -> BackboneOptions:
        """What this method needs from the shared backbone (position embedding, init, [MASK] token)."""
        return BackboneOptions()

    @property
    @abc.abstractmethod
    def views(self) -> ViewSpec:
        """The augmentation pipeline the data loader must produce for this method."""

    @abc.abstractmethod
    def forward(self, batch: Batch, step: StepInfo, *args: Any, **controlled: Any) -> StepOutput:
        """The loss of one step. ``controlled`` are the keyword arguments of :meth:`controlled_inputs` (each method
        names its own, keyword-only: ``noise``, ``mask``, ...); without them the method draws its randomness
        itself. (``*args: Any, **controlled: Any`` is how mypy lets an override add its own keywords while it still
        checks ``batch``, ``step`` and the return type; no caller passes more positional arguments.)"""

    def controlled_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Draw this method's internal randomness (mask noise, boolean masks) as ``forward`` keyword arguments.

        Passing the same dict to ``forward`` twice gives the same loss: how comparison tests fix masks.
        Methods whose only randomness is the augmentation (MoCo v3: views are given tensors) return {}.
        """
        return {}

    def after_optimizer_step(self, step: StepInfo) -> None:
        """EMA / momentum updates; called once after every optimizer step. Default: nothing."""

    def extra_exports(self) -> dict[str, dict[str, Tensor]]:
        """Method parts exported beside the backbone as ``<name>.safetensors`` (MoCo v3's projector, which
        MimCo's teacher needs). Default: none."""
        return {}

    def eval_backbone(self) -> MaskedViT:
        """The encoder that is exported and evaluated (online by default; momentum for some methods)."""
        return self.backbone

    @abc.abstractmethod
    def flops_per_image(self) -> float:
        """Analytic training FLOPs per image (forward + backward) for FLOP budgets and MFU."""
