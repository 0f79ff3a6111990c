"""The only module that imports ``torch.distributed``: init from torchrun's environment, DDP, gathers.

The same command runs on one CPU, one GPU or many nodes: ``torchrun --nproc-per-node K -m repro.run ...``.
On a single process every collective here is the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from repro.losses import at_least_fp32


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init(device_pref: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, nccl on CUDA."""
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = None
    if ws > 1 and not is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda and ws == 1:
        torch.cuda.set_device(device)
    return DistInfo(rank(), world_size(), local_rank, device, backend)


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient (MoCo's ``concat_all_gather``)."""
    if not is_initialized():
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 **with gradient**: the backward sums, for each rank's rows,
    the gradients every rank's loss sends them (``torch.distributed.nn.all_gather``), so after DDP's averaging
    the update equals the one of a single process on the global batch (a row used as another rank's negative
    gets that gradient too; a local-only gradient would lose it)."""
    if not is_initialized():
        return x
    from torch.distributed.nn.functional import all_gather as all_gather_autograd

    return torch.cat(all_gather_autograd(x.contiguous()), dim=0)


def all_reduce_mean(x: Tensor) -> Tensor:
    if not is_initialized():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def all_reduce_max(x: Tensor) -> Tensor:
    if not is_initialized():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


class CpuSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics span every rank, for gloo/CPU runs (``nn.SyncBatchNorm`` is CUDA-only).

    The row count and sum of x, then the sum of squared deviations from the global mean, are all-reduced with
    autograd (``torch.distributed.nn``), so the forward and backward equal one BatchNorm over the concatenated
    global batch. Two passes, not E[x^2] - mean^2, which cancels when mean^2 >> var. Running statistics use the
    unbiased global variance, like ``nn.SyncBatchNorm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_initialized() and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as all_reduce_autograd

        c = x.shape[1]
        xf = at_least_fp32(x)
        total = all_reduce_autograd(torch.cat([xf.sum(0), xf.new_full((1,), float(x.shape[0]))]))
        n = total[-1]
        mean = total[:c] / n
        var = all_reduce_autograd((xf - mean).pow(2).sum(0)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm synchronised across ranks: ``nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm`
    (BatchNorm1d only; parameters and buffers carried over) elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, CpuSyncBatchNorm):
            like = child.weight if child.affine else child.running_mean  # keep the layer's dtype and device
            new = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=None if like is None else like.device,
                                   dtype=None if like is None else like.dtype)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.requires_grad_(any(p.requires_grad for p in child.parameters()) if child.affine else False)
            setattr(module, name, new)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CpuSyncBatchNorm):
            raise NotImplementedError(f"{name}: synchronised {type(child).__name__} on CPU is not implemented")
        else:
            convert_sync_bn(child, device)
    return module


def wrap_ddp(module: nn.Module, device: torch.device, *, sync_bn: bool = True) -> nn.Module:
    """DDP on more than one process, else the module itself. ``sync_bn``: BatchNorm statistics span every rank
    (what MoCo v3's code does); False keeps them per device (ConMIM's code)."""
    if not is_initialized():
        return module
    if sync_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        module = convert_sync_bn(module, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
