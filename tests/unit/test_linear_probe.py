"""The linear probe's lr sweep: each head of the one-pass sweep is the probe its lr alone trains, and the grid is
widened when the choice sits on its edge."""

from __future__ import annotations

import pytest
import torch

import evals.linear as linear
from evals.linear import Settings, accuracies, select_lr, selection_text, train_probes


def clusters(n_per: int, seed: int, k: int = 4, d: int = 16, noise: float = 1.5):
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per)
    return centres[y] + noise * torch.randn(len(y), d, generator=g), y


def test_each_head_of_the_sweep_equals_its_lr_trained_alone():
    x, y = clusters(60, seed=0)
    xt, yt = clusters(30, seed=1)
    cfg = Settings(linear_epochs=6, linear_warmup_epochs=2, linear_batch_size=50, linear_base_lrs=(0.3, 3.0, 30.0))
    together = train_probes(x, y, 4, cfg.linear_base_lrs, cfg, seed=5)
    acc_together = accuracies(together, xt, yt)
    for i, lr in enumerate(cfg.linear_base_lrs):
        alone = train_probes(x, y, 4, (lr,), cfg, seed=5)
        joint, single = together.heads[i], alone.heads[0]
        torch.testing.assert_close(joint.weight, single.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(joint.bias, single.bias, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(together.bn.running_mean, alone.bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(together.bn.running_var, alone.bn.running_var, rtol=0, atol=0)
        assert accuracies(alone, xt, yt)[0] == acc_together[i]
    # the heads did train apart (the equality above is not of untouched inits)
    w = [h.weight for h in together.heads]
    assert not torch.allclose(w[0], w[2])


class FakeProbes:
    def __init__(self, lrs: tuple[float, ...]) -> None:
        self.lrs = lrs


@pytest.fixture
def peaked(monkeypatch):
    """train_probes/accuracies stand-ins: held-out accuracy is a function of the lr alone; records each pass."""
    passes: list[tuple[float, ...]] = []
    best = {"lr": 0.01}

    def fake_train(x, y, c, lrs, cfg, seed):
        passes.append(tuple(lrs))
        return FakeProbes(tuple(lrs))

    def fake_acc(probes, x, y):
        return [100 - abs(torch.tensor(lr).log10().item() - torch.tensor(best["lr"]).log10().item())
                for lr in probes.lrs]

    monkeypatch.setattr(linear, "train_probes", fake_train)
    monkeypatch.setattr(linear, "accuracies", fake_acc)
    return passes, best


def test_a_choice_on_the_low_edge_widens_the_grid_downwards_training_only_new_heads(peaked):
    passes, _ = peaked
    cfg = Settings(linear_base_lrs=(1.0, 10.0))
    t = torch.zeros(1)
    sel = select_lr(t, t, t, t, 2, cfg, seed=0)
    assert passes == [(1.0, 10.0), (0.1,), (0.01,), (0.001,)]
    assert sel.lr == 0.01 and sel.grid == [0.001, 0.01, 0.1, 1.0, 10.0] and sel.widened == [0.1, 0.01, 0.001]
    text = selection_text(sel, cfg, 1000, 5000)
    assert "base_lr 0.01 chosen from [0.001, 0.01, 0.1, 1.0, 10.0]" in text
    assert "widened 3x at its edge: 0.1, 0.01, 0.001" in text and "still" not in text
    assert "held-out 1000 of the 5000 training images" in text


def test_widening_is_bounded_and_an_interior_choice_does_not_widen(peaked):
    passes, best = peaked
    best["lr"] = 1e6  # always better higher up: stops after linear_widenings
    cfg = Settings(linear_base_lrs=(1.0, 3.0, 9.0), linear_widenings=2)
    t = torch.zeros(1)
    sel = select_lr(t, t, t, t, 2, cfg, seed=0)
    assert sel.grid == [1.0, 3.0, 9.0, 27.0, 81.0] and sel.lr == 81.0 and len(passes) == 3
    assert "(still on the grid's edge)" in selection_text(sel, cfg, 10, 50)
    passes.clear()
    best["lr"] = 3.0
    sel = select_lr(t, t, t, t, 2, cfg, seed=0)
    assert passes == [(1.0, 3.0, 9.0)] and sel.lr == 3.0 and not sel.widened


def test_bad_linear_settings_are_refused():
    from repro.config import ConfigError

    for bad in ({"linear_base_lrs": (1.0, 0.1)}, {"linear_base_lrs": ()}, {"linear_holdout": 0},
                {"linear_widenings": -1}):
        with pytest.raises(ConfigError):
            Settings(**bad)  # type: ignore[arg-type]
