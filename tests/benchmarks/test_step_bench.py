"""Throughput of each method's training step on CPU (tiny recipe, depth 6, batch 64): batched augmentation of
uint8 images (the in-memory path), forward, backward, AdamW, momentum/bank updates. Reported by
pytest-benchmark (img/s = 64 / mean), never asserted."""

from __future__ import annotations

import pytest
import torch

from repro.method import Batch, StepInfo
from repro.registry import METHODS
from repro.views import TensorAugment
from tests.conftest import tiny_method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_train_step_throughput(benchmark, name):
    _, m = tiny_method(name, **{"model.depth": 6})
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    images = (torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    augment = TensorAugment(m.views, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def step():
        out = m(Batch(augment(images)), StepInfo(0, 100))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.after_optimizer_step(StepInfo(0, 100))

    step()  # warm-up
    benchmark.extra_info["images_per_step"] = 64
    benchmark.pedantic(step, rounds=3, iterations=1)
