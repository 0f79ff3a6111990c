"""The one training loop every method runs through.

bf16 autocast or fp32, as ``train.precision`` resolves on the device (:mod:`repro.precision`; bf16 on CUDA, fp32 on
CPU unless asked); AdamW (fused on CUDA) or LARS with the method's weight-decay rule; per-iteration linear warmup
then half-cycle cosine; optional gradient clipping; a non-finite-loss guard; periodic atomic checkpoints and
automatic resume; tqdm on rank 0; JSONL metrics. The hot path has no host sync: losses
are accumulated on the device and read only at logging steps.

:meth:`Trainer.fit` is the loop and its calls, like MAE's ``train_one_epoch``; the parts it calls each do one thing:

- planning (:mod:`repro.plan`): the budget becomes a fixed :class:`repro.plan.Plan` before the first real step. For a
  wall-clock budget a few warm steps are timed on a snapshot of the model (:meth:`Trainer._calibrate`; then the
  snapshot is restored and the optimizer state dropped, so calibration leaves no trace in the weights), the budget is
  divided by the measured seconds per step, and rank 0's plan is broadcast; while the run trains, a
  :class:`repro.plan.Replanner` re-fits its remaining steps to the budget from the speed it measures;
- :class:`Checkpoints`: resume from the newest good checkpoint (same plan: same step count, same schedule), the
  periodic cadence, the save;
- :class:`Preemption`: SIGTERM/SIGUSR1 (``repro.signals``) stop every rank at one step boundary, checkpoint saved;
- :class:`TrainLog`: the metrics: device-side loss sums, ``metrics.jsonl``, TensorBoard, tqdm, the data-wait share.

Exact resume: the data order is a function of (seed, epoch), and the global RNG is re-seeded from
(seed, step, rank) before every step, so masks, crops and drop-path draws of step ``s`` do not depend on
what ran before. On CPU a killed-and-resumed run ends with bit-identical weights. The same holds when the newest
checkpoint fails its checksum and the run resumes from the previous one (``repro.checkpoint`` keeps two): the steps
in between are replayed exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
from timm.optim import Lars
from torch import nn
from tqdm import tqdm

from repro import distributed
from repro.budget import Budget, Calibration, format_seconds
from repro.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    atomic_write_text,
    remove_stale_temps,
    resume_checkpoint,
    save_checkpoint,
)
from repro.config import RunConfig
from repro.data import DatasetSplits
from repro.distributed import DistInfo
from repro.errors import NonFiniteLoss
from repro.export import Pretraining
from repro.method import Batch, PretrainMethod, StepInfo, StepOutput
from repro.monitor import open_tensorboard
from repro.plan import (
    Plan,
    Replanner,
    describe_plan,
    lr_at,
    make_plan,
    plan_from_dict,
    progress_at,
    resolve_hparams,
    steps_bought,
)
from repro.precision import autocast
from repro.records import DATA_BOUND_SHARE
from repro.seeds import step_seed
from repro.signals import Preempted, StopRequest
from repro.sources import StepSampler, make_batch_source

log = logging.getLogger(__name__)

CALIBRATION_STEPS = 10**9
"""The step count of the plan calibration steps run under: a schedule that has barely begun (``StepInfo.progress``
~0), whatever the budget turns out to buy."""


@dataclass(frozen=True)
class TrainResult:
    plan: Plan
    steps: int
    pretrain_seconds: float
    images_per_second: float
    final_loss: float
    device: str
    world_size: int
    resumed: bool
    data_wait_share: float = 0.0
    """Share of this segment's wall-clock the loop spent waiting for its next batch (:data:`DATA_BOUND_SHARE`)."""
    precision: str = ""
    """The resolved ``train.precision`` the steps ran in ('fp32' or 'bf16'); goes into the export and its records."""

    def facts(self, recipe: str) -> Pretraining:
        """What this run planned and measured, as its export states it and its records carry it."""
        p = self.plan
        return Pretraining(
            recipe=recipe, pretrain_seconds=self.pretrain_seconds,
            device_hours=self.pretrain_seconds * self.world_size / 3600, images_per_second=self.images_per_second,
            final_loss=self.final_loss, data_wait_share=self.data_wait_share, device=self.device,
            world_size=self.world_size, epochs=p.epochs, global_batch=p.global_batch, lr=p.lr,
            warmup_steps=p.warmup_steps, flops_per_image=p.flops_per_image,
            seconds_per_step_calibrated=p.seconds_per_step, calibration_seconds=p.calibration_seconds,
            planned_steps=p.first_total if p.revisions else None, revisions=p.revisions)


