"""The pieces of MoCo v3, ConMIM, MimCo and MACRL that are easy to get subtly wrong."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from repro import distributed
from repro.backbone import BackboneOptions, MaskedViT, mae_sincos_pos_embed, moco_sincos_pos_embed
from repro.budget import BudgetError, parse_budget, split_budget
from repro.checkpoint import CheckpointError
from repro.config import ConfigError, ModelConfig
from repro.losses import bank_info_nce, moco_contrastive, patch_info_nce
from repro.masking import block_mask, random_block_mask
from repro.method import Batch, StepInfo
from repro.momentum import cosine_momentum
from repro.views import (
    BYOL_VIEW1,
    BYOL_VIEW2,
    NONE,
    TensorAugment,
    ViewSpec,
    _blend,
    _gray,
    adjust_hue,
    apply_photometric,
    gaussian_blur,
    pil_view_parts,
)
from tests.conftest import tiny_method

# ---------------------------------------------------------------------------------------------- MoCo v3


def test_moco_contrastive_is_ce_times_two_tau():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    t = 0.2
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / t
    expected = F.cross_entropy(logits, torch.arange(6)) * 2 * t
    torch.testing.assert_close(moco_contrastive(q, k, t), expected)


def test_moco_gather_labels_are_offset_by_rank():
    """Rank r's query i must pair with gathered row B*r + i, not row i."""
    g = torch.Generator().manual_seed(1)
    k0, k1 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    q1 = k1 + 0.01 * torch.randn(4, 8, generator=g)  # rank 1's queries match rank 1's keys
    k_all = torch.cat([k0, k1])
    right = moco_contrastive(q1, k_all, 0.2, offset=4)
    wrong = moco_contrastive(q1, k_all, 0.2, offset=0)
    assert right < 0.1 < wrong


def test_mocov3_forward_uses_gathered_keys_and_rank_offset(monkeypatch):
    _, m = tiny_method("mocov3")
    views = tuple(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2))
    other = torch.randn(4, m.cfg.dim)  # what "rank 0" contributed
    monkeypatch.setattr(distributed, "all_gather", lambda x: torch.cat([other, x.detach()]))
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    out = m(Batch(views), StepInfo(0, 10))
    # reference: each view through its own encoder call, as the official code does (the step packs both)
    with torch.no_grad():
        q1, q2 = (m.predictor(m.projector(m.backbone.forward_features(v)[:, 0])) for v in views)
        k1, k2 = (m.momentum_projector(m.momentum_backbone.forward_features(v)[:, 0]) for v in views)
    t = m.cfg.temperature

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(torch.cat([other, k]), dim=1).t() / t
        return F.cross_entropy(logits, torch.arange(4) + 4) * 2 * t

    torch.testing.assert_close(out.loss, ctr(q1, k2) + ctr(q2, k1), rtol=1e-5, atol=1e-6)


def test_momentum_schedules_end_points():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == 1.0
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996)
    _, m = tiny_method("mocov3")
    # applied after step s = the official value at iteration s + 1: the last update uses m = 1
    assert m.momentum_at(StepInfo(0, 100)) == pytest.approx(cosine_momentum(0.99, 0.01))
    assert m.momentum_at(StepInfo(99, 100)) == 1.0


def test_moco_sincos_table_is_row_first_and_mae_transposed():
    g, d = 4, 16
    moco, mae = moco_sincos_pos_embed(g, d), mae_sincos_pos_embed(g, d)
    assert moco.shape == (1 + g * g, d) and torch.all(moco[0] == 0)
    # patch k = 6 is row 1, column 2; omega_0 = 1, omega_1 = 10000^(-1/4)
    w1 = 10000 ** (-1 / 4)
    assert moco[1 + 6, 0] == pytest.approx(math.sin(1.0))
    assert moco[1 + 6, 1] == pytest.approx(math.sin(1.0 * w1))
    assert moco[1 + 6, 8] == pytest.approx(math.sin(2.0))
    assert mae[1 + 6, 0] == pytest.approx(math.sin(2.0))
    for i in range(g):
        for j in range(g):
            torch.testing.assert_close(moco[1 + i * g + j], mae[1 + j * g + i], atol=1e-6, rtol=0)


