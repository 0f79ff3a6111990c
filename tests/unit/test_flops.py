"""Analytic FLOPs (repro.flops) against timm's published GMACs and against PyTorch's FlopCounterMode."""

from __future__ import annotations

import pytest
import timm
import torch

from repro.flops import count_flops, measure_step_flops, mfu, vit_forward_flops
from repro.method import Batch, StepInfo
from repro.registry import METHODS
from repro.views import TensorAugment
from tests.conftest import tiny_method

# timm's model cards: forward GMACs at 224 px (ViT-S/16, ViT-B/16, ViT-L/16)
TIMM_GMACS = {
    "vit_small_patch16_224": (384, 12, 4.6),
    "vit_base_patch16_224": (768, 12, 17.6),
    "vit_large_patch16_224": (1024, 24, 61.6),
}


@pytest.mark.parametrize("name", sorted(TIMM_GMACS))
def test_vit_forward_flops_match_timm_published_gmacs(name):
    dim, depth, gmacs = TIMM_GMACS[name]
    analytic_gmacs = vit_forward_flops(224, 16, dim, depth, 1000) / 2e9
    assert analytic_gmacs == pytest.approx(gmacs, abs=0.05)  # the cards round to 0.1 GMAC


@pytest.mark.parametrize("name", sorted(TIMM_GMACS))
def test_vit_forward_flops_match_counted_timm_forward(name):
    dim, depth, _ = TIMM_GMACS[name]
    with torch.device("meta"):  # shapes only: a ViT-L forward in well under a second
        model = timm.create_model(name)
        x = torch.empty(1, 3, 224, 224)
    counted = count_flops(lambda: model(x), model)
    assert vit_forward_flops(224, 16, dim, depth, 1000) == pytest.approx(counted, rel=1e-3)


def test_hand_count_of_one_block():
    # ViT-B block on 197 tokens: qkv 3*D^2, proj D^2, MLP 8*D^2 multiply-adds per token, plus QK^T and AV
    n, d = 197, 768
    macs = n * (3 * d * d + d * d + 8 * d * d) + 2 * n * n * d
    assert vit_forward_flops(224, 16, d, 1, 0) == 2 * (macs + 196 * 768 * d)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_flops_per_image_match_counted_training_step(name):
    """Each method's analytic count (trained parts 3x, frozen/momentum 1x, first layer 2x, logits where counted)
    against the FLOPs PyTorch sees in a real forward + backward of the tiny-recipe model."""
    _, m = tiny_method(name)
    images = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    batch = Batch(TensorAugment(m.views, 32, (0.5,) * 3, (0.25,) * 3)(images))
    counted = measure_step_flops(m, batch, StepInfo(0, 10))
    assert m.flops_per_image() == pytest.approx(counted, rel=0.01)


def test_counting_restores_fused_attention():
    _, m = tiny_method("mae")
    flags = [mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn")]
    assert flags, "timm attention modules expected"
    images = torch.randn(2, 3, 32, 32)
    measure_step_flops(m, Batch((images,)), StepInfo(0, 10))
    assert [mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn")] == flags


def test_mfu():
    assert mfu(1e9, 1000.0, 4e12) == pytest.approx(0.25)
