"""Throughput of each method's training step on CPU (tiny recipe). Reported by pytest-benchmark, never asserted."""

from __future__ import annotations

import pytest
import torch

from repro.method import Batch, StepInfo
from repro.registry import METHODS
from tests.conftest import build_method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_train_step_throughput(benchmark, name):
    _, m = build_method(name, **{"model.depth": 6})
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    batch = Batch(tuple(torch.randn(64, 3, 32, 32) for _ in range(m.views.count)))

    def step():
        out = m(batch, StepInfo(0, 100))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    benchmark.extra_info["images_per_step"] = 64
    benchmark.pedantic(step, rounds=3, iterations=1)
