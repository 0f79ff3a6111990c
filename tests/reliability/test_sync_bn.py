"""CpuSyncBatchNorm on 2 gloo ranks equals one BatchNorm1d over the concatenated batch (forward, grads, stats)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from repro.distributed import CpuSyncBatchNorm, convert_sync_bn, wrap_ddp


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g) * 3 + 1, torch.randn(8, 5, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, w = _data()
        bn = convert_sync_bn(nn.Sequential(nn.BatchNorm1d(5)), torch.device("cpu"))[0]
        assert isinstance(bn, CpuSyncBatchNorm)
        xs = x[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        y = bn(xs)
        (y * w[rank * 4:(rank + 1) * 4]).sum().backward()
        torch.save({"y": y.detach(), "gx": xs.grad, "gw": bn.weight.grad, "rm": bn.running_mean,
                    "rv": bn.running_var}, os.path.join(out_dir, f"r{rank}.pt"))
        # the layer keeps its dtype (a float64 model stays float64), and a method whose official code keeps BN
        # statistics per device (ConMIM) gets no conversion
        bn64 = convert_sync_bn(nn.Sequential(nn.BatchNorm1d(5).double()), torch.device("cpu"))[0]
        assert isinstance(bn64, CpuSyncBatchNorm) and bn64.weight.dtype == bn64.running_var.dtype == torch.float64
        head = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))
        assert type(wrap_ddp(head, torch.device("cpu"), sync_bn=False).module[1]) is nn.BatchNorm1d
        assert isinstance(wrap_ddp(head, torch.device("cpu"), sync_bn=True).module[1], CpuSyncBatchNorm)
        dist.barrier()  # both ranks done before teardown (gloo threads torn down mid-send abort the process)
    finally:
        dist.destroy_process_group()


def test_cpu_sync_bn_matches_full_batch_bn():
    x, w = _data()
    ref = nn.BatchNorm1d(5)
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y * w).sum().backward()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d), nprocs=2, join=True)
        parts = [torch.load(os.path.join(d, f"r{r}.pt"), weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["gx"] for p in parts]), xr.grad, rtol=1e-4, atol=1e-5)
    # each rank's affine grads are its share; DDP's all-reduce (mean) of 2 shares x 2 = the full-batch grad
    torch.testing.assert_close(parts[0]["gw"] + parts[1]["gw"], ref.weight.grad, rtol=1e-4, atol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["rm"], ref.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p["rv"], ref.running_var, rtol=1e-4, atol=1e-5)
