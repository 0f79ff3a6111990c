"""``python -m repro.convert``: a released checkpoint -> our export, evaluated like ours.

    python -m repro.convert mae mae_pretrain_vit_base.pth --out exports/mae-vit-b
    python -m repro.convert mocov3 vit-s-300ep.pth.tar --out exports/mocov3-vit-s
    python -m repro.convert mocov3 linear-vit-s-300ep.pth.tar --out exports/mocov3-vit-s-lin  # + head.safetensors
    python -m evals.linear --export exports/mae-vit-b --data /data/imagenet      # the suite's protocol

The format names whose release the file is; the layout within it is read from the keys (``torch.load
(weights_only=True)``; of the non-tensor objects these files hold only ``argparse.Namespace``, MAE's saved training
arguments, is allowed):

- **mae** — facebookresearch/mae ``{"model": state_dict, ...}``: the timm encoder at top level (``cls_token``,
  ``pos_embed``, ``patch_embed.*``, ``blocks.N.*``, ``norm.*``), with or without the decoder (``mask_token``,
  ``decoder_*``, as in the ``mae_visualize_*`` files), which is dropped.
- **micl** — the OCL release: MAE's layout, encoder only.
- **mocov3** — facebookresearch/moco-v3, three layouts:
  ``main_moco.py`` (pre-training) ``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*",
  "module.predictor.*"}, ...}``: the base encoder is kept; its head (the projector), the momentum encoder and the
  predictor are dropped. ``main_lincls.py`` (linear classification) ``{"state_dict": {"module.<encoder>",
  "module.head.weight", "module.head.bias"}, "best_acc1": ..., ...}``: the encoder is the export and the trained
  classifier is kept beside it as ``head.safetensors`` (its released top-1 in the metadata; :func:`load_classifier`
  rebuilds encoder + head so that number can be checked). ``convert_to_deit.py`` ``{"model": encoder}``: the
  encoder as is.
- **conmim** — refused: ConMIM's BEiT encoder has relative position bias and layer-scale, which the timm
  VisionTransformer our exports load into cannot represent.

Every key is accounted for: encoder keys are kept, the parts above are kept or dropped by name, anything else is an
error, and a file whose layout belongs to another release is refused in one line naming the layout it looks like.
The architecture is read from the tensor shapes (width -> the timm ViT of that width; depth, patch size and image
size from the blocks, the patch projection and the position table) except the number of attention heads, which no
tensor shape shows (MoCo v3's ViT-S has 12 heads where timm's has 6, with the same shapes): it comes from
``--heads`` or from the release's known models (:data:`KNOWN_HEADS`), and when neither knows it the conversion is
refused rather than given timm's default. The export is checked by loading it strictly into that timm model before
anything is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from repro.backbone import create_timm_model
from repro.checkpoint import CheckpointError, atomic_write, check_output_dir
from repro.export import (
    Conversion,
    ExportMeta,
    ReleasedHead,
    converted_meta,
    export_backbone,
    load_safetensors,
    load_strict,
    read_export,
)

log = logging.getLogger("repro.convert")

FORMATS = ("mae", "micl", "mocov3", "conmim")
SAFE_GLOBALS = (argparse.Namespace,)
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
TIMM_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                 1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}
_MAE_HEADS = {768: 12, 1024: 16, 1280: 16}
KNOWN_HEADS: dict[str, dict[int, int]] = {"mae": _MAE_HEADS, "micl": _MAE_HEADS, "mocov3": {384: 12, 768: 12}}
"""Attention heads of each released model, by width. No tensor shape shows the head count, so a width outside this
table needs ``--heads``: MAE's models_mae.py (ViT-B 12, ViT-L 16, ViT-H 16; the OCL release reuses it) and MoCo v3's
vits.py (``vit_small`` 12 — timm's ViT-S has 6 — and ``vit_base`` 12)."""

HEAD_NAME = "head"
"""A MoCo v3 linear-classification checkpoint's trained classifier is kept as ``<export>/head.safetensors``."""

LAYOUTS = {
    "mocov3-pretrain": "a MoCo v3 pre-training checkpoint (main_moco.py: base_encoder / momentum_encoder / predictor)",
    "mocov3-lincls": "a MoCo v3 linear-classification checkpoint (main_lincls.py: 'state_dict' of encoder + "
                     "head.weight/head.bias)",
    "classifier": "a fine-tuned classifier (encoder + head, e.g. MAE's main_finetune.py)",
    "mae-pretrain": "an MAE-style pre-training checkpoint with its decoder (mask_token, decoder_*)",
    "encoder": "an encoder-only checkpoint (MAE/OCL release, or MoCo v3's convert_to_deit.py {'model': encoder})",
    "beit": "a BEiT-style encoder (relative position bias, layer-scale; e.g. ConMIM)",
}
"""The layouts :func:`detect_layout` tells apart, as an error message names them."""
ACCEPTED = {"mae": ("mae-pretrain", "encoder"), "micl": ("mae-pretrain", "encoder"),
            "mocov3": ("mocov3-pretrain", "mocov3-lincls", "encoder"), "conmim": ()}
SUGGEST = {"mocov3-pretrain": "convert it as mocov3", "mocov3-lincls": "convert it as mocov3",
           "mae-pretrain": "convert it as mae or micl", "classifier": "convert the pre-training release",
           "beit": "BEiT encoders cannot be converted", "encoder": "convert it as mae, micl or mocov3"}


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


def official_state_dict(ckpt: dict, fmt: str, path: Path) -> tuple[dict[str, Tensor], str]:
    """(the model's tensors under their official names, ``module.`` of DDP removed; the top-level key holding them,
    '' when the file is the state dict itself)."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            sd, where = ckpt[key], key
            break
    else:
        sd, where = ckpt, ""
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors or len(tensors) != len(sd):
        odd = next((k for k, v in sd.items() if not isinstance(v, Tensor)), None)
        raise CheckpointError(f"{path}: no {fmt} state dict found ('model' or 'state_dict' of tensors"
                              f"{f'; {odd!r} is not a tensor' if odd else ''})")
    return {k.removeprefix("module."): v for k, v in tensors.items()}, where


def detect_layout(sd: dict[str, Tensor], where: str) -> tuple[str, str]:
    """(layout name in :data:`LAYOUTS`, the key that shows it) — read from the keys alone, so that a file of one
    release given as another is refused naming what it is rather than converted into the wrong model."""
    keys = list(sd)
    for k in keys:
        if k.startswith(("base_encoder.", "momentum_encoder.", "predictor.")):
            return "mocov3-pretrain", k
    for k in keys:
        if "relative_position" in k or k.startswith("rel_pos_bias") or ".gamma_1" in k:
            return "beit", k
    for k in keys:
        if k.startswith(("head.", "fc_norm.")):
            # main_lincls.py saves {'state_dict': model.state_dict(), 'best_acc1', ...}; MAE/DeiT fine-tuning 'model'
            return ("mocov3-lincls" if where == "state_dict" else "classifier"), k
    for k in keys:
        if k == "mask_token" or k.startswith("decoder_"):
            return "mae-pretrain", k
    return "encoder", keys[0]


def split_encoder(sd: dict[str, Tensor], fmt: str, layout: str,
                  path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """(encoder tensors under timm's names, classifier head tensors, {dropped part: tensor count}); a key of no known
    part is an error."""
    encoder: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    dropped: dict[str, int] = {}
    for k, v in sd.items():
        if layout == "mocov3-pretrain":
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
                raise CheckpointError(f"{path}: unexpected key {k!r} for {LAYOUTS[layout]}")
        elif layout == "mocov3-lincls" and k in ("head.weight", "head.bias"):
            head[k.removeprefix("head.")] = v
            continue
        elif layout == "mae-pretrain" and (k == "mask_token" or k.startswith("decoder_")):
            part = "decoder"
        elif k.startswith(ENCODER_PREFIXES):
            encoder[k] = v
            continue
        else:
            raise CheckpointError(f"{path}: unexpected key {k!r} for {LAYOUTS[layout]}")
        dropped[part] = dropped.get(part, 0) + 1
    if "patch_embed.proj.0.weight" in encoder:
        raise CheckpointError(f"{path}: a convolutional patch stem (patch_embed.proj.0.*, MoCo v3's vit_conv_*) "
                              "cannot be represented by the timm VisionTransformer an export loads into")
    if "pos_embed" not in encoder or "patch_embed.proj.weight" not in encoder:
        raise CheckpointError(f"{path}: no ViT encoder found (pos_embed / patch_embed.proj.weight missing)")
    if layout == "mocov3-lincls" and (set(head) != {"weight", "bias"} or head["weight"].ndim != 2):
        raise CheckpointError(f"{path}: {LAYOUTS[layout]} without a linear head (found head.{', head.'.join(head)})")
    return encoder, head, dropped


def attention_heads(fmt: str, width: int, num_heads: int | None, path: Path) -> tuple[int, str]:
    """(heads, where the number came from): ``--heads``, else the release's model of that width; never timm's
    default, which differs for MoCo v3's ViT-S with the same tensor shapes."""
    if num_heads is not None:
        if num_heads < 1 or width % num_heads:
            raise CheckpointError(f"{path}: --heads {num_heads} does not divide the width {width}")
        known = KNOWN_HEADS.get(fmt, {}).get(width)
        if known is not None and known != num_heads:
            log.warning("--heads %d overrides the %d heads of %s's released width-%d model", num_heads, known, fmt,
                        width)
        return num_heads, "--heads"
    known = KNOWN_HEADS.get(fmt, {}).get(width)
    if known is None:
        released = ", ".join(f"width {w}: {h}" for w, h in sorted(KNOWN_HEADS.get(fmt, {}).items()))
        raise CheckpointError(f"{path}: the attention heads of a width-{width} encoder are not in its weights and no "
                              f"{fmt} release has that width ({released}): pass --heads N")
    return known, f"{fmt} release, width {width}"


def architecture(enc: dict[str, Tensor], fmt: str, num_heads: int | None, path: Path) -> tuple[str, dict, str]:
    """The timm model name and kwargs that hold ``enc`` exactly (num_classes 0: the export has no head), and where
    the head count came from."""
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
    heads, heads_from = attention_heads(fmt, width, num_heads, path)
    kwargs: dict = {"num_classes": 0, "img_size": grid * patch, "patch_size": patch, "depth": depth,
                    "num_heads": heads}
    return name, kwargs, heads_from


def _number(x: object) -> float | int | None:
    """A checkpoint scalar (main_lincls.py saves ``best_acc1`` as a 0-d tensor) as a plain number."""
    if isinstance(x, Tensor) and x.numel() == 1:
        return x.item()
    return x if isinstance(x, int | float) and not isinstance(x, bool) else None


def write_head(out: Path, head: dict[str, Tensor], info: dict) -> Path:
    """``out/head.safetensors`` (timm's ``head.weight``/``head.bias`` as ``weight``/``bias``) with ``info`` (released
    top-1, epoch, arch, classes) as safetensors metadata, so the file alone says what it is."""
    path = Path(out) / f"{HEAD_NAME}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.items()}
    meta = {"format": "pt", **{k: json.dumps(v) for k, v in info.items()}}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta), checksum=True)
    return path


