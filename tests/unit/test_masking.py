from __future__ import annotations

import pytest
import torch

from repro.masking import draw_noise, len_keep_even, len_keep_mae, random_masking


@pytest.mark.parametrize(("ratio", "expected"), [(0.9, 18), (0.8, 38), (0.75, 48)])
def test_micl_len_keep_is_even_and_matches_spec(ratio, expected):
    assert len_keep_even(196, ratio) == expected


def test_mae_len_keep():
    assert len_keep_mae(196, 0.75) == 49
    assert len_keep_mae(64, 0.75) == 16


def test_random_masking_convention_and_inverse():
    torch.manual_seed(0)
    noise = torch.rand(4, 196)
    m = random_masking(noise, 49)
    assert m.mask.dtype == torch.bool
    assert m.mask.sum(1).tolist() == [147] * 4  # True = masked
    # kept indices are exactly the unmasked positions, and the smallest noise is kept
    for b in range(4):
        assert set(m.ids_keep[b].tolist()) == set((~m.mask[b]).nonzero().flatten().tolist())
        assert noise[b, m.ids_keep[b]].max() < noise[b, m.mask[b]].min()
    # ids_restore inverts ids_shuffle
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(196).expand(4, -1))


def test_caller_noise_fixes_the_mask():
    noise = torch.rand(2, 64)
    a, b = random_masking(noise, 16), random_masking(noise.clone(), 16)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    with pytest.raises(ValueError, match="shape"):
        draw_noise(2, 65, torch.device("cpu"), noise)


def test_bad_ratio_and_len_keep_rejected():
    with pytest.raises(ValueError):
        len_keep_mae(196, 1.0)
    with pytest.raises(ValueError):
        random_masking(torch.rand(2, 8), 0)


@pytest.mark.gpu
def test_mask_copy_to_cuda_compiles():
    """Under torch.compile a CPU-made mask is copied plainly (a pinned-memory copy cannot be traced): ConMIM's
    compiled step failed on the H200 with 'NYI: aten._pin_memory' before this."""
    from repro.masking import to_device_async

    cuda = torch.device("cuda")

    @torch.compile
    def f(x, mask):
        return x * to_device_async(mask, cuda)

    mask = torch.rand(4, 8) > 0.5
    x = torch.ones(4, 8, device=cuda)
    torch.testing.assert_close(f(x, mask), mask.to(cuda).float())
