"""``MaskedViT``: a stock timm VisionTransformer plus the two token paths masked methods need.

The wrapped ``self.vit`` is created with ``timm.create_model`` and never modified structurally, so
``self.vit.state_dict()`` is a timm state dict: an export loads with ``strict=True`` into
``timm.create_model(name, **timm_kwargs)``. What methods need on top lives here and is not part of
the export: the learned [MASK] token (ConMIM/MimCo) and the token paths.

- ``embed(x)``: patch embedding plus position embedding (cls row excluded) -> (B, N, D).
- ``encode(tokens)``: prepend cls + its position, run timm's blocks and final norm -> (B, K+1, D).
- ``forward_visible(x, ids_keep)``: drop tokens (MAE, MiCL) -> (B, K+1, D).
- ``forward_masked(x, mask)``: replace masked patches by the [MASK] token, keep all N -> (B, N+1, D).

With every token kept in order, ``encode(embed(x))`` is bit-identical to timm's ``forward_features``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from repro.config import ModelConfig

PosEmbedKind = Literal["learned", "sincos", "sincos_moco"]
InitKind = Literal["timm", "mae", "moco", "beit"]


@dataclass(frozen=True)
class BackboneOptions:
    """What a method asks of the shared backbone."""

    pos_embed: PosEmbedKind = "learned"
    """'sincos' = MAE's fixed 2-D sin-cos table (frozen, zero cls row); 'sincos_moco' = MoCo v3's (row index
    in the first half, float32); 'learned' = timm's trainable one."""
    init: InitKind = "timm"
    """'mae' = xavier-uniform Linear and flattened patch projection, cls N(0, 0.02); 'moco' = timm's
    ``weight_init='moco'`` (q, k, v xavier separately) + patch projection U(+-sqrt(6 / (3 p^2 + D))), zero
    bias, cls N(0, 1e-6) (moco-v3 vits.py); 'beit' = BEiT's (ConMIM ``modeling_pretrain.py``): every Linear,
    the patch projection, cls, [MASK] and position tables N(0, 0.02) truncated at +-1 sigma, biases 0, and each
    block's ``attn.proj`` / ``mlp.fc2`` weights divided by sqrt(2 * layer_id); 'timm' = timm's own init."""
    mask_token: bool = False
    """Create a learned [MASK] token for ``forward_masked`` (BEiT-style methods)."""
    freeze_patch_embed: bool = False
    """MoCo v3's "random patch projection": the patch-embedding weights are never trained."""


def mae_sincos_pos_embed(grid_size: int, dim: int, cls_token: bool = True) -> Tensor:
    """MAE's fixed 2-D sin-cos position table, (G*G [+1], D), float32.

    Patch k (row i = k // G, column j = k % G) gets ``[sin(j w), cos(j w), sin(i w), cos(i w)]``, each block
    D/4 wide with ``w_t = 1 / 10000^(t / (D/4))``: the column index fills the first half because MAE builds
    its grid with ``meshgrid(w, h)``. Computed in float64 like MAE's numpy code, then cast. The cls row is 0.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    idx = torch.arange(grid_size * grid_size, dtype=torch.float64)
    rows, cols = torch.div(idx, grid_size, rounding_mode="floor"), idx % grid_size
    out_c, out_r = cols[:, None] * omega[None], rows[:, None] * omega[None]
    table = torch.cat([out_c.sin(), out_c.cos(), out_r.sin(), out_r.cos()], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def moco_sincos_pos_embed(grid_size: int, dim: int) -> Tensor:
    """MoCo v3's fixed 2-D sin-cos table, (1 + G*G, D), float32, cls row 0 (moco-v3 ``vits.py``).

    ``torch.meshgrid(w, h)`` with 'ij' indexing puts the **row** index k // G in the first half
    ``[sin(i w), cos(i w), sin(j w), cos(j w)]`` — the transpose of MAE's table; computed in float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    idx = torch.arange(grid_size * grid_size)
    rows = torch.div(idx, grid_size, rounding_mode="floor").float()
    cols = (idx % grid_size).float()
    out_r, out_c = rows[:, None] * omega[None], cols[:, None] * omega[None]
    table = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), ordered (patch row, patch col, pixel row, pixel col, channel) as MAE."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _init_layers_(module: nn.Module, weight_init: Callable[[Tensor], Any], kinds: tuple[type[nn.Module], ...]) -> None:
    """An official ``_init_weights`` over ``module``: ``weight_init`` on the weights of ``kinds``, zero biases,
    LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, kinds):
            weight_init(m.weight)  # type: ignore[arg-type]
            if m.bias is not None:  # type: ignore[union-attr]
                nn.init.zeros_(m.bias)  # type: ignore[arg-type]
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_mae_(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    _init_layers_(module, nn.init.xavier_uniform_, (nn.Linear,))


BEIT_INIT_STD = 0.02


def beit_trunc_normal_(t: Tensor, std: float = BEIT_INIT_STD) -> Tensor:
    """BEiT's ``trunc_normal_``: N(0, std) truncated at +-1 std (``a=-std, b=std``), not timm's +-2 absolute."""
    return timm.layers.trunc_normal_(t, std=std, a=-std, b=std)


def init_beit_(module: nn.Module) -> None:
    """BEiT's ``_init_weights``: Linear and Conv2d weights truncated normal (+-1 sigma), biases 0, LayerNorm (1, 0)."""
    _init_layers_(module, beit_trunc_normal_, (nn.Linear, nn.Conv2d))