def convert(fmt: str, checkpoint: Path, out: Path, num_heads: int | None = None) -> ExportMeta:
    """Write ``out/backbone.safetensors`` + ``out/backbone.json`` (+ ``out/head.safetensors`` for a linear-
    classification checkpoint) for an official checkpoint; returns the metadata."""
    if fmt not in FORMATS:
        raise CheckpointError(f"format {fmt!r}: choose from {', '.join(FORMATS)}")
    if fmt == "conmim":
        raise CheckpointError(f"{checkpoint}: ConMIM checkpoints are BEiT encoders (relative position bias, "
                              "layer-scale); the timm VisionTransformer an export loads into cannot represent them")
    ckpt = read_checkpoint(checkpoint)
    sd, where = official_state_dict(ckpt, fmt, checkpoint)
    layout, telltale = detect_layout(sd, where)
    if layout not in ACCEPTED[fmt]:
        raise CheckpointError(f"{checkpoint}: not a {fmt} checkpoint: it looks like {LAYOUTS[layout]} (key "
                              f"{telltale!r}); {SUGGEST[layout]}")
    encoder, head, dropped = split_encoder(sd, fmt, layout, checkpoint)
    name, kwargs, heads_from = architecture(encoder, fmt, num_heads, checkpoint)
    model = create_timm_model(name, kwargs)
    load_strict(model, encoder, str(checkpoint))  # every encoder key used, every model key filled
    released: ReleasedHead | None = None
    if head:
        released = ReleasedHead(file=f"{HEAD_NAME}.safetensors", num_classes=int(head["weight"].shape[0]),
                                best_acc1=_number(ckpt.get("best_acc1")), epoch=_number(ckpt.get("epoch")),
                                arch=ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else None,
                                source=f"{checkpoint.name} ({layout})")
        classifier = create_timm_model(name, {**kwargs, "num_classes": released.num_classes})
        load_strict(classifier, {**encoder, **{f"head.{k}": v for k, v in head.items()}}, str(checkpoint))
    size = sum(v.numel() * v.element_size() for v in (*encoder.values(), *head.values()))
    check_output_dir(out, size)
    epoch = ckpt.get("epoch")
    conversion = Conversion(converted_from=str(checkpoint.resolve()), format=fmt, layout=layout, heads_from=heads_from,
                            dropped=dropped, epoch=epoch if isinstance(epoch, int) else None, head=released)
    meta = converted_meta(name, kwargs, conversion,
                          note=f"official {fmt} checkpoint {checkpoint.name}, converted by repro.convert")
    if released is not None:  # before backbone.json, which marks the export complete
        write_head(out, head, {k: v for k, v in asdict(released).items() if k != "file"})
    export_backbone(out, model.state_dict(), meta)
    # what landed on disk is what was written: each file of the export against the checksum taken as it was written
    checked, _ = read_export(out, weights=False)
    if head:
        load_safetensors(Path(out) / f"{HEAD_NAME}.safetensors")
    return replace(meta, weights_sha256=checked.weights_sha256)


