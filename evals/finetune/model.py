"""The fine-tuning model: the export's timm ViT with an avg-pool head, loaded through a checked key mapping, its
layer-decay AdamW and its Mixup/CutMix."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import timm
import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

from evals.finetune.recipes import FinetuneRecipe
from repro.checkpoint import CheckpointError
from repro.errors import NonFiniteLoss
from repro.export import ExportMeta

DROPPED_EXPORT_KEYS = ("norm.weight", "norm.bias")
"""Export tensors fine-tuning deliberately discards: the final LayerNorm (the avg-pool head has its own fc_norm)."""
FRESH_PREFIXES = ("fc_norm.", "head.")
"""Model tensors fine-tuning deliberately initialises fresh."""


class FinetuneKeyError(CheckpointError):
    """An export whose tensors do not map one-to-one onto the fine-tuning model."""


class FinetuneNonFinite(NonFiniteLoss):
    """The fine-tuning loss became NaN or inf (caught wherever the trainer's NonFiniteLoss is)."""

    def __init__(self, step: int, export_dir: Path) -> None:
        RuntimeError.__init__(self, f"{export_dir}: fine-tuning loss is not finite at step {step}; no record written")
        self.step = step
        self.run_dir = export_dir


class KeyMapping(NamedTuple):
    loaded: tuple[str, ...]
    """Export keys copied into the model (same name, same shape)."""
    dropped: tuple[str, ...]
    """Export keys discarded on purpose (a subset of DROPPED_EXPORT_KEYS)."""
    fresh: tuple[str, ...]
    """Model keys left at their new init (exactly the fc_norm.* and head.* tensors)."""


def map_export_keys(model: nn.Module, state: dict[str, Tensor], where: str) -> KeyMapping:
    """Check that ``state`` covers ``model`` except fc_norm/head and holds nothing else but the final norm."""
    model_sd = model.state_dict()
    fresh = tuple(sorted(k for k in model_sd if k.startswith(FRESH_PREFIXES)))
    wanted = set(model_sd) - set(fresh)
    dropped = tuple(sorted(k for k in state if k in DROPPED_EXPORT_KEYS))
    unexpected = sorted(k for k in state if k not in wanted and k not in DROPPED_EXPORT_KEYS)
    missing = sorted(wanted - set(state))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} export tensors with no place in the fine-tuning model "
                        f"({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
    if missing:
        problems.append(f"{len(missing)} model tensors the export lacks ({', '.join(missing[:4])}"
                        f"{', ...' if len(missing) > 4 else ''}; only {', '.join(p + '*' for p in FRESH_PREFIXES)} "
                        "may start fresh)")
    if problems:
        raise FinetuneKeyError(f"{where}: weights do not map onto the fine-tuning model: {'; '.join(problems)}")
    for k in sorted(wanted):
        if tuple(state[k].shape) != tuple(model_sd[k].shape):
            raise FinetuneKeyError(f"{where}: shape mismatch for {k}: file {tuple(state[k].shape)} vs model "
                                   f"{tuple(model_sd[k].shape)}")
    if not any(k.startswith("head.") for k in fresh):
        raise FinetuneKeyError(f"{where}: the fine-tuning model has no head.* tensors (num_classes=0?)")
    return KeyMapping(tuple(sorted(wanted)), dropped, fresh)


def build_finetune_model(meta: ExportMeta, state: dict[str, Tensor], num_classes: int, drop_path: float,
                         where: str) -> tuple[nn.Module, KeyMapping]:
    """The export's timm model with an avg-pool + fc_norm + new head, loaded through :func:`map_export_keys`."""
    kwargs = {**meta.timm_kwargs, "num_classes": num_classes, "global_pool": "avg", "drop_path_rate": drop_path}
    try:
        model = timm.create_model(meta.timm_model, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - unknown name, kwargs the architecture does not take, ...
        raise CheckpointError(f"{where}: cannot build timm model {meta.timm_model!r} with {kwargs} ({e})") from None
    mapping = map_export_keys(model, state, where)
    result = model.load_state_dict({k: state[k] for k in mapping.loaded}, strict=False)
    # the same assertion MAE's main_finetune.py makes after its strict=False load
    if sorted(result.missing_keys) != list(mapping.fresh) or result.unexpected_keys:
        raise FinetuneKeyError(f"{where}: load left {result.missing_keys} missing and {result.unexpected_keys} "
                               f"unexpected; expected exactly {list(mapping.fresh)} missing")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise CheckpointError(f"{where}: {meta.timm_model} has no linear `head` to fine-tune")
    trunc_normal_(head.weight, std=2e-5)  # MAE main_finetune.py: manually initialize fc layer
    nn.init.zeros_(head.bias)
    return model, mapping


def make_optimizer(model: nn.Module, recipe: FinetuneRecipe, lr: float) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups; each group carries ``lr_scale``, applied by the timm scheduler.

    Fused on CUDA, foreach on CPU (torch's CPU default, one kernel per tensor, is several times slower), as the
    trainer does."""
    cuda = next(model.parameters()).device.type == "cuda"
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=recipe.weight_decay,
                               layer_decay=recipe.layer_decay, betas=recipe.betas, foreach=None if cuda else True,
                               fused=cuda)


def make_mixup(recipe: FinetuneRecipe, num_classes: int) -> Mixup | None:
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=recipe.label_smoothing, num_classes=num_classes)
