"""Official parameter names -> ours, as ordered ``(official prefix, our prefix)`` rules; the first match wins.

Our backbone wraps an unmodified timm ViT as ``backbone.vit``, so every official encoder name (timm's own)
maps by a prefix; the heads are the official ``nn.Sequential`` layouts under our attribute names.
"""

from __future__ import annotations

Rules = tuple[tuple[str, str], ...]

# OCL's MiCLAutoencoderViT holds the timm encoder at top level and has no other parameters
MICL: Rules = (("", "backbone.vit."),)

# MAE's MaskedAutoencoderViT: timm encoder at top level, decoder parts prefixed ``decoder_`` (and its mask_token)
MAE: Rules = (
    ("decoder_embed.", "decoder.embed."),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.pos_embed"),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.pred."),
    ("", "backbone.vit."),
)

# moco-v3 MoCo_ViT: the projector replaces each encoder's timm head, so ``head.`` must match before the encoder
MOCOV3: Rules = (
    ("base_encoder.head.", "projector."),
    ("momentum_encoder.head.", "momentum_projector."),
    ("base_encoder.", "backbone.vit."),
    ("momentum_encoder.", "momentum_backbone.vit."),
    ("predictor.", "predictor."),
)


def to_ours(name: str, rules: Rules) -> str:
    """Our name for the official tensor ``name``."""
    for official, ours in rules:
        if name.startswith(official):
            return ours + name[len(official):]
    raise KeyError(f"no rule maps the official tensor {name!r}")
