"""Fidelity details the official codes fix and a refactor could silently lose (METHODS.md; FIDELITY.md)."""

from __future__ import annotations

import math

import pytest
import torch

from repro import losses
from repro.config import ConfigError
from repro.masking import random_block_mask
from repro.method import Batch, StepInfo
from repro.registry import METHODS
from tests.conftest import tiny_method


def _bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


LOSSES = {
    # MiCL: top logit ~14.3 would be rounded to steps of 1/16 by a bf16 matmul
    "tsp": lambda a, b, c: losses.symmetric_tsp_info_nce(a, b, kappa=1 / 64, temperature=0.07),
    "moco": lambda a, b, c: losses.moco_contrastive(a, b, 0.2),
    "info_nce": lambda a, b, c: losses.info_nce(a, b, 0.2),
    "bank": lambda a, b, c: losses.bank_info_nce(a, b, c, 0.2),
    "patch": lambda a, b, c: losses.patch_info_nce(a.view(4, 16, -1), b.view(4, 16, -1),
                                                   torch.arange(64).view(4, 16) % 3 == 0, 0.1),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_contrastive_logits_are_fp32_under_bf16_autocast(name):
    a, b = _bf16(64, 32, seed=1), _bf16(64, 32, seed=2)
    a = (a.float() + 3 * b.float()).to(torch.bfloat16)  # positives close: large top logits
    bank = torch.nn.functional.normalize(_bf16(128, 32, seed=3).float(), dim=-1)
    fn = LOSSES[name]
    want = fn(a.float(), b.float(), bank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(a, b, bank)
    assert got.dtype == torch.float32
    assert torch.equal(got, want), f"{name}: {got.item()} != fp32 {want.item()}"


def test_reconstruction_losses_are_fp32_under_bf16_autocast():
    pred, target, mask = _bf16(4, 16, 48), _bf16(4, 16, 48, seed=5), torch.arange(64).view(4, 16) % 2 == 0
    for fn in (losses.masked_mse, losses.masked_l1):
        want = fn(pred.float(), target.float(), mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fn(pred, target, mask), want)


def test_float64_inputs_stay_float64():
    a, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    assert losses.symmetric_tsp_info_nce(a, b, kappa=1 / 64, temperature=0.07).dtype == torch.float64


def test_conmim_exports_the_teacher_by_default():
    _, m = tiny_method("conmim")
    assert m.eval_backbone() is m.teacher_backbone
    _, s = tiny_method("conmim", **{"method.export_encoder": "student"})
    assert s.eval_backbone() is s.backbone
    with pytest.raises(ConfigError, match="export_encoder.*'teacher', 'student'"):
        tiny_method("conmim", **{"method.export_encoder": "momentum"})


def test_conmim_has_beit_init():
    _, m = tiny_method("conmim")
    vit = m.backbone.vit
    for t in (vit.cls_token, vit.pos_embed, m.backbone.mask_token, vit.blocks[0].attn.qkv.weight,
              m.projector[0].weight, vit.patch_embed.proj.weight):
        assert t.abs().max() <= 0.02 + 1e-7  # truncated at +-1 sigma (timm's default truncates at +-2 absolute)
        assert 0.01 < t.std() < 0.02  # sd of N(0, 0.02) truncated at +-1 sigma: 0.0108
    for i, blk in enumerate(vit.blocks):  # fix_init_weight: divided by sqrt(2 * layer_id)
        bound = 0.02 / math.sqrt(2.0 * (i + 1)) + 1e-7
        assert blk.attn.proj.weight.abs().max() <= bound and blk.mlp.fc2.weight.abs().max() <= bound
        assert blk.attn.proj.weight.abs().max() > 0.9 * bound
    assert torch.equal(m.teacher_backbone.vit.cls_token, vit.cls_token)  # the teacher starts as a copy


def test_conmim_keeps_batchnorm_per_device():
    assert METHODS["conmim"].sync_batchnorm is False and METHODS["mocov3"].sync_batchnorm is True


def test_random_block_masking_rounds_the_masked_count_up():
    # ConMIM's MaskGenerator: int(np.ceil(token_count * mask_ratio)); 4 cells at 0.6 -> 3 (int() gave 2)
    mask = random_block_mask(5, grid=4, block=2, mask_ratio=0.6, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 3 * 4).all()


def test_conmim_refuses_a_mask_that_masks_nothing():
    # a 16-patch minimum rectangle never fits strictly inside a 2x2 grid: BEiT's generator would mask nothing
    with pytest.raises(ConfigError, match="no masked patch"):
        tiny_method("conmim", **{"model.img_size": 8, "method.num_mask_patches": 2})
    _, m = tiny_method("conmim")
    out = m(Batch((torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))), StepInfo(0, 1))
    assert torch.isfinite(out.loss)


def test_mocov3_crops_are_bilinear_like_main_moco():
    _, m = tiny_method("mocov3")
    assert m.views.interpolation == "bilinear"
    _, mae = tiny_method("mae")
    assert mae.views.interpolation == "bicubic"
