"""Distributed consistency on CPU (gloo): 2 ranks on halves of a batch = 1 process on the whole batch; a dead rank
ends the whole torchrun with a non-zero status instead of a hang.

Why the comparison is at the method level: in a real 2-rank run each rank re-seeds its RNG from (seed, step,
rank), so its masks and crops differ from a 1-rank run's and per-step losses cannot match. Here every rank gets
the same fixed global batch and fixed controlled inputs (``PretrainMethod.controlled_inputs``: MAE's and MiCL's
mask noise), takes its half, and runs the trainer's own step (``Trainer._step``: forward through DDP, backward,
lr, optimizer step, ``after_optimizer_step``) on the processes ``repro.distributed.init`` sets up from torchrun's
environment variables; the reference runs the same step in one process on the whole batch.

Both run in float64: the two computations differ only in summation order (and CpuSyncBatchNorm's one-pass
variance), which float64 keeps at ~1e-15 on any CPU. In float32 the same comparison drifted to 4.3e-5 by the third
MoCo v3 loss on an AVX2 kernel set, a tolerance wide enough to hide a real mismatch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from repro.budget import parse_budget
from repro.method import Batch
from repro.plan import HParams, Plan, make_plan
from repro.records import read_records
from repro.trainer import Trainer
from tests.conftest import tiny_method
from tests.reliability.conftest import sets, subprocess_env

GLOBAL_BATCH, STEPS, WORLD = 8, 3, 2
CPU = torch.device("cpu")
# (id, method, overrides): MoCo v3 gathers keys across ranks and synchronises BatchNorm; MiCL with gathered
# negatives gathers features; MAE has no cross-rank term (DDP's gradient mean alone)
# MiCL's loss groups (the official per-GPU batch as one InfoNCE): a group spanning both ranks (its features gathered)
# and two groups on each rank must give the 1-process objective on the global batch
METHODS = [("mocov3", "mocov3", {}), ("mae", "mae", {}), ("micl-gather", "micl", {"method.gather_negatives": True}),
           ("micl-group-spans-ranks", "micl", {"method.loss_group_size": 8}),
           ("micl-groups-within-ranks", "micl", {"method.loss_group_size": 2})]
# float64 sums in another order: measured (this comparison under
# ATEN_CPU_CAPABILITY=default, avx2, avx512) at most 3.2e-15 relative in a loss and 1.1e-14 absolute in a weight
# (MoCo v3; MAE and MiCL 4e-16 / 2e-16). The tolerances keep a ~100x margin above that; a float32 layer
# anywhere in the path (a BatchNorm rebuilt in float32 by the SyncBN conversion did exactly that) shows as ~1e-7.
LOSS_RTOL, STATE_RTOL, STATE_ATOL = 1e-12, 1e-10, 1e-12


def plan() -> Plan:
    hp = HParams(global_batch=GLOBAL_BATCH, lr=0.05, min_lr=0.05, weight_decay=0.0, betas=(0.9, 0.95),
                 warmup_fraction=0.0)
    return make_plan(hp, parse_budget(f"{STEPS}steps"), steps_per_epoch=1, total_steps=STEPS)


def fixed_step_inputs(method, step: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """The global batch of ``step`` and its controlled inputs: the same tensors in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    views = tuple(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
                  for _ in range(method.views.count))
    return views, method.controlled_inputs(GLOBAL_BATCH, generator=g)


def train_steps(name: str, overrides: dict, rank: int, world: int, wrap) -> tuple[list[float], dict]:
    """STEPS trainer steps of one method on this rank's share of the fixed batches; per-step rank-mean losses and
    the final state dict."""
    from repro import distributed

    cfg, method = tiny_method(name, seed=0, **overrides)  # the same initial weights in every process
    method.double()
    model = wrap(method)
    p = plan()
    # plain SGD: AdamW would turn float noise in gradients that are zero in exact arithmetic (e.g. the attention
    # key bias, which softmax ignores) into +-lr steps, so the weights of two exact computations would differ by lr
    opt = torch.optim.SGD([q for q in method.parameters() if q.requires_grad], lr=p.lr)
    share = GLOBAL_BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    losses = []
    for step in range(STEPS):
        views, controlled = fixed_step_inputs(method, step)
        local = {k: v[rows] for k, v in controlled.items()}
        host = SimpleNamespace(model=lambda b, i, kw=local: model(b, i, **kw), cfg=cfg, method=method, device=CPU,
                               precision="fp32")
        out = Trainer._step(host, step, Batch(tuple(v[rows] for v in views)), p, opt)
        losses.append(float(distributed.all_reduce_mean(out.loss.detach())))
    return losses, {k: v.detach().clone() for k, v in method.state_dict().items()}


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from repro import distributed

    info = distributed.init("cpu", timeout_s=60)
    assert (info.rank, info.world_size, info.backend) == (rank, WORLD, "gloo")
    try:
        def wrap(m):
            return distributed.wrap_ddp(m, CPU, sync_bn=m.sync_batchnorm)

        results = {mid: train_steps(name, over, rank, WORLD, wrap) for mid, name, over in METHODS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process() -> dict:
    torch.set_num_threads(1)
    return {mid: train_steps(name, over, 0, 1, lambda m: m) for mid, name, over in METHODS}


@pytest.mark.slow
@pytest.mark.parametrize("mid", [m[0] for m in METHODS])
def test_ranks_agree_and_first_loss_is_the_global_batch_loss(two_ranks, one_process, mid):
    (l0, s0), (l1, s1) = two_ranks[0][mid], two_ranks[1][mid]
    assert l0 == l1  # every rank reports the same mean loss ...
    for k, v in s0.items():
        assert torch.equal(v, s1[k]), f"{k}: ranks diverged"  # ... and holds the same weights
    # step 0, same weights: forward, gathered keys/negatives and synchronised BN see the global batch
    assert l0[0] == pytest.approx(one_process[mid][0][0], rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("mid", [m[0] for m in METHODS])
def test_two_ranks_train_like_one_process_on_the_global_batch(two_ranks, one_process, mid):
    (losses, state), (ref_losses, ref_state) = two_ranks[0][mid], one_process[mid]
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(ref_losses, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0.0)
    assert state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert state[k].dtype == v.dtype, f"{k}: {state[k].dtype} != {v.dtype}"  # e.g. a BN rebuilt in float32
        torch.testing.assert_close(state[k], v, rtol=STATE_RTOL, atol=STATE_ATOL, msg=lambda m, k=k: f"{k}: {m}")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.slow
def test_a_dead_rank_ends_the_whole_run_without_hanging(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "repro.run", "mae", "--budget", "500steps", "--evals", "none", "--no-progress", "--no-report",
           "--out", str(out), "--results", str(results), *sets(train__log_every=1)]
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not list(out.glob("*/mae/*/metrics.jsonl")):  # both ranks are training
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()
                time.sleep(0.05)
            workers = {_rank_of(c): c for c in _children(proc.pid)}
            assert set(workers) == {0, 1}, workers
            os.kill(workers[1], signal.SIGKILL)
            t0 = time.monotonic()
            rc = proc.wait(timeout=90)
            waited = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc != 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    assert waited < 60, f"torchrun took {waited:.0f}s to notice a dead rank"
    assert not Path(f"/proc/{workers[0]}").exists() or _rank_of(workers[0]) is None  # rank 0 did not outlive it
    recs, _ = read_records(results / "records" / "builtin-shapes.jsonl")
    assert not [r for r in recs if r.status == "ok"]