def test_moco_backbone_init_and_frozen_patch_projection():
    torch.manual_seed(0)
    bb = MaskedViT(ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2),
                   BackboneOptions(pos_embed="sincos_moco", init="moco", freeze_patch_embed=True))
    w = bb.vit.patch_embed.proj.weight
    bound = math.sqrt(6 / (3 * 4 * 4 + 192))
    assert not w.requires_grad and not bb.vit.patch_embed.proj.bias.requires_grad
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(bb.vit.patch_embed.proj.bias == 0)
    qkv = bb.vit.blocks[0].attn.qkv.weight  # q, k, v each xavier: bound sqrt(6 / (D + D))
    assert qkv.abs().max() <= math.sqrt(6 / (192 + 192)) and qkv.abs().max() > 0.9 * math.sqrt(6 / 384)
    assert bb.vit.cls_token.abs().max() < 1e-4  # N(0, 1e-6)


# ---------------------------------------------------------------------------------------------- masks


def test_block_mask_count_shape_and_blocks():
    torch.manual_seed(0)
    m = block_mask(16, 14, 75)
    assert m.shape == (16, 196) and m.dtype == torch.bool
    counts = m.sum(1)
    # BEiT's generator stops when 10 tries add nothing, so a few masks fall just short of 75 (never above)
    assert torch.all(counts <= 75) and torch.all(counts >= 65) and counts.float().mean() > 73
    assert len({tuple(r.tolist()) for r in m}) == 16  # different per sample
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    grid = m.view(16, 14, 14)
    nb = torch.zeros_like(grid)
    nb[:, 1:] |= grid[:, :-1]
    nb[:, :-1] |= grid[:, 1:]
    nb[:, :, 1:] |= grid[:, :, :-1]
    nb[:, :, :-1] |= grid[:, :, 1:]
    assert (grid & nb).sum() / grid.sum() > 0.9


def test_block_mask_follows_torch_seed():
    torch.manual_seed(3)
    a = block_mask(4, 8, 24, min_patches=5)
    torch.manual_seed(3)
    assert torch.equal(a, block_mask(4, 8, 24, min_patches=5))


def test_random_block_mask_masks_whole_blocks():
    m = random_block_mask(5, 8, 2, 0.75, torch.Generator().manual_seed(0)).view(5, 4, 2, 4, 2)
    assert torch.all(m.sum(dim=(1, 2, 3, 4)) == 12 * 4)  # int(16 * 0.75) blocks of 2x2 patches
    assert torch.all(m.all(dim=(2, 4)) == m.any(dim=(2, 4)))  # each block all-or-nothing


# ---------------------------------------------------------------------------------------------- ConMIM


def test_patch_info_nce_targets_own_position_on_masked_rows():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    tau = 0.1
    terms = []
    for b in range(2):
        for j in range(5):
            if mask[b, j]:
                logits = F.normalize(s[b, j], dim=0) @ F.normalize(t[b], dim=1).t() / tau
                terms.append(F.cross_entropy(logits[None], torch.tensor([j])))
    torch.testing.assert_close(patch_info_nce(s, t, mask, tau), torch.stack(terms).mean())
    # unmasked student rows do not matter; another image's teacher tokens are not negatives
    s2, t2 = s.clone(), t.clone()
    s2[0, 1] += 5
    t2[1] = torch.randn(5, 8, generator=g)
    t2[1, 3:] = t[1, 3:]
    assert patch_info_nce(s2, t, mask, tau) == patch_info_nce(s, t, mask, tau)
    assert patch_info_nce(s, t2, mask, tau) != patch_info_nce(s, t, mask, tau)  # row 3/4 negatives changed


def test_conmim_views_student_plain_teacher_strong_same_crop():
    _, m = tiny_method("conmim")
    spec = m.views
    assert spec.shared_crop and spec.photometric == (NONE, BYOL_VIEW2) and spec.scale == (0.08, 1.0)


