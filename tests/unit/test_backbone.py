from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import build_sincos2d_pos_embed

from repro.backbone import BackboneOptions, MaskedViT, mae_sincos_pos_embed, patchify
from repro.config import ModelConfig
from repro.export import load_strict

TINY = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)


def test_mae_sincos_hand_entries():
    g, d = 8, 64
    table = mae_sincos_pos_embed(g, d)  # (1 + 64, 64), cls row first
    assert table.shape == (g * g + 1, d)
    assert torch.count_nonzero(table[0]) == 0
    q = d // 4
    for k in (0, 1, 9, 63):
        i, j = k // g, k % g  # row, column
        for t in (0, 3, q - 1):
            w = 1.0 / 10000 ** (t / q)
            row = table[1 + k]
            assert row[t].item() == pytest.approx(math.sin(j * w), abs=1e-6)  # column fills the first half
            assert row[q + t].item() == pytest.approx(math.cos(j * w), abs=1e-6)
            assert row[2 * q + t].item() == pytest.approx(math.sin(i * w), abs=1e-6)
            assert row[3 * q + t].item() == pytest.approx(math.cos(i * w), abs=1e-6)


def test_mae_table_is_not_timms():
    ours = mae_sincos_pos_embed(8, 64, cls_token=False)
    theirs = build_sincos2d_pos_embed([8, 8], 64).reshape(64, 64)
    assert (ours - theirs).abs().max().item() > 1.0  # a different table: must not be swapped in


def test_patchify_order():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(img, 4)
    assert p.shape == (2, 4, 48)
    # patch (row 0, col 1), pixel (row 2, col 3), channel 1 -> index (2 * 4 + 3) * 3 + 1
    assert p[0, 1, (2 * 4 + 3) * 3 + 1].item() == img[0, 1, 2, 4 + 3].item()


def test_encode_embed_is_bit_identical_to_timm_forward_features():
    torch.manual_seed(0)
    bb = MaskedViT(TINY, BackboneOptions(pos_embed="sincos", init="mae")).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb.encode(bb.embed(x)), bb.vit.forward_features(x))


def test_forward_visible_keeps_only_given_tokens():
    torch.manual_seed(0)
    bb = MaskedViT(TINY, BackboneOptions(pos_embed="sincos")).eval()
    x = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[5, 1, 40], [0, 63, 7]])
    with torch.no_grad():
        out = bb.forward_visible(x, ids)
        tokens = bb.embed(x)
        manual = bb.encode(torch.stack([tokens[b, ids[b]] for b in range(2)]))
    assert out.shape == (2, 4, 192)
    assert torch.equal(out, manual)


def test_forward_masked_replaces_only_masked_tokens():
    torch.manual_seed(0)
    bb = MaskedViT(TINY, BackboneOptions(mask_token=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    none = torch.zeros(2, 64, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_masked(x, none), bb.forward_features(x))
        mask = none.clone()
        mask[:, :10] = True
        assert not torch.allclose(bb.forward_masked(x, mask), bb.forward_features(x))
    assert "mask_token" not in bb.export_state_dict()


def test_sincos_is_frozen_and_mae_init():
    torch.manual_seed(0)
    bb = MaskedViT(TINY, BackboneOptions(pos_embed="sincos", init="mae"))
    assert not bb.vit.pos_embed.requires_grad
    torch.testing.assert_close(bb.vit.pos_embed[0], mae_sincos_pos_embed(8, 192))
    lin = bb.vit.blocks[0].mlp.fc1
    bound = math.sqrt(6 / (lin.in_features + lin.out_features))
    assert lin.weight.abs().max() <= bound and torch.count_nonzero(lin.bias) == 0
    assert bb.vit.norm.eps == 1e-6


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_export_loads_strictly_into_timm(name):
    cfg = ModelConfig(name=name, img_size=32, patch_size=4, depth=1)
    bb = MaskedViT(cfg, BackboneOptions(pos_embed="sincos", init="mae", mask_token=True))
    plain = timm.create_model(name, pretrained=False, **cfg.timm_kwargs())
    load_strict(plain, bb.export_state_dict(), "test")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval().forward_features(x), bb.eval().forward_features(x))


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(ValueError, match="cls token"):
        MaskedViT(ModelConfig(name="vit_base_patch16_reg4_gap_256", depth=1))
