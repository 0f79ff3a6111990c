from __future__ import annotations

import torch

from evals.knn import knn_predict
from evals.linear import Settings, accuracies, holdout_size, holdout_split, train_probes


def clusters(n_per=40, k=4, d=16, noise=0.3, seed=0):
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(123)) * 3  # same classes for every seed
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per)
    x = centres[y] + noise * torch.randn(len(y), d, generator=g)
    return x, y


def test_knn_recovers_clusters_and_weights_votes():
    x, y = clusters()
    xt, yt = clusters(seed=1)
    assert (knn_predict(x, y, xt, 4, k=20, temperature=0.07) == yt).float().mean() > 0.95
    # weighted vote: one very close neighbour of class 1 beats two far ones of class 0
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    lab = torch.tensor([1, 0, 0])
    q = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train, lab, q, 2, k=3, temperature=0.07).item() == 1


def test_linear_probe_learns_separable_features():
    x, y = clusters(n_per=100)
    # LARS moves a probe by ~ lr * 0.001 * |w| per step: small data needs a large base lr (hence the tiny sweep)
    cfg = Settings(linear_epochs=20, linear_warmup_epochs=2, linear_batch_size=64, linear_base_lrs=(0.1, 10.0))
    probes = train_probes(x, y, 4, cfg.linear_base_lrs, cfg, seed=0)
    xt, yt = clusters(n_per=50, seed=1)
    assert max(accuracies(probes, xt, yt)) > 95.0
    assert len(probes.heads) == 2 and not probes.bn.affine


def test_holdout_split_is_disjoint_and_covering():
    fit, val = holdout_split(100, 10, seed=0)
    assert len(val) == 10 and not set(fit.tolist()) & set(val.tolist())
    assert sorted(fit.tolist() + val.tolist()) == list(range(100))


def test_holdout_is_5000_capped_at_a_fifth_of_small_sets():
    assert holdout_size(50_000, 5000) == 5000
    assert holdout_size(10_000, 5000) == 2000  # cifar10-cpu's 10k train subset
    assert holdout_size(5000, 5000) == 1000  # the built-in demo
    assert holdout_size(3, 5000) == 1
