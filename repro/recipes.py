"""Named presets. A recipe is a list of dotted overrides, each with the reason it departs from the paper.

Paper defaults live in the method configs; a recipe only states what a setting must change (small images,
a CPU, a few minutes) and why. ``--set`` overrides come after the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from repro.config import RunConfig


class Override(NamedTuple):
    key: str
    value: Any
    why: str


def small_decoder(why_width: str, why_depth: str) -> list[Override]:
    """MAE's (and MACRL's) decoder at 2 blocks of 128 (4 heads) for the small recipes."""
    return [Override("method.decoder_dim", 128, why_width), Override("method.decoder_depth", 2, why_depth),
            Override("method.decoder_heads", 4, "128 / 4 = 32-wide heads")]


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
                 "a few epochs of batch 128 instead of 100 epochs of batch 1024 (evals/finetune/recipes.py says why)"),
        Override("eval.ade20k_recipe", "tiny", "2 iterations on 64-px crops: checks the ADE20K harness end to end; "
                 "160k iterations of a 512-px UperNet are a GPU job"),
        Override("eval.coco_recipe", "tiny", "2 iterations on 128-px canvases: checks the COCO harness end to end"),
        Override("eval.linear_base_lrs", (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
                 "LARS moves the probe by ~lr x 0.001 x |w| per step, so its total travel scales with dataset size "
                 "x base lr: MAE's 0.1 (tuned for 1.28M images) leaves a probe on 5k images near its init"),
    ]
    narrow_heads = Override("method.mlp_dim", 1024, "4096-wide heads on a 192-wide encoder would dominate the step")
    per_method: dict[str, list[Override]] = {
        "micl": [Override("method.mask_ratio", 0.75, "0.9 of 64 tokens keeps 6 (3 per view); 0.75 keeps 16 "
                          "(8 per view), about the 9 per view of ViT-B at 0.9")],
        "mae": small_decoder("the 8x512 decoder is ~4x the cost of this 6x192 encoder",
                             "same reason; MAE Table 1a shows depth 1-2 still works"),
        "mocov3": [narrow_heads],
        "conmim": [
            Override("method.num_mask_patches", 24, "75/196 (38%) of 64 tokens"),
            Override("method.min_mask_patches", 5, "BEiT's 16 of 196 patches, scaled to 64"),
            narrow_heads,
            Override("train.base_lr", 5e-4, "ConMIM's lr is absolute (paper: 5e-4): the same lr the others get here "
                     "(1e-3 x 128 / 256)"),
        ],
        "mimco": [narrow_heads],
        "macrl": [
            *small_decoder("as MAE here: the 8x512 decoders would be ~8x this encoder", "as MAE here"),
            Override("method.bank_size", 4096, "below the 5k built-in training images (65536 is ImageNet's)"),
        ],
    }
    return common + per_method.get(method, [])


def cifar10(method: str) -> list[Override]:
    """CIFAR-10 (50k 32-px training images) on one GPU in minutes per method: a 12-block ViT-S on 4-px patches.

    Everything not listed is the paper's value from the method's config (optimiser, betas, weight decay, warmup
    fraction, temperatures, momentum, heads). Every method gets the same batch, model and evaluation protocol.
    """
    mlp_cost = "the 8x512 decoder on 65 tokens costs ~4.5x the ViT-S encoder on 17 visible tokens: under equal " \
        "compute it would spend ~80% of the budget on a part that is thrown away; MAE Table 1a/b: 4 blocks of " \
        "256 lose <0.5 fine-tune points"
    common = [
        Override("model.name", "vit_small_patch16_224", "ViT-S width (D=384, 6 heads, 12 blocks): the smallest size "
                 "every paper reports (MoCo v3, MAE follow-ups); ViT-Ti (D=192) would buy 3.5x the epochs but "
                 "is far from the papers' models"),
        Override("model.img_size", 32, "CIFAR is 32 px; pre-training at native size (no upsampling)"),
        Override("model.patch_size", 4, "8x8 = 64 tokens. Patch 2 (256 tokens) costs ~4.5x per image (attention "
                 "grows with N^2), i.e. ~4.5x fewer epochs in the same budget; patch 8 leaves 16 tokens, too few "
                 "to mask 75-90% of"),
        Override("train.batch_size", 512, "50k images: the papers' 2048-7200 would give 7-24 steps per epoch; 512 "
                 "gives 97. Each method's lr follows its own paper's linear scaling rule (base_lr x 512 / 256)"),
        Override("eval.feature_batch_size", 1024, "small images"),
        Override("eval.linear_batch_size", 1024, "50k training features: MAE's 16384 would be 3 steps per epoch"),
        Override("eval.linear_base_lrs", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
                 "LARS travel scales with dataset size x base lr (see the tiny recipe): on 50k features MAE's 0.1 "
                 "barely moves the probe. Swept identically for every method, selected on held-out training images "
                 "(eval.linear_holdout), never on the test images; widened on an edge"),
        Override("eval.finetune_recipe", "cifar10", "MAE's fine-tune protocol for 50k 32-px images in minutes: see "
                 "evals/finetune/recipes.py"),
    ]
    per_method: dict[str, list[Override]] = {
        "micl": [Override("method.mask_ratio", 0.75, "0.9 of 64 tokens keeps 6 (3 per view); 0.75 keeps 16 "
                          "(8 per view), about the 9 per view of ViT-B/16 at 224 px with 0.9")],
        "mae": [
            Override("method.decoder_dim", 256, mlp_cost),
            Override("method.decoder_depth", 4, "same reason"),
            Override("method.decoder_heads", 8, "256 / 8 = 32-wide heads"),
        ],
        "conmim": [
            Override("method.num_mask_patches", 24, "75/196 (38%) of 64 tokens"),
            Override("method.min_mask_patches", 5, "BEiT's 16 of 196 patches, scaled to 64"),
            Override("train.base_lr", 1.25e-4, "ConMIM's lr is absolute (5e-4 at batch 2048): the linear scaling rule "
                     "every other method gets, applied to batch 512"),
        ],
        "macrl": [
            Override("method.decoder_dim", 256, "as MAE here: " + mlp_cost),
            Override("method.decoder_depth", 4, "as MAE here"),
            Override("method.decoder_heads", 8, "256 / 8 = 32-wide heads"),
            Override("method.bank_size", 16384, "65536 exceeds CIFAR-10's 50k images (keys would be a full epoch "
                     "stale); about a third of an epoch"),
        ],
    }
    return common + per_method.get(method, [])


def cifar10_cpu(method: str) -> list[Override]:
    """CIFAR-10 (50k real 32-px images) on two CPU cores under a FLOP budget: the ``tiny`` model and per-method
    settings, with the changes below. Chosen by a pilot (``scripts/cifar10_cpu.sh pilot``,
    results/cifar10-cpu-2026-11/README.md) whose selection used a held-out 10% of the training images only, the
    same rule for every method.
    """
    changes = [
        Override("train.base_lr", 1e-3, "pilot (results/cifar10-cpu-2026-11/NOTES.md): base lr 1e-3 or 3e-3 "
                 "(x batch/256) at 5e12 FLOPs, chosen per method by kNN on a held-out 10% of train, ties (< 0.5 "
                 "point) keeping 1e-3: 1e-3 won for MiCL 36.0/33.7, MoCo v3 31.0/29.7, MimCo 25.3/24.4, MACRL "
                 "24.6/24.0; MAE tied 26.2/26.3. The paper base lrs (5e-5..1.5e-4) barely move a model in a few "
                 "hundred steps"),
        Override("eval.feature_batch_size", 256, "measured fastest for fp32 ViT-Tiny features on 2 cores (297 img/s vs "
                 "269 at 1024)"),
        Override("eval.train_subset", 10000, "a frozen-feature pass costs a forward per image (~300 img/s here): a "
                 "fixed class-balanced 10k of the 50k training images for the kNN bank and the linear probe keeps "
                 "an export's kNN + linear at ~1.3 min; the 10k test images are used whole"),
        Override("eval.linear_batch_size", 256, "10k training features: 35 steps per epoch"),
    ]
    if method == "mae":
        changes.append(Override("method.decoder_depth", 4, "the decoder pilot (results/cifar10-cpu/decoders/NOTES.md, "
                                "rule fixed before the runs): 2x128, 4x128 and 4x256 at 5e13 FLOPs, seed 0, held-out "
                                "linear top-1 43.7 / 47.1 / 42.6 (kNN 31.6 / 38.1 / 29.6): 4 blocks of 128 (4 heads)"))
    if method == "conmim":
        changes.append(Override("train.base_lr", 5e-4, "ConMIM's lr is absolute: 1e-3 x 128 / 256, as every other "
                                "method's lr is scaled; the pilot tied (5e-4: 27.8, 1.5e-3: 28.1 held-out kNN, and "
                                "a final loss of 2.99 vs 3.87)"))
    replaced = {o.key for o in changes}
    return [o for o in tiny(method) if o.key not in replaced] + changes


def in1k(method: str) -> list[Override]:
    """The papers' ImageNet-1k settings: no overrides."""
    return []