class MaskedViT(nn.Module):
    """A timm VisionTransformer (``self.vit``) with visible-token and mask-token paths."""

    def __init__(self, model: ModelConfig, options: BackboneOptions = BackboneOptions()) -> None:
        super().__init__()
        self.model_cfg = model
        self.options = options
        self.timm_name = model.name
        self.timm_kwargs = model.timm_kwargs()
        vit = timm.create_model(model.name, pretrained=False, drop_path_rate=model.drop_path_rate, **self.timm_kwargs)
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"{model.name}: MaskedViT wraps timm VisionTransformer models, got {type(vit).__name__}")
        self.vit: VisionTransformer = vit
        if getattr(vit, "cls_token", None) is None or getattr(vit, "reg_token", None) is not None \
                or getattr(vit, "no_embed_class", False) or getattr(vit, "pos_embed", None) is None:
            raise ValueError(f"{model.name}: MaskedViT needs a ViT with one cls token, no register tokens and a "
                             "position embedding that includes the cls row (the original timm/DeiT layout)")
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError(f"{model.name}: dynamic_img_size is not supported")
        self.embed_dim: int = vit.embed_dim
        self.img_size: int = int(vit.patch_embed.img_size[0])  # type: ignore[index]
        self.depth: int = len(vit.blocks)
        self.patch_size: int = vit.patch_embed.patch_size[0]
        gh, gw = vit.patch_embed.grid_size
        if gh != gw:
            raise ValueError(f"{model.name}: only square patch grids are supported, got {gh}x{gw}")
        self.grid_size: int = gh
        self.num_patches: int = gh * gw

        if options.init == "mae":
            init_mae_(vit)
            w = vit.patch_embed.proj.weight.data
            # MAE: "initialize patch_embed like nn.Linear (instead of nn.Conv2d)"
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self._cls, std=0.02)
        elif options.init == "moco":
            vit.init_weights("moco")  # q, k, v xavier-uniform as separate matrices; cls N(0, 1e-6)
            w = vit.patch_embed.proj.weight.data
            bound = (6.0 / float(w[0].numel() + w.shape[0])) ** 0.5  # sqrt(6 / (3 p^2 + D))
            nn.init.uniform_(w, -bound, bound)
            if vit.patch_embed.proj.bias is not None:
                nn.init.zeros_(vit.patch_embed.proj.bias)
        elif options.init == "beit":
            beit_trunc_normal_(self._pos)
            beit_trunc_normal_(self._cls)
            init_beit_(vit)
            with torch.no_grad():  # BEiT's fix_init_weight: "rescale(param, layer_id)" with layer_id = i + 1
                for i, blk in enumerate(vit.blocks):
                    blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))  # type: ignore[union-attr, operator]
                    blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))  # type: ignore[union-attr, operator]
        if options.pos_embed in ("sincos", "sincos_moco"):
            table = (mae_sincos_pos_embed(self.grid_size, self.embed_dim) if options.pos_embed == "sincos"
                     else moco_sincos_pos_embed(self.grid_size, self.embed_dim))
            self._pos.data.copy_(table.unsqueeze(0))
            self._pos.requires_grad_(False)
        if options.freeze_patch_embed:
            vit.patch_embed.requires_grad_(False)
        self.mask_token: nn.Parameter | None = None
        if options.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            if options.init == "beit":
                beit_trunc_normal_(self.mask_token)
            else:
                nn.init.normal_(self.mask_token, std=0.02)

    @property
    def _pos(self) -> Tensor:
        """timm's (1, N+1, D) position embedding (checked non-None at construction)."""
        pos = self.vit.pos_embed
        assert pos is not None
        return pos

    @property
    def _cls(self) -> Tensor:
        cls = self.vit.cls_token
        assert cls is not None
        return cls

    # ------------------------------------------------------------------ token paths
    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding plus position embedding (without the cls row): (B, 3, H, W) -> (B, N, D)."""
        return self.vit.patch_embed(x) + self._pos[:, 1:, :]

    def encode(self, tokens: Tensor) -> Tensor:
        """Prepend cls (+ its position), run all blocks and the final norm: (B, K, D) -> (B, K+1, D)."""
        vit = self.vit
        cls = (self._cls + self._pos[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        x = vit.norm_pre(vit.pos_drop(x))
        x = vit.blocks(x)
        return vit.norm(x)

    def forward_visible(self, x: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode only the kept patches: x (B, 3, H, W), ids_keep (B, K) -> (B, K+1, D)."""
        tokens = self.embed(x)
        kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.encode(kept)

    def forward_masked(self, x: Tensor, mask: Tensor) -> Tensor:
        """BEiT-style: masked patches replaced by the [MASK] token before the position embedding.

        x (B, 3, H, W), mask (B, N) bool True = masked -> (B, N+1, D).
        """
        if self.mask_token is None:
            raise RuntimeError("forward_masked needs BackboneOptions(mask_token=True)")
        tokens = self.vit.patch_embed(x)
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        return self.encode(tokens + self._pos[:, 1:, :])

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens, timm's own path: (B, 3, H, W) -> (B, N+1, D)."""
        return self.vit.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The timm state dict (what an export holds); method-only parameters such as the [MASK] token excluded."""
        return {k: v.detach() for k, v in self.vit.state_dict().items()}


def create_timm_model(name: str, timm_kwargs: dict) -> nn.Module:
    """The plain timm model an export loads into (no pretrained download)."""
    return timm.create_model(name, pretrained=False, **timm_kwargs)
