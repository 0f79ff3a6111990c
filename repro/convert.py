"""``python -m repro.convert``: a released pre-training checkpoint -> our export, evaluated like ours.

    python -m repro.convert mae mae_pretrain_vit_base.pth --out exports/mae-vit-b
    python -m repro.convert mocov3 vit-s-300ep.pth.tar --out exports/mocov3-vit-s
    python -m evals.linear --export exports/mae-vit-b --data /data/imagenet      # the suite's protocol

Layouts read (``torch.load(weights_only=True)``; of the non-tensor objects these files hold only
``argparse.Namespace``, MAE's saved training arguments, is allowed):

- **mae** — facebookresearch/mae ``{"model": state_dict, ...}``: the timm encoder at top level (``cls_token``,
  ``pos_embed``, ``patch_embed.*``, ``blocks.N.*``, ``norm.*``), with or without the decoder (``mask_token``,
  ``decoder_*``, as in the ``mae_visualize_*`` files), which is dropped.
- **micl** — the OCL release: MAE's layout, encoder only.
- **mocov3** — facebookresearch/moco-v3 ``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*",
  "module.predictor.*"}, "optimizer": ..., ...}``: the base encoder is kept; its head (the projector), the
  momentum encoder and the predictor are dropped. MoCo v3's ViT-S has 12 heads, not timm's 6.
- **conmim** — refused: ConMIM's BEiT encoder has relative position bias and layer-scale, which the timm
  VisionTransformer our exports load into cannot represent.

Every key is accounted for: encoder keys are kept, the parts above are dropped by name, anything else is an
error. The architecture is read from the tensor shapes (width -> the timm ViT of that width; depth, patch size
and image size from the blocks, the patch projection and the position table) and the export is checked by
loading it strictly into that timm model before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

from repro.checkpoint import (
    CheckpointError,
    ExportMeta,
    check_output_dir,
    export_backbone,
    load_strict,
)
from repro.records import git_revision

log = logging.getLogger("repro.convert")

FORMATS = ("mae", "micl", "mocov3", "conmim")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAFE_GLOBALS = (argparse.Namespace,)
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
TIMM_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                 1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}
HEADS = {("mocov3", 384): 12}
"""Head counts that differ from timm's for the same width: MoCo v3's ViT-S (vits.py ``vit_small``: 12 heads)."""


def read_checkpoint(path: Path) -> dict:
    """The checkpoint as a dict, loaded with ``weights_only=True`` and only :data:`SAFE_GLOBALS` allowed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same one-line refusal
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not loadable with weights_only=True ({first})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    return ckpt


