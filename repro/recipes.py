"""Named presets. A recipe is a list of dotted overrides, each with the reason it departs from the paper.

Paper defaults live in the method configs; a recipe only states what a setting must change (small images,
a CPU, a few minutes) and why. ``--set`` overrides come after the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class Override(NamedTuple):
    key: str
    value: Any
    why: str


def tiny(method: str) -> list[Override]:
    """Built-in 32-px data on a laptop CPU in minutes: a 6-block ViT-Tiny on 4-px patches (64 tokens)."""
    common = [
        Override("model.name", "vit_tiny_patch16_224", "smallest stock timm ViT (D=192, 3 heads)"),
        Override("model.img_size", 32, "built-in data is 32 px"),
        Override("model.patch_size", 4, "8x8 = 64 tokens at 32 px (16-px patches would leave 4)"),
        Override("model.depth", 6, "half depth: ~2x the steps in a CPU budget"),
        Override("train.batch_size", 128, "a CPU step in ~0.2-0.4 s; 39 steps per epoch of the 5k built-in images"),
        Override("train.base_lr", 1e-3, "same for every method: paper base lrs (5e-5..1.5e-4) at batch 128 "
                 "barely move a model in a few hundred steps"),
        Override("eval.linear_batch_size", 256, "5k training features; 16384 would be one step per epoch"),
        Override("eval.feature_batch_size", 512, "small images"),
        Override("eval.finetune_recipe", "small32", "MAE's fine-tune protocol scaled to 5k 32-px images on a CPU: "
                 "a few epochs of batch 128 instead of 100 epochs of batch 1024 (evals/finetune.py says why)"),
        Override("eval.ade20k_recipe", "tiny", "2 iterations on 64-px crops: checks the ADE20K harness end to end; "
                 "160k iterations of a 512-px UperNet are a GPU job"),
        Override("eval.coco_recipe", "tiny", "2 iterations on 128-px canvases: checks the COCO harness end to end"),
        Override("eval.linear_base_lrs", (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
                 "LARS moves the probe by ~lr x 0.001 x |w| per step, so its total travel scales with dataset size "
                 "x base lr: MAE's 0.1 (tuned for 1.28M images) leaves a probe on 5k images near its init"),
    ]
    per_method: dict[str, list[Override]] = {
        "micl": [Override("method.mask_ratio", 0.75, "0.9 of 64 tokens keeps 6 (3 per view); 0.75 keeps 16 "
                          "(8 per view), about the 9 per view of ViT-B at 0.9")],
        "mae": [
            Override("method.decoder_dim", 128, "the 8x512 decoder is ~4x the cost of this 6x192 encoder"),
            Override("method.decoder_depth", 2, "same reason; MAE Table 1a shows depth 1-2 still works"),
            Override("method.decoder_heads", 4, "128 / 4 = 32-wide heads"),
        ],
        "mocov3": [
            Override("method.mlp_dim", 1024, "4096-wide heads on a 192-wide encoder would dominate the step"),
        ],
        "conmim": [
            Override("method.num_mask_patches", 24, "75/196 (38%) of 64 tokens"),
            Override("method.min_mask_patches", 5, "BEiT's 16 of 196 patches, scaled to 64"),
            Override("method.mlp_dim", 1024, "4096-wide heads on a 192-wide encoder would dominate the step"),
            Override("train.base_lr", 5e-4, "ConMIM's lr is absolute (paper: 5e-4): the same lr the others get here "
                     "(1e-3 x 128 / 256)"),
        ],
        "mimco": [
            Override("method.mlp_dim", 1024, "4096-wide heads on a 192-wide encoder would dominate the step"),
        ],
        "macrl": [
            Override("method.decoder_dim", 128, "as MAE here: the 8x512 decoders would be ~8x this encoder"),
            Override("method.decoder_depth", 2, "as MAE here"),
            Override("method.decoder_heads", 4, "128 / 4 = 32-wide heads"),
            Override("method.bank_size", 4096, "below the 5k built-in training images (65536 is ImageNet's)"),
        ],
    }
    return common + per_method.get(method, [])


def in1k(method: str) -> list[Override]:
    """The papers' ImageNet-1k settings: no overrides."""
    return []


RECIPES: dict[str, Callable[[str], list[Override]]] = {
    "tiny": tiny,
    "in1k": in1k,
}


def default_recipe(data_path: str | None) -> str:
    """Built-in data -> 'tiny'; a user dataset -> the paper recipe 'in1k'."""
    return "tiny" if data_path is None else "in1k"
