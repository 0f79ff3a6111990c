"""The data path, timed: the batch source alone, and the training step fed by it against one synthetic batch."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from repro.bench.steps import build, device_name, make_step, model_config, sync, synthetic_batch


@dataclass
class DataRow:
    device: str
    tag: str
    model: str
    method: str
    batch: int
    source: str
    loader_img_per_s: float
    synthetic_img_per_s: float
    real_img_per_s: float
    ratio: float
    date: str


def bench_data(method_name: str, model: str, batch: int, data: Any, *, precision: str, steps: int, warmup: int,
               device: torch.device, tag: str, scratch: Path, sets: dict[str, Any], num_workers: int,
               decode: str = "fast", with_step: bool = True) -> DataRow:
    """img/s of the batch source alone, and (``with_step``) of the training step fed by it vs by one synthetic batch.

    ``data``: the :class:`repro.data.DatasetSplits` from :func:`repro.data.load_data`."""
    from repro.data import TensorImages
    from repro.sources import StepSampler, make_batch_source, resolve_workers

    cfg = model_config(method_name, model, batch, compile=False, precision=precision, sets=sets)
    torch.manual_seed(0)
    method = build(cfg, device, scratch)
    size = method.backbone.img_size
    sampler = StepSampler(len(data.train), batch, seed=0)
    source = make_batch_source(data, method.views, size, sampler, device,
                               replace(cfg.data, num_workers=num_workers, decode=decode))
    kind = "in-memory on " + device.type if isinstance(data.train, TensorImages) \
        else f"decode={decode}, DataLoader x{resolve_workers(num_workers)}"

    def img_per_s(run: Callable[[int], Any]) -> float:
        """Wall clock over ``steps`` calls after ``warmup`` (device synced at both ends): the same clock for the
        source alone, the synthetic step and the real step, so their ratio is like for like."""
        for i in range(warmup):
            run(i)
        sync(device)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            run(i)
        sync(device)
        return steps * batch / (time.perf_counter() - t0)

    it = source.batches(0, warmup + steps)
    loader_ips = img_per_s(lambda i: next(it))
    it.close()
    if not with_step:
        nan = float("nan")
        return DataRow(device_name(device), tag, model, method_name, batch, kind, loader_ips, nan, nan, nan,
                       _dt.date.today().isoformat())
    step = make_step(cfg, method, device)
    fixed = synthetic_batch(method, batch, device)
    synth = img_per_s(lambda i: step(fixed, i))
    it = source.batches(0, warmup + steps)  # the batch is produced inside the timed loop, as in training
    real = img_per_s(lambda i: step(next(it), i))
    it.close()
    return DataRow(device_name(device), tag, model, method_name, batch, kind, loader_ips, synth, real,
                   real / synth, _dt.date.today().isoformat())