def test_conmim_loss_uses_caller_mask_and_teacher_sees_view_two_unmasked():
    _, m = tiny_method("conmim")
    g = torch.Generator().manual_seed(0)
    x_s, x_t = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    mask = m.controlled_inputs(4, g)["mask"]
    assert mask.shape == (4, 64) and torch.all(mask.sum(1) <= 24)
    out = m(Batch((x_s, x_t)), StepInfo(0, 10), mask=mask)
    s = m.projector(m.backbone.forward_masked(x_s, mask).reshape(-1, 192)).reshape(4, 65, -1)[:, 1:]
    with torch.no_grad():
        tb = m.teacher_backbone
        t = m.teacher_projector(tb.forward_features(x_t).reshape(-1, 192)).reshape(4, 65, -1)[:, 1:]
    torch.testing.assert_close(out.loss, patch_info_nce(s, t, mask, 0.1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- MimCo


def test_mimco_teacher_is_frozen_in_eval_mode():
    _, m = tiny_method("mimco")
    m.train()
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    assert all(not mod.training for mod in m.teacher.modules())


def test_mimco_refuses_a_teacher_without_projector(tmp_path):
    from tests.conftest import mimco_teacher

    src = mimco_teacher()
    for f in ("backbone.safetensors", "backbone.json"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    with pytest.raises(CheckpointError, match="projector.safetensors"):
        tiny_method("mimco", **{"method.teacher": str(tmp_path)})


# ---------------------------------------------------------------------------------------------- MACRL


def test_memory_bank_is_fifo():
    _, m = tiny_method("macrl", **{"method.bank_size": 5, "method.proj_dim": 2})
    bank = m.bank
    keys = [F.normalize(torch.randn(2, 2), dim=1) for _ in range(3)]
    for k in keys:
        bank.enqueue(k)
    # slots 0-1 <- batch 0, 2-3 <- batch 1, then batch 2 fills slot 4 and wraps to slot 0
    torch.testing.assert_close(bank.keys[4], keys[2][0])
    torch.testing.assert_close(bank.keys[0], keys[2][1])
    torch.testing.assert_close(bank.keys[1:4], torch.cat([keys[0][1:], keys[1]]))
    assert int(bank.ptr) == 1


def test_macrl_enqueues_both_key_sets_after_the_optimizer_step():
    _, m = tiny_method("macrl", **{"method.bank_size": 64})
    before = m.bank.keys.clone()
    kw = m.controlled_inputs(8, torch.Generator().manual_seed(0))
    m(Batch(tuple(torch.randn(8, 3, 32, 32) for _ in range(2))), StepInfo(0, 10), **kw)
    assert torch.equal(m.bank.keys, before)  # the bank is still needed by backward
    m.after_optimizer_step(StepInfo(0, 10))
    assert int(m.bank.ptr) == 16 and not torch.equal(m.bank.keys[:16], before[:16])
    assert torch.equal(m.bank.keys[16:], before[16:])


def test_bank_info_nce_positive_first():
    q = F.normalize(torch.randn(3, 4), dim=1)
    bank = F.normalize(torch.randn(7, 4), dim=1)
    logits = torch.cat([(q * q).sum(1, keepdim=True), q @ bank.t()], 1) / 0.2
    torch.testing.assert_close(bank_info_nce(q, q, bank, 0.2), F.cross_entropy(logits, torch.zeros(3).long()))


# ---------------------------------------------------------------------------------------------- views


def test_photometric_ops_match_torchvision():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for f in (-0.1, 0.07):
        torch.testing.assert_close(adjust_hue(x, torch.full((4,), f)), TF.adjust_hue(x, f), atol=1e-5, rtol=0)
    f = torch.full((4,), 1.3)
    torch.testing.assert_close(_blend(x, torch.zeros_like(x), f), TF.adjust_brightness(x, 1.3))
    torch.testing.assert_close(_blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f), TF.adjust_contrast(x, 1.3))
    torch.testing.assert_close(_blend(x, _gray(x), f), TF.adjust_saturation(x, 1.3))
    torch.testing.assert_close(gaussian_blur(x, torch.full((4,), 1.2), 3), TF.gaussian_blur(x, [7, 7], [1.2, 1.2]))


def test_photometric_probabilities():
    torch.manual_seed(0)
    x = torch.rand(2000, 3, 4, 4)
    solar = apply_photometric(x, NONE.__class__(solarize_p=0.2))
    assert 0.17 < (solar != x).flatten(1).any(1).float().mean() < 0.23
    gray = apply_photometric(x, NONE.__class__(gray_p=0.2))
    is_gray = (gray[:, 0] == gray[:, 1]).all(-1).all(-1) & (gray[:, 1] == gray[:, 2]).all(-1).all(-1)
    assert 0.17 < is_gray.float().mean() < 0.23
    assert torch.equal(apply_photometric(x, NONE), x)


@pytest.mark.parametrize("view", [BYOL_VIEW1, BYOL_VIEW2])
def test_photometric_where_path_equals_index_path(view):
    """The CUDA path (every op on every image, kept by torch.where; no host sync) against the CPU path (each op on
    its chosen images), on CPU with the same draws: the same images."""
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    by_index = apply_photometric(x, view, select_by_where=False)
    torch.manual_seed(3)
    by_where = apply_photometric(x, view, select_by_where=True)
    assert not torch.equal(by_index, x)
    torch.testing.assert_close(by_where, by_index, rtol=0, atol=1e-6)


def test_shared_crop_views_differ_only_photometrically():
    imgs = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    torch.manual_seed(0)
    a, b = TensorAugment(ViewSpec(count=2, shared_crop=True, photometric=(NONE, NONE)), 32, (0.5,) * 3,
                         (0.25,) * 3)(imgs)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c, d = TensorAugment(ViewSpec(count=2, photometric=(BYOL_VIEW1, BYOL_VIEW2)), 32, (0.5,) * 3, (0.25,) * 3)(imgs)
    assert c.shape == d.shape == (6, 3, 32, 32) and not torch.equal(c, d)
    with pytest.raises(ValueError, match="one entry per view"):
        ViewSpec(count=2, photometric=(NONE,))


# ---------------------------------------------------------------------------------------------- budget split


@pytest.mark.parametrize(("spec", "expected"), [("4m", ("120s", "120s")), ("300ep", ("150ep", "150ep")),
                                                 ("7steps", ("4steps", "3steps")), ("2e18flop", ("1e+18flop",
                                                                                                 "1e+18flop"))])
def test_split_budget(spec, expected):
    stages = split_budget(parse_budget(spec), 0.5)
    assert tuple(b.text for b in stages) == expected
    assert stages == tuple(parse_budget(t) for t in expected)  # each stage is exactly what its text says


def test_split_budget_refuses_one_step():
    with pytest.raises(BudgetError):
        split_budget(parse_budget("1steps"), 0.5)


# ---------------------------------------------------------------------------------------------- MiCL augmentation


def test_micl_without_augmentation_sees_the_whole_image_unflipped():
    """method.augment=none (the paper's no-hand-crafted-augmentation claim): the view is the image itself, on the
    batched path as on torchvision's; the default keeps the official crop + flip, and the field at its default
    leaves the config hash of every run from before it as it was."""
    cfg, m = tiny_method("micl", **{"method.augment": "none"})
    size = cfg.model.img_size
    images = torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    (view,) = TensorAugment(m.views, size, mean, std)(images)
    expected = (images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)
    crop, _ = pil_view_parts(m.views, size, mean, std)
    pil = TF.to_pil_image(images[0])
    assert all(crop(pil).tobytes() == pil.tobytes() for _ in range(5))

    cfg0, m0 = tiny_method("micl")
    assert m0.views.scale == (0.2, 1.0) and m0.views.hflip == 0.5
    assert "augment" not in cfg0.hash_inputs()["method_cfg"] and cfg.config_hash() != cfg0.config_hash()
    with pytest.raises(ConfigError, match="method.augment"):
        tiny_method("micl", **{"method.augment": "flip"})