def weight_decay_groups(method: PretrainMethod, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups, decayed or not by the method's declared :class:`WeightDecayRule`."""
    rule = method.weight_decay_rule  # every method class declares one (PretrainMethod.__init_subclass__)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for n, p in method.named_parameters():
        if p.requires_grad:
            (decay if rule.decays(n, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(method: PretrainMethod, cfg: RunConfig, plan: Plan, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or LARS) over the trainable parameters, weight decay on those the method's rule selects."""
    groups = weight_decay_groups(method, plan.weight_decay)
    if cfg.train.optimizer == "lars":
        return Lars(groups, lr=plan.lr, momentum=0.9)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=plan.lr, betas=plan.betas, fused=fused, foreach=None if fused else True)


def train_step(model: nn.Module, method: PretrainMethod, batch, info: StepInfo, opt: torch.optim.Optimizer,
               lr: float, *, precision: str, clip_grad: float | None = None):
    """One optimizer step: the forward in ``precision`` (resolved: 'bf16' autocast or 'fp32'), backward, optional
    clipping, the lr of every group (times its ``lr_scale``), the update, and the method's post-step hook. No host
    sync.

    ``model`` is what runs the forward (the method, or its DDP / compiled wrapper). The bench times this function.
    """
    with autocast(batch.views[0].device, precision):
        out = model(batch, info)
    out.loss.backward()
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(method.parameters(), clip_grad)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.after_optimizer_step(info)
    return out


# ---------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Finals:
    """What a finished run reports; kept in its complete checkpoint, so a kill before the export loses none of it."""

    final_loss: float
    images_per_second: float
    data_wait_share: float


@dataclass(frozen=True)
class Resumed:
    """A run's state as its newest good checkpoint holds it."""

    plan: Plan
    step: int
    """The next step to run."""
    elapsed: float
    """Wall-clock the steps before it took (earlier segments)."""
    model: dict[str, Any]
    optimizer: dict[str, Any]
    finals: Finals
    """A complete checkpoint's numbers (a run killed after its last step, before its export); defaults otherwise."""


class Checkpoints:
    """A run's checkpoints: resume from the newest good one, the periodic cadence (``train.ckpt_every_s``, measured
    on rank 0 from :meth:`count_from`) and the save (rank 0 writes ``checkpoint.pt`` atomically; the one it replaces
    is kept as the previous one)."""

    def __init__(self, run_dir: Path, config_hash: str, every_s: float, main: bool) -> None:
        self.path = Path(run_dir) / CHECKPOINT
        self.config_hash, self.every_s, self.main = config_hash, every_s, main
        self.last = time.perf_counter()

    def resume(self) -> Resumed | None:
        """The state to continue from (None: start at step 0). A checkpoint of another configuration is an error."""
        if self.main and self.path.parent.is_dir():
            remove_stale_temps(self.path.parent)  # half-written files of a killed run; never loaded, only disk
        # the newest checkpoint that passes its checksum: a corrupted newest one falls back to the previous one,
        # whose steps are then replayed exactly (data order and RNG are functions of seed and step)
        found = resume_checkpoint(self.path)
        if found is None:
            return None
        state, used, skipped = found
        if self.main:
            for line in skipped:
                log.warning("%s; resuming from the previous checkpoint %s (step %s)", line, used.name,
                            state.get("step"))
        if state.get("config_hash") != self.config_hash:
            raise CheckpointError(f"{used}: written by a different configuration "
                                  f"({state.get('config_hash')} != {self.config_hash}); use another --out")
        finals = Finals(float(state.get("final_loss", float("nan"))), float(state.get("images_per_second", 0.0)),
                        float(state.get("data_wait_share", 0.0)))
        return Resumed(plan_from_dict(state["plan"]), int(state["step"]), float(state["elapsed"]), state["model"],
                       state["optimizer"], finals)

    def count_from(self, now: float) -> None:
        """The next periodic checkpoint is due ``every_s`` seconds after ``now``."""
        self.last = now

    def due(self, now: float) -> bool:
        """Whether rank 0 wants a periodic checkpoint (the other ranks learn it at the logging step's all-reduce)."""
        return self.main and now - self.last >= self.every_s

    def save(self, step: int, elapsed: float, plan: Plan, method: nn.Module, opt: torch.optim.Optimizer, *,
             finals: Finals | None = None) -> None:
        """The checkpoint of step boundary ``step``, complete when ``finals`` are given (rank 0 writes)."""
        if not self.main:
            return
        state = {"model": method.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                 "plan": asdict(plan), "config_hash": self.config_hash, "complete": finals is not None,
                 **(asdict(finals) if finals is not None else {})}
        save_checkpoint(self.path, state)


# ---------------------------------------------------------------------------------------------- pre-emption


class Preemption:
    """SIGTERM/SIGUSR1 while the loop runs (:class:`repro.signals.StopRequest`, caught while this is entered): every
    rank stops at one step boundary with the checkpoint of that boundary saved, then :class:`Preempted`. One process
    stops at the next step; several agree at the next logging step (the all-reduce of :meth:`Trainer._at_log_step`)."""

    def __init__(self, run_dir: Path, world_size: int) -> None:
        self.request = StopRequest()
        self.run_dir, self.world_size = run_dir, world_size

    def __enter__(self) -> Preemption:
        self.request = StopRequest()  # a signal before this segment (or during an earlier one) is not this one's
        self.request.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.request.restore()

    @property
    def signum(self) -> int:
        """The signal received (0: none)."""
        return self.request.signum

    def stops_here(self, done: int, total: int) -> bool:
        """Whether a single process stops at step boundary ``done`` (never after the last step: the run is done)."""
        return self.world_size == 1 and bool(self.request.signum) and done < total

    def stop(self, signum: int, done: int, save: Callable[[], None]) -> NoReturn:
        save()
        distributed.barrier()  # no rank leaves before rank 0's checkpoint is on disk
        raise Preempted(signum, done, self.run_dir)


# ---------------------------------------------------------------------------------------------- metrics


class _Accumulator:
    """Device-side running sums between logging steps (no host sync) and the first non-finite step."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        # float64: a float64 run (the golden tests) logs its losses unrounded; sums of fp32 losses are exact
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.logs_sum: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, out: StepOutput, step: int) -> None:
        loss = out.loss.detach()
        self.first_bad = torch.where(~torch.isfinite(loss) & (self.first_bad < 0),
                                     torch.full_like(self.first_bad, step), self.first_bad)
        self.loss_sum += loss
        for k, v in out.logs.items():
            self.logs_sum[k] = self.logs_sum.get(k, 0.0) + v.detach().double()
        self.n += 1

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.logs_sum, self.n = {}, 0


class TrainLog:
    """The metrics of one training segment (from ``start``, at ``t0``): the loss and logs summed on the device between
    logging steps, the time spent waiting for batches, and at each logging step one ``metrics.jsonl`` line (with
    TensorBoard and the tqdm bar) on rank 0; once, the time the rest will take."""

    def __init__(self, run_dir: Path, name: str, dist: DistInfo, plan: Plan, *, start: int, t0: float, progress: bool,
                 tensorboard: bool) -> None:
        self.path, self.name, self.main = run_dir / "metrics.jsonl", name, dist.rank == 0
        self.board = open_tensorboard(tensorboard and self.main, run_dir)
        self.bar = tqdm(total=plan.total_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
                        desc=f"{name} pretrain", leave=True)
        self.acc = _Accumulator(dist.device)
        self.start, self.t0 = start, t0
        self.t_log, self.step_log = t0, start
        self.wait_log = self.wait_total = 0.0  # seconds in next(batches): this logging interval, this segment
        self.last_loss = float("nan")
        self.eta_logged = start > 0 or plan.budget_kind == "time"  # a wall-clock plan states its time already

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.board is not None:
            self.board.close()
        self.bar.close()

    def wait_for(self, batches: Iterator[Batch]) -> Batch:
        t = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - t
        self.wait_log, self.wait_total = self.wait_log + waited, self.wait_total + waited
        return batch

    def add(self, out: StepOutput, step: int) -> None:
        self.acc.add(out, step)
        self.bar.update(1)

    @property
    def first_bad(self) -> torch.Tensor:
        """The first step whose loss was not finite since the last logging step (-1: none), on the device."""
        return self.acc.first_bad

    def check_finite(self, run_dir: Path) -> None:
        """A host sync: :class:`NonFiniteLoss` if a step since the last logging step had a non-finite loss."""
        if self.acc.first_bad.item() >= 0:
            raise NonFiniteLoss(int(self.acc.first_bad.item()), run_dir)

    def eta(self, done: int, total: int, sync: Callable[[], None]) -> None:
        """After 20 steps of a run planned without timing (epochs, steps, FLOPs): the time the rest will take."""
        if not self.eta_logged and self.main and done - self.start == 20 and done < total:
            sync()
            per = (time.perf_counter() - self.t0) / (done - self.start)
            log.info("%s: %.3fs/step measured -> ~%s for the remaining %d steps", self.name, per,
                     format_seconds(per * (total - done)), total - done)
            self.eta_logged = True

    def write(self, done: int, plan: Plan, now: float, elapsed: float) -> None:
        """The logging step ``done``: the loss averaged over the interval and the ranks, one line on rank 0."""
        self.last_loss = float(distributed.all_reduce_mean(self.acc.loss_sum / self.acc.n).item())
        ips = (done - self.step_log) * plan.global_batch / max(1e-9, now - self.t_log)
        if self.main:
            rec = {"step": done, "loss": self.last_loss, "lr": lr_at(done - 1, plan), "img_per_s": ips,
                   "elapsed_s": elapsed, "data_wait": self.wait_log / max(1e-9, now - self.t_log)}
            rec.update({k: float((v / self.acc.n).item()) for k, v in self.acc.logs_sum.items()})
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.board is not None:
                self.board.scalars("train", {k: v for k, v in rec.items() if k != "step"}, done)
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{rec['lr']:.2e}", ips=f"{ips:.0f}")
        self.acc.reset()
        self.t_log, self.step_log, self.wait_log = now, done, 0.0


class _Agreed(NamedTuple):
    """What every rank does at a logging step."""

    bad_step: int
    """The first step with a non-finite loss on any rank (-1: none)."""
    checkpoint: bool
    """Rank 0's periodic checkpoint is due."""
    signum: int
    """A stop signal some rank received (0: none)."""


def agree(first_bad: torch.Tensor, checkpoint: bool, signum: int, device: torch.device) -> _Agreed:
    """One all-reduce (max) so that every rank takes the same decisions at a logging step; no host sync before it."""
    flags = distributed.all_reduce_max(torch.stack([
        first_bad.float(), torch.tensor(float(checkpoint), device=device), torch.tensor(float(signum), device=device)]))
    return _Agreed(int(flags[0].item()), flags[1].item() > 0, int(flags[2].item()))


class _Batches:
    """The loop's batches from ``start``. A wall-clock plan may grow at a re-plan, so its iterator reaches past the
    first total (and is reopened further when a re-plan goes beyond that)."""

    def __init__(self, source: Any, start: int, plan: Plan) -> None:
        self.source = source
        self.stop = plan.total_steps if plan.budget_kind != "time" else 2 * plan.total_steps + 16
        self.it = source.batches(start, self.stop)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return next(self.it)

    def reach(self, done: int, plan: Plan) -> None:
        if plan.total_steps > self.stop:
            self.it.close()
            self.stop = 2 * plan.total_steps + 16
            self.it = self.source.batches(done, self.stop)

    def __enter__(self) -> _Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.it.close()


class _Clock:
    """This segment's wall-clock, on top of what the run used before a resume."""

    def __init__(self, before: float) -> None:
        self.before, self.t0 = before, time.perf_counter()

    def elapsed(self, now: float | None = None) -> float:
        return self.before + (time.perf_counter() if now is None else now) - self.t0


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Pre-trains one method on one dataset under one budget, in ``run_dir``."""

    def __init__(self, cfg: RunConfig, method: PretrainMethod, data: DatasetSplits, dist: DistInfo, run_dir: Path,
                 *, progress: bool = True) -> None:
        self.cfg, self.method, self.data, self.dist = cfg, method, data, dist
        self.run_dir = Path(run_dir)
        self.device = dist.device
        self.progress = progress and dist.rank == 0
        self.budget: Budget = cfg.budget.spec
        self.hp = resolve_hparams(cfg)
        self.method.to(self.device)
        self.sampler = StepSampler(len(data.train), self.hp.global_batch, cfg.seed, dist.rank, dist.world_size)
        size = method.backbone.img_size
        self.source = make_batch_source(data, method.views, size, self.sampler, self.device, cfg.data)
        self.model: nn.Module = distributed.wrap_ddp(method, self.device, sync_bn=method.sync_batchnorm)
        if cfg.train.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.precision = cfg.resolved_precision(self.device.type)
        self.checkpoints = Checkpoints(self.run_dir, cfg.config_hash(), cfg.train.ckpt_every_s, dist.rank == 0)
        self.preemption = Preemption(self.run_dir, dist.world_size)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Train to the plan's last step, from where the newest checkpoint left off; then the complete checkpoint and
        ``train_summary.json``."""
        resumed = self.checkpoints.resume()
        plan = resumed.plan if resumed is not None else self._plan()
        opt = self._optimizer(plan, resumed)
        start = resumed.step if resumed is not None else 0
        self._announce(plan, resumed)
        clock = _Clock(resumed.elapsed if resumed is not None else 0.0)
        metrics = TrainLog(self.run_dir, self.method.name, self.dist, plan, start=start, t0=clock.t0,
                           progress=self.progress, tensorboard=self.cfg.train.tensorboard)
        replan = Replanner(plan, start, clock.t0)
        self.checkpoints.count_from(clock.t0)
        self.method.train()
        step = start
        with self.preemption, metrics, _Batches(self.source, start, plan) as batches:
            while step < plan.total_steps:
                torch.manual_seed(step_seed(self.cfg.seed, step, self.dist.rank))
                batch = metrics.wait_for(batches)
                metrics.add(self._step(step, batch, plan, opt), step)
                step += 1
                if replan.due(step):
                    plan = self._replan(replan, plan, step, clock, batches, metrics)
                metrics.eta(step, plan.total_steps, self._sync)
                if self.preemption.stops_here(step, plan.total_steps):  # one process: at this very step
                    metrics.check_finite(self.run_dir)  # never checkpoint weights a non-finite loss has touched
                    self._preempt(self.preemption.signum, step, clock.elapsed(), plan, opt)
                if step % self.cfg.train.log_every == 0 or step == plan.total_steps:
                    self._at_log_step(step, plan, opt, metrics, clock)
        return self._finish(plan, opt, start, resumed, metrics, clock)

    def _step(self, step: int, batch: Batch, plan: Plan, opt: torch.optim.Optimizer) -> StepOutput:
        info = StepInfo(step, plan.total_steps, progress_at(step, plan) if plan.revisions else None)
        return train_step(self.model, self.method, batch, info, opt, lr_at(step, plan),
                          precision=self.precision, clip_grad=self.cfg.train.clip_grad)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _at_log_step(self, done: int, plan: Plan, opt: torch.optim.Optimizer, metrics: TrainLog,
                     clock: _Clock) -> None:
        """Every rank agrees what this logging step needs, then: a non-finite loss stops the run, the metrics line is
        written, a stop signal saves and stops, a due checkpoint is saved."""
        now = time.perf_counter()
        agreed = agree(metrics.first_bad, self.checkpoints.due(now), self.preemption.signum, self.device)
        if agreed.bad_step >= 0:
            raise NonFiniteLoss(agreed.bad_step, self.run_dir)
        metrics.write(done, plan, now, clock.elapsed(now))
        if agreed.signum and done < plan.total_steps:  # every rank stops at this boundary
            self._preempt(agreed.signum, done, clock.elapsed(), plan, opt)
        if agreed.checkpoint and done < plan.total_steps:
            self.checkpoints.save(done, clock.elapsed(), plan, self.method, opt)
            self.checkpoints.count_from(time.perf_counter())

    def _preempt(self, signum: int, done: int, elapsed: float, plan: Plan, opt: torch.optim.Optimizer) -> NoReturn:
        """Save the checkpoint of step boundary ``done`` and stop (SIGTERM/SIGUSR1; ``repro.signals``)."""
        self._sync()
        self.preemption.stop(signum, done, lambda: self.checkpoints.save(done, elapsed, plan, self.method, opt))

    # ------------------------------------------------------------------ before the loop: plan, resume
    def _plan(self) -> Plan:
        """The plan the budget buys (for a wall-clock budget, from calibrated steps); rank 0's, on every rank."""
        spe = self.sampler.steps_per_epoch
        flops = None
        with contextlib.suppress(NotImplementedError):
            flops = float(self.method.flops_per_image())
        calib = None
        if self.budget.kind == "time":
            calib = self._calibrate(make_plan(self.hp, self.budget, steps_per_epoch=spe, total_steps=CALIBRATION_STEPS,
                                              warmup_steps=0, flops_per_image=flops))
        total = steps_bought(self.budget, self.hp, steps_per_epoch=spe, flops_per_image=flops, calibration=calib,
                             method=self.method.name)
        plan = make_plan(self.hp, self.budget, steps_per_epoch=spe, total_steps=total, flops_per_image=flops,
                         calibration=calib)
        return distributed.broadcast_object(plan)

    def _calibrate(self, plan: Plan) -> Calibration:
        """Time warm steps on a snapshot that is restored afterwards (calibration leaves no trace)."""
        bc = self.cfg.budget
        snapshot = copy.deepcopy(self.method.state_dict())
        opt = build_optimizer(self.method, self.cfg, plan, self.device)
        t_start = time.perf_counter()
        n_warm = max(1, bc.calib_warmup_steps)
        # enough steps to fill calib_max_fraction of the budget, judged from the last warm step; capped
        n_total = n_warm + 200
        it = self.source.batches(0, n_total)
        acc = _Accumulator(self.device)  # the loop's per-step bookkeeping is part of what is timed
        for s in range(n_warm):
            torch.manual_seed(step_seed(self.cfg.seed, s, self.dist.rank))
            t0 = time.perf_counter()
            acc.add(self._step(s, next(it), plan, opt), s)
            self._sync()
            last = time.perf_counter() - t0
        target = bc.calib_max_fraction * float(self.budget.amount)
        n_timed = int(min(200, max(bc.calib_min_steps, target // max(last, 1e-6))))
        n_timed = int(distributed.broadcast_object(n_timed))
        t0 = time.perf_counter()
        for s in range(n_warm, n_warm + n_timed):
            torch.manual_seed(step_seed(self.cfg.seed, s, self.dist.rank))
            acc.add(self._step(s, next(it), plan, opt), s)
        self._sync()
        per_step = (time.perf_counter() - t0) / n_timed
        per_step = float(distributed.broadcast_object(per_step))
        it.close()
        self.method.load_state_dict(snapshot)
        del opt
        return Calibration(per_step, n_timed, n_warm, time.perf_counter() - t_start)

    def _optimizer(self, plan: Plan, resumed: Resumed | None) -> torch.optim.Optimizer:
        """The optimizer of ``plan``; weights and optimizer state as the checkpoint left them when resuming."""
        if resumed is not None:
            self.method.load_state_dict(resumed.model, strict=True)
        opt = build_optimizer(self.method, self.cfg, plan, self.device)
        if resumed is not None:
            opt.load_state_dict(resumed.optimizer)
        return opt

    def _announce(self, plan: Plan, resumed: Resumed | None) -> None:
        """Rank 0: the run directory, ``plan.json`` and one line: what the budget bought, or where the run resumes."""
        if self.dist.rank != 0:
            return
        if resumed is not None:
            log.info("resuming %s at step %d/%d", self.method.name, resumed.step, plan.total_steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_plan(plan)
        if resumed is None:
            log.info("%s", describe_plan(self.method.name, plan))

    def _replan(self, replan: Replanner, plan: Plan, done: int, clock: _Clock, batches: _Batches,
                metrics: TrainLog) -> Plan:
        """A wall-clock run's re-plan at step ``done``: the remaining steps from rank 0's measured speed."""
        self._sync()
        now = time.perf_counter()
        sec = float(distributed.broadcast_object(replan.seconds_per_step(done, now)))
        plan = replan.revise(plan, done, now, clock.elapsed(now), sec)
        metrics.bar.total = plan.total_steps
        batches.reach(done, plan)
        if self.dist.rank == 0:
            self._write_plan(plan)
            log.debug("re-plan at step %d: %.3fs/step -> %d steps", done, sec, plan.total_steps)
        return plan

    # ------------------------------------------------------------------ after the loop
    def _finish(self, plan: Plan, opt: torch.optim.Optimizer, start: int, resumed: Resumed | None, metrics: TrainLog,
                clock: _Clock) -> TrainResult:
        """The complete checkpoint (it keeps what the summary reports: a kill before the export must not lose it),
        then ``train_summary.json``."""
        self._sync()
        seconds = time.perf_counter() - clock.t0
        ran = plan.total_steps - start
        if ran == 0 and resumed is not None:  # the complete checkpoint of a run killed before its export
            finals = resumed.finals
        else:
            timed = ran > 0 and seconds > 0
            finals = Finals(metrics.last_loss, ran * plan.global_batch / seconds if timed else 0.0,
                            metrics.wait_total / seconds if timed else 0.0)
        elapsed = clock.before + seconds
        self.checkpoints.save(plan.total_steps, elapsed, plan, self.method, opt, finals=finals)
        result = TrainResult(plan, plan.total_steps, elapsed, finals.images_per_second, finals.final_loss,
                             self._device_name(), self.dist.world_size, resumed is not None, finals.data_wait_share,
                             self.precision)
        if self.dist.rank == 0:
            if finals.data_wait_share > DATA_BOUND_SHARE:
                log.warning("%s waited for data %.0f%% of its pre-training time: the run is data-bound (more "
                            "data.num_workers, data.decode=gpu, or a smaller image store; see the README)",
                            self.method.name, 100 * finals.data_wait_share)
            self._save_summary(result)
        return result

    def _write_plan(self, plan: Plan) -> None:
        atomic_write_text(self.run_dir / "plan.json", json.dumps(asdict(plan), indent=2) + "\n")

    def _save_summary(self, r: TrainResult) -> None:
        d = asdict(r)
        d["epochs"] = r.plan.epochs
        # written last and atomically: its presence (with the export) marks the run as finished
        atomic_write_text(self.run_dir / "train_summary.json", json.dumps(d, indent=2, default=str) + "\n")

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "train_summary.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