def load_classifier(export_dir: Path) -> nn.Module:
    """The export's encoder with the kept linear head (``head.safetensors``) in one timm classifier, both loaded
    strictly — what main_lincls.py evaluated, so its released top-1 (``backbone.json`` extra.head.best_acc1) can be
    checked with any ImageNet validation loop."""
    meta, state = read_export(export_dir)
    path = Path(export_dir) / f"{HEAD_NAME}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (only a converted linear-classification checkpoint has a head)")
    head, _ = load_safetensors(path)  # verified against its checksum, like the encoder
    if set(head) != {"weight", "bias"}:
        raise CheckpointError(f"{path}: expected tensors weight, bias; found {', '.join(sorted(head))}")
    model = create_timm_model(meta.timm_model, {**meta.timm_kwargs, "num_classes": int(head["weight"].shape[0])})
    load_strict(model, {**state, **{f"head.{k}": v for k, v in head.items()}}, str(path))
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro.convert", description=__doc__.split("\n\n")[0],
                                epilog="Then: python -m evals.knn|linear|finetune --export OUT [--data PATH]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=FORMATS, help="whose release the checkpoint is (its layout is read from the keys)")
    p.add_argument("checkpoint", type=Path, help="the released file, e.g. mae_pretrain_vit_base.pth")
    p.add_argument("--out", required=True, type=Path, help="export directory to write")
    p.add_argument("--heads", "--num-heads", dest="heads", type=int, default=None,
                   help="attention heads (not in the weights); needed when the release has no model of that width "
                        "(known: MAE/MiCL ViT-B 12, ViT-L 16, ViT-H 16; MoCo v3 ViT-S 12, ViT-B 12)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[repro] %(message)s", stream=sys.stderr)
    try:
        meta = convert(args.format, args.checkpoint, args.out, args.heads)
    except CheckpointError as e:
        print(f"repro.convert: error: {e}", file=sys.stderr)
        return 2
    c = meta.conversion
    assert c is not None
    log.info("%s (%s): %s %s -> %s (dropped: %s; weights sha256 %s, checked)", args.checkpoint, c.layout,
             meta.timm_model, meta.timm_kwargs, args.out,
             ", ".join(f"{k} {v} tensors" for k, v in c.dropped.items()) or "nothing", meta.weights_sha256)
    if c.head is not None:
        log.info("linear head kept: %s (%d classes, released best_acc1 %s)", args.out / c.head.file,
                 c.head.num_classes, c.head.best_acc1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
