from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from repro.losses import masked_l1, masked_mse, normalized_pixel_target, symmetric_tsp_info_nce, tsp_similarity


def test_tsp_hand_values():
    k, t = 1 / 64, 0.07
    c = torch.tensor([1.0, -1.0, 0.0, 0.5])
    got = tsp_similarity(c, k, t)
    expected = [1 / t, 0.0, 0.5 / (1 + k) / t, 0.5 * 1.5 / (1 + k * 0.5) / t]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_tsp_kappa_zero_is_linear():
    c = torch.linspace(-1, 1, 11)
    torch.testing.assert_close(tsp_similarity(c, 0.0, 0.5), (1 + c) / (2 * 0.5))


def test_symmetric_tsp_info_nce_matches_hand_computation():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    k, t = 1 / 64, 0.07

    def ce(logits):  # explicit log-softmax of the diagonal
        return sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(5)) / 5

    s = an @ bn.t()
    expected = 0.5 * (ce(0.5 * (1 + s) / (1 + k * (1 - s)) / t) + ce(0.5 * (1 + s.t()) / (1 + k * (1 - s.t())) / t))
    got = symmetric_tsp_info_nce(a, b, kappa=k, temperature=t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_symmetric_loss_with_gathered_negatives_offsets_labels():
    torch.manual_seed(1)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    other_a, other_b = torch.randn(3, 4), torch.randn(3, 4)
    full_a, full_b = torch.cat([other_a, a]), torch.cat([other_b, b])
    got = symmetric_tsp_info_nce(a, b, kappa=0.1, temperature=0.2, a_all=full_a, b_all=full_b, offset=3)
    # same as rows 3..5 of the full-batch loss computed per direction
    an, bn = F.normalize(full_a, dim=1), F.normalize(full_b, dim=1)
    lab = torch.arange(3, 6)
    l1 = F.cross_entropy(tsp_similarity(an[3:] @ bn.t(), 0.1, 0.2), lab)
    l2 = F.cross_entropy(tsp_similarity(bn[3:] @ an.t(), 0.1, 0.2), lab)
    torch.testing.assert_close(got, 0.5 * (l1 + l2))


def test_norm_pix_target_uses_unbiased_variance():
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 3)  # unbiased: divide by n - 1
    expected = (x - mean) / math.sqrt(var + 1e-6)
    torch.testing.assert_close(normalized_pixel_target(x), expected)


def test_masked_losses_ignore_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    mask = torch.tensor([[True, False, True, False, False, False], [False] * 5 + [True]])
    base = masked_mse(pred, target, mask)
    pred2 = pred.clone()
    pred2[~mask] += 100.0  # visible patches do not count
    torch.testing.assert_close(masked_mse(pred2, target, mask), base)
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(base, per_patch[mask].mean())
    torch.testing.assert_close(masked_l1(pred, target, mask), (pred - target).abs().mean(-1)[mask].mean())