RECIPES: dict[str, Callable[[str], list[Override]]] = {
    "tiny": tiny,
    "cifar10": cifar10,
    "cifar10-cpu": cifar10_cpu,
    "in1k": in1k,
}


def default_recipe(data_path: str | None) -> str:
    """Built-in data -> 'tiny'; a user dataset -> the paper recipe 'in1k'."""
    return "tiny" if data_path is None else "in1k"


def build_config(method: str, recipe: str, overrides: dict[str, Any] | None = None, *,
                 keys: Callable[[str], bool] | None = None) -> RunConfig:
    """The one way to build a run's config: ``method``'s paper config, ``recipe``'s overrides for it (only those
    whose key ``keys`` accepts, when given), then ``overrides`` (``--set`` keys). Used by ``repro.run``, its stages,
    ``repro.bench``, the eval CLI (``method=""``: no method, eval and data keys only) and the tests."""
    from repro.config import ConfigError, RunConfig, apply_overrides
    from repro.registry import METHODS

    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    cfg = RunConfig(method=method, method_cfg=METHODS[method].paper_config() if method else None, recipe=recipe)
    cfg = apply_overrides(cfg, {o.key: o.value for o in RECIPES[recipe](method) if keys is None or keys(o.key)})
    return apply_overrides(cfg, overrides or {})