def official_state_dict(ckpt: dict, fmt: str, path: Path) -> dict[str, Tensor]:
    """The model's tensors under their official names (``module.`` of DDP removed)."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    else:
        sd = ckpt
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors or len(tensors) != len(sd):
        odd = next((k for k, v in sd.items() if not isinstance(v, Tensor)), None)
        raise CheckpointError(f"{path}: no {fmt} state dict found ('model' or 'state_dict' of tensors"
                              f"{f'; {odd!r} is not a tensor' if odd else ''})")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def split_encoder(sd: dict[str, Tensor], fmt: str, path: Path) -> tuple[dict[str, Tensor], dict[str, int]]:
    """(encoder tensors under timm's names, {dropped part: tensor count}); an unaccounted key is an error."""
    if fmt == "conmim":
        raise CheckpointError(f"{path}: ConMIM checkpoints are BEiT encoders (relative position bias, layer-scale); "
                              "the timm VisionTransformer an export loads into cannot represent them")
    encoder: dict[str, Tensor] = {}
    dropped: dict[str, int] = {}
    for k, v in sd.items():
        if fmt == "mocov3":
            if k.startswith("base_encoder.head."):
                part = "projector (base_encoder.head)"
            elif k.startswith("momentum_encoder."):
                part = "momentum encoder"
            elif k.startswith("predictor."):
                part = "predictor"
            elif k.startswith("base_encoder.") and k.removeprefix("base_encoder.").startswith(ENCODER_PREFIXES):
                encoder[k.removeprefix("base_encoder.")] = v
                continue
            else:
                raise CheckpointError(f"{path}: unexpected key {k!r} for a MoCo v3 checkpoint")
        else:
            if k == "mask_token" or k.startswith("decoder_"):
                part = "decoder"
            elif k.startswith(ENCODER_PREFIXES):
                encoder[k] = v
                continue
            else:
                raise CheckpointError(f"{path}: unexpected key {k!r} for a {fmt} pre-training checkpoint "
                                      "(a fine-tuned checkpoint has a head; convert the pre-training one)")
        dropped[part] = dropped.get(part, 0) + 1
    if "pos_embed" not in encoder or "patch_embed.proj.weight" not in encoder:
        raise CheckpointError(f"{path}: no ViT encoder found (pos_embed / patch_embed.proj.weight missing)")
    return encoder, dropped


def architecture(enc: dict[str, Tensor], fmt: str, num_heads: int | None, path: Path) -> tuple[str, dict]:
    """The timm model name and kwargs that hold ``enc`` exactly (num_classes 0: the export has no head)."""
    width = int(enc["pos_embed"].shape[-1])
    name = TIMM_BY_WIDTH.get(width)
    if name is None:
        raise CheckpointError(f"{path}: no timm ViT of width {width} (known: {sorted(TIMM_BY_WIDTH)})")
    patch = int(enc["patch_embed.proj.weight"].shape[-1])
    tokens = int(enc["pos_embed"].shape[1]) - (1 if "cls_token" in enc else 0)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{path}: pos_embed holds {tokens} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("blocks."))
    kwargs: dict = {"num_classes": 0, "img_size": grid * patch, "patch_size": patch, "depth": depth}
    heads = num_heads or HEADS.get((fmt, width))
    if heads:
        kwargs["num_heads"] = heads
    return name, kwargs


def convert(fmt: str, checkpoint: Path, out: Path, num_heads: int | None = None) -> ExportMeta:
    """Write ``out/backbone.safetensors`` + ``out/backbone.json`` for an official checkpoint; returns the metadata."""
    from repro.backbone import create_timm_model

    if fmt not in FORMATS:
        raise CheckpointError(f"format {fmt!r}: choose from {', '.join(FORMATS)}")
    ckpt = read_checkpoint(checkpoint)
    encoder, dropped = split_encoder(official_state_dict(ckpt, fmt, checkpoint), fmt, checkpoint)
    name, kwargs = architecture(encoder, fmt, num_heads, checkpoint)
    model = create_timm_model(name, kwargs)
    load_strict(model, encoder, str(checkpoint))  # every encoder key used, every model key filled
    check_output_dir(out, sum(v.numel() * v.element_size() for v in encoder.values()))
    meta = ExportMeta(timm_model=name, timm_kwargs=kwargs, img_size=kwargs["img_size"],
                      patch_size=kwargs["patch_size"], mean=IMAGENET_MEAN, std=IMAGENET_STD, method=fmt, steps=0,
                      budget="official", budget_seconds=None, config_hash="", git_revision=git_revision(),
                      dataset="imagenet-1k", seed=0,
                      extra={"converted_from": str(checkpoint.resolve()), "format": fmt, "dropped": dropped,
                             "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
                             "note": f"official {fmt} checkpoint {checkpoint.name}, converted by repro.convert"})
    export_backbone(out, model.state_dict(), meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro.convert", description=__doc__.split("\n\n")[0],
                                epilog="Then: python -m evals.knn|linear|finetune --export OUT [--data PATH]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=FORMATS, help="whose layout the checkpoint has")
    p.add_argument("checkpoint", type=Path, help="the released file, e.g. mae_pretrain_vit_base.pth")
    p.add_argument("--out", required=True, type=Path, help="export directory to write")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, when they differ from timm's for that width (MoCo v3 ViT-S: 12, set "
                        "automatically)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[repro] %(message)s", stream=sys.stderr)
    try:
        meta = convert(args.format, args.checkpoint, args.out, args.num_heads)
    except CheckpointError as e:
        print(f"repro.convert: error: {e}", file=sys.stderr)
        return 2
    log.info("%s: %s %s -> %s (dropped: %s)", args.checkpoint, meta.timm_model, meta.timm_kwargs, args.out,
             ", ".join(f"{k} {v} tensors" for k, v in meta.extra["dropped"].items()) or "nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
