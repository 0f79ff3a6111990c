"""The one training loop every method runs through.

bf16 autocast or fp32, as ``train.precision`` resolves on the device (:mod:`repro.precision`; bf16 on CUDA, fp32 on
CPU unless asked); AdamW (fused on CUDA) or LARS with the method's weight-decay rule; per-iteration linear warmup
then half-cycle cosine; optional gradient clipping; a non-finite-loss guard; periodic atomic checkpoints and
automatic resume; tqdm on rank 0; JSONL metrics. The hot path has no host sync: losses
are accumulated on the device and read only at logging steps.

The budget becomes a fixed plan before the first real step (:class:`Plan`): for a wall-clock budget a few
warm steps are timed on a snapshot of the model (then the snapshot is restored and the optimizer state
cleared, so calibration leaves no trace in the weights), the budget is divided by the measured seconds per
step, and rank 0's plan is broadcast. A resumed run reads the plan back from its checkpoint: same step
count, same schedule.

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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timm.optim import Lars
from torch import nn
from tqdm import tqdm

from repro import distributed
from repro.budget import Budget, BudgetError, Calibration, format_seconds, steps_for_budget
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
from repro.method import MethodConfig, PretrainMethod, StepInfo
from repro.monitor import open_tensorboard
from repro.precision import autocast
from repro.records import DATA_BOUND_SHARE
from repro.schedules import cosine_after_warmup
from repro.seeds import step_seed
from repro.signals import Preempted, StopRequest
from repro.sources import StepSampler, make_batch_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything fixed before the first step; stored in the checkpoint so a resume changes nothing."""

    total_steps: int
    global_batch: int
    steps_per_epoch: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    budget: str
    budget_kind: str
    budget_seconds: float | None
    seconds_per_step: float | None
    calibration_steps: int
    calibration_seconds: float
    flops_per_image: float | None
    revisions: tuple[tuple[int, int], ...] = ()
    """Wall-clock budgets only: (step, new total_steps) each time the remaining steps were re-planned from the
    measured speed (:data:`REPLAN_AT`). ``total_steps`` is the latest total; the first plan's is
    :attr:`planned_steps`. A resumed run replays these, so its schedule is the one the run had."""
    planned_steps: int = 0
    """The total of the first plan (before any revision); 0 in plans written before revisions existed."""

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    @property
    def first_total(self) -> int:
        return self.planned_steps or self.total_steps


REPLAN_AT = (0.1, 0.25, 0.5, 0.75, 0.9)
"""Fractions of the planned steps at which a wall-clock run re-plans its remaining steps from its measured speed."""
MAX_STEPS = 10**9
"""A budget that buys more optimizer steps than this is refused as a unit mistake (1e30flop, 1e9h)."""


def plan_from_dict(d: dict[str, Any]) -> Plan:
    """A :class:`Plan` read back from a checkpoint or ``plan.json`` (JSON turns tuples into lists)."""
    d = {**d, "betas": tuple(d["betas"]), "revisions": tuple(tuple(r) for r in d.get("revisions", ()))}
    return Plan(**d)


def next_replan_step(plan: Plan) -> int | None:
    """The step at which the next re-plan happens (None: all done, or not a wall-clock budget)."""
    k = len(plan.revisions)
    if plan.budget_kind != "time" or k >= len(REPLAN_AT):
        return None
    last = plan.revisions[-1][0] if plan.revisions else 0
    at = max(last + 1, round(REPLAN_AT[k] * plan.total_steps))
    return at if at < plan.total_steps else None


def revise(plan: Plan, step: int, elapsed: float, seconds_per_step: float) -> Plan:
    """The plan with its remaining steps re-fitted to the budget at the measured ``seconds_per_step``."""
    assert plan.budget_seconds is not None
    remaining = max(0.0, plan.budget_seconds - elapsed)
    total = max(step + 1, plan.warmup_steps + 1, step + int(round(remaining / max(seconds_per_step, 1e-9))))
    return replace(plan, total_steps=int(total), revisions=(*plan.revisions, (step, int(total))),
                   planned_steps=plan.first_total)


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


def _continued(step: int, start: int, plan: Plan) -> float:
    """Progress in [0, 1] from ``start`` to the last step, continued across re-plans (each keeps the progress it
    found and spreads the rest over its new remaining steps)."""
    t, total = 0.0, plan.first_total
    for at, new_total in plan.revisions:
        if step < at:
            break
        t = t + (1.0 - t) * min(1.0, max(0, at - start) / max(1, total - start))
        start, total = max(at, start), new_total
    return min(1.0, t + (1.0 - t) * ((step - start) / max(1, total - start)))


def progress_at(step: int, plan: Plan) -> float:
    """The run's progress at ``step`` (``step / total_steps`` until a re-plan; continuous across re-plans)."""
    return _continued(step, 0, plan)


def lr_at(step: int, plan: Plan) -> float:
    """Per-iteration linear warmup from 0, then half-cycle cosine to ``min_lr`` (MAE's ``adjust_learning_rate``).

    After a re-plan at step ``s`` the cosine continues from the progress it had reached at ``s`` and spreads the
    rest over the new remaining steps: the lr is continuous and ends at ``min_lr`` on the last step.
    """
    t = _continued(step, plan.warmup_steps, plan) if step >= plan.warmup_steps else 0.0
    return cosine_after_warmup(step, plan.warmup_steps, plan.lr, t, plan.min_lr)


def describe_plan(name: str, plan: Plan) -> str:
    """The one line a run prints before its first step: what the budget bought and what it will take."""
    line = (f"{name}: plan {plan.total_steps} steps ({plan.epochs:.3g} epochs) of batch {plan.global_batch}, "
            f"lr {plan.lr:.3g}, warmup {plan.warmup_steps} steps, budget {plan.budget}")
    if plan.flops_per_image:
        line += f" ({plan.flops_per_image * plan.global_batch * plan.total_steps:.3g} FLOPs)"
    if plan.seconds_per_step:
        eta = format_seconds(plan.seconds_per_step * plan.total_steps)
        points = ", ".join(f"{f:.0%}" for f in REPLAN_AT)
        line += f"; calibrated {plan.seconds_per_step:.3f}s/step -> ~{eta}, re-planned at {points} of the run"
    return line


def resolve_hparams(cfg: RunConfig) -> dict[str, Any]:
    """Merge the method's paper optimisation values with the run's overrides."""
    m: MethodConfig = cfg.method_cfg
    t = cfg.train
    batch = t.batch_size or m.batch_size
    base_lr = t.base_lr if t.base_lr is not None else m.base_lr
    lr = base_lr if m.lr_is_absolute else base_lr * batch / 256
    warmup_fraction = t.warmup_fraction if t.warmup_fraction is not None else m.warmup_epochs / m.epochs
    return {
        "global_batch": batch,
        "lr": lr,
        "min_lr": t.min_lr if t.min_lr is not None else m.min_lr,
        "weight_decay": t.weight_decay if t.weight_decay is not None else m.weight_decay,
        "betas": tuple(m.betas),
        "warmup_fraction": warmup_fraction,
    }


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


class _Accumulator:
    """Device-side running sums between logging steps (no host sync) and the first non-finite step."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        # float64: a float64 run (the golden tests) logs its losses unrounded; sums of fp32 losses are exact
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.logs_sum: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, out, step: int) -> None:
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
        self.sampler = StepSampler(len(data.train), self.hp["global_batch"], cfg.seed, dist.rank, dist.world_size)
        size = method.backbone.img_size
        self.source = make_batch_source(data, method.views, size, self.sampler, self.device, cfg.data)
        self.model: nn.Module = distributed.wrap_ddp(method, self.device, sync_bn=method.sync_batchnorm)
        if cfg.train.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.precision = cfg.resolved_precision(self.device.type)
        self.ckpt_path = self.run_dir / CHECKPOINT

    # ------------------------------------------------------------------ one step
    def _step(self, step: int, batch, plan: Plan, opt: torch.optim.Optimizer):
        info = StepInfo(step, plan.total_steps, progress_at(step, plan) if plan.revisions else None)
        return train_step(self.model, self.method, batch, info, opt, lr_at(step, plan),
                          precision=self.precision, clip_grad=self.cfg.train.clip_grad)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ planning
    def _plan(self, opt_factory) -> Plan:
        hp = self.hp
        spe = self.sampler.steps_per_epoch
        flops = None
        with contextlib.suppress(NotImplementedError):
            flops = float(self.method.flops_per_image())
        provisional = Plan(10**9, hp["global_batch"], spe, hp["lr"], hp["min_lr"], 0, hp["weight_decay"],
                           hp["betas"], self.budget.text, self.budget.kind, self.budget.seconds, None, 0, 0.0, flops)
        calib: Calibration | None = None
        if self.budget.kind == "time":
            calib = self._calibrate(provisional, opt_factory)
        if self.budget.kind == "flop" and flops is None:
            raise BudgetError(f"--budget {self.budget.text}: method {self.method.name} has no FLOP count")
        total = steps_for_budget(self.budget, steps_per_epoch=spe, global_batch=hp["global_batch"],
                                 seconds_per_step=calib.seconds_per_step if calib else None, flops_per_image=flops)
        if total > MAX_STEPS:
            raise BudgetError(f"--budget {self.budget.text}: buys {total:.3g} steps ({total / spe:.3g} epochs) of "
                              f"{self.method.name}; is the unit right? (more than {MAX_STEPS:.0e} steps is refused)")
        warmup = int(round(hp["warmup_fraction"] * total))
        plan = Plan(total, hp["global_batch"], spe, hp["lr"], hp["min_lr"], warmup, hp["weight_decay"], hp["betas"],
                    self.budget.text, self.budget.kind, self.budget.seconds,
                    calib.seconds_per_step if calib else None, calib.timed_steps if calib else 0,
                    calib.wall_seconds if calib else 0.0, flops, planned_steps=total)
        return distributed.broadcast_object(plan)

    def _calibrate(self, plan: Plan, opt_factory) -> Calibration:
        """Time warm steps on a snapshot that is restored afterwards (calibration leaves no trace)."""
        bc = self.cfg.budget
        snapshot = copy.deepcopy(self.method.state_dict())
        opt = opt_factory(plan)
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

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        cfg = self.cfg
        main = self.dist.rank == 0
        state: dict[str, Any] | None = None
        if main and self.run_dir.is_dir():
            remove_stale_temps(self.run_dir)  # half-written files of a killed run; never loaded, only disk
        # the newest checkpoint that passes its checksum: a corrupted newest one falls back to the previous one,
        # whose steps are then replayed exactly (data order and RNG are functions of seed and step)
        found = resume_checkpoint(self.ckpt_path)
        if found is not None:
            state, used, skipped = found
            if main:
                for line in skipped:
                    log.warning("%s; resuming from the previous checkpoint %s (step %s)", line, used.name,
                                state.get("step"))
            if state.get("config_hash") != cfg.config_hash():
                raise CheckpointError(f"{used}: written by a different configuration "
                                      f"({state.get('config_hash')} != {cfg.config_hash()}); use another --out")
        if state is not None:
            plan = plan_from_dict(state["plan"])
            self.method.load_state_dict(state["model"], strict=True)
        else:
            plan = self._plan(lambda p: build_optimizer(self.method, cfg, p, self.device))
        opt = build_optimizer(self.method, cfg, plan, self.device)
        start, elapsed_before = 0, 0.0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            start, elapsed_before = int(state["step"]), float(state["elapsed"])
            if main:
                log.info("resuming %s at step %d/%d", self.method.name, start, plan.total_steps)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_plan(plan)
            if state is None:
                log.info("%s", describe_plan(self.method.name, plan))

        metrics_path = self.run_dir / "metrics.jsonl"
        board = open_tensorboard(cfg.train.tensorboard and main, self.run_dir)
        bar = tqdm(total=plan.total_steps, initial=start, disable=not self.progress, unit="step", dynamic_ncols=True,
                   desc=f"{self.method.name} pretrain", leave=True)
        acc = _Accumulator(self.device)
        last_loss = float("nan")
        wait_log = wait_total = 0.0  # seconds spent in next(batches): in this log interval, in this segment
        t_loop = time.perf_counter()
        t_log, step_log = t_loop, start
        last_ckpt = t_loop
        every = cfg.train.log_every
        # a wall-clock plan may grow at a re-plan: its batch iterator reaches past the first total
        stop = plan.total_steps if plan.budget_kind != "time" else 2 * plan.total_steps + 16
        it = self.source.batches(start, stop)
        self.method.train()
        step = start
        replan_at = next_replan_step(plan)
        t_replan, step_replan = t_loop, start
        eta_logged = start > 0 or plan.budget_kind == "time"
        stop_req = StopRequest()
        stop_req.install()
        try:
            while step < plan.total_steps:
                torch.manual_seed(step_seed(cfg.seed, step, self.dist.rank))
                t_wait = time.perf_counter()
                batch = next(it)
                waited = time.perf_counter() - t_wait
                wait_log, wait_total = wait_log + waited, wait_total + waited
                acc.add(self._step(step, batch, plan, opt), step)
                bar.update(1)
                done = step + 1
                step = done
                if done == replan_at:
                    self._sync()
                    now = time.perf_counter()
                    sec = float(distributed.broadcast_object((now - t_replan) / max(1, done - step_replan)))
                    plan = revise(plan, done, elapsed_before + now - t_loop, sec)
                    t_replan, step_replan = now, done
                    replan_at = next_replan_step(plan)
                    bar.total = plan.total_steps
                    if plan.total_steps > stop:
                        it.close()
                        stop = 2 * plan.total_steps + 16
                        it = self.source.batches(done, stop)
                    if main:
                        self._write_plan(plan)
                        log.debug("re-plan at step %d: %.3fs/step -> %d steps", done, sec, plan.total_steps)
                if not eta_logged and main and done - start == 20 and done < plan.total_steps:
                    self._sync()
                    per = (time.perf_counter() - t_loop) / (done - start)
                    log.info("%s: %.3fs/step measured -> ~%s for the remaining %d steps", self.method.name, per,
                             format_seconds(per * (plan.total_steps - done)), plan.total_steps - done)
                    eta_logged = True
                if self.dist.world_size == 1 and stop_req.signum and done < plan.total_steps:
                    if acc.first_bad.item() >= 0:  # never checkpoint weights a non-finite loss has touched
                        raise NonFiniteLoss(int(acc.first_bad.item()), self.run_dir)
                    self._preempt(stop_req.signum, done, elapsed_before + time.perf_counter() - t_loop, plan, opt)
                if done % every == 0 or done == plan.total_steps:
                    now = time.perf_counter()
                    want_ckpt = float(main and (now - last_ckpt >= cfg.train.ckpt_every_s))
                    flags = distributed.all_reduce_max(torch.stack([  # no host sync before the all-reduce
                        acc.first_bad.float(), torch.tensor(want_ckpt, device=self.device),
                        torch.tensor(float(stop_req.signum), device=self.device)]))
                    if flags[0].item() >= 0:
                        raise NonFiniteLoss(int(flags[0].item()), self.run_dir)
                    mean_loss = float(distributed.all_reduce_mean(acc.loss_sum / acc.n).item())
                    last_loss = mean_loss
                    ips = (done - step_log) * plan.global_batch / max(1e-9, now - t_log)
                    if main:
                        rec = {"step": done, "loss": mean_loss, "lr": lr_at(done - 1, plan), "img_per_s": ips,
                               "elapsed_s": elapsed_before + now - t_loop,
                               "data_wait": wait_log / max(1e-9, now - t_log)}
                        rec.update({k: float((v / acc.n).item()) for k, v in acc.logs_sum.items()})
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        if board is not None:
                            board.scalars("train", {k: v for k, v in rec.items() if k != "step"}, done)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{rec['lr']:.2e}", ips=f"{ips:.0f}")
                    acc.reset()
                    t_log, step_log, wait_log = now, done, 0.0
                    if flags[2].item() > 0 and done < plan.total_steps:  # every rank stops at this boundary
                        self._preempt(int(flags[2].item()), done, elapsed_before + time.perf_counter() - t_loop,
                                      plan, opt)
                    if flags[1].item() > 0 and done < plan.total_steps:
                        self._save(done, elapsed_before + time.perf_counter() - t_loop, plan, opt, complete=False)
                        last_ckpt = time.perf_counter()
        finally:
            stop_req.restore()
            if board is not None:
                board.close()
            bar.close()
            it.close()
        self._sync()
        seg_seconds = time.perf_counter() - t_loop
        elapsed = elapsed_before + seg_seconds
        ran = plan.total_steps - start
        ips = ran * plan.global_batch / seg_seconds if ran and seg_seconds > 0 else 0.0
        if ran == 0 and state is not None:
            ips = float(state.get("images_per_second", 0.0))
            last_loss = float(state.get("final_loss", float("nan")))
        # the complete checkpoint keeps what the summary reports: a kill before the export must not lose it
        wait_share = wait_total / seg_seconds if ran and seg_seconds > 0 else 0.0
        if ran == 0 and state is not None:
            wait_share = float(state.get("data_wait_share", 0.0))
        self._save(plan.total_steps, elapsed, plan, opt, complete=True, final_loss=last_loss, images_per_second=ips,
                   data_wait_share=wait_share)
        result = TrainResult(plan, plan.total_steps, elapsed, ips, last_loss, self._device_name(),
                             self.dist.world_size, state is not None, wait_share, self.precision)
        if main:
            if wait_share > DATA_BOUND_SHARE:
                log.warning("%s waited for data %.0f%% of its pre-training time: the run is data-bound (more "
                            "data.num_workers, data.decode=gpu, or a smaller image store; see the README)",
                            self.method.name, 100 * wait_share)
            self._save_summary(result)
        return result

    def _preempt(self, signum: int, done: int, elapsed: float, plan: Plan, opt) -> None:
        """Save the checkpoint of step boundary ``done`` and stop (SIGTERM/SIGUSR1; ``repro.lock``)."""
        self._sync()
        self._save(done, elapsed, plan, opt, complete=False)
        distributed.barrier()  # no rank leaves before rank 0's checkpoint is on disk
        raise Preempted(signum, done, self.run_dir)

    def _write_plan(self, plan: Plan) -> None:
        atomic_write_text(self.run_dir / "plan.json", json.dumps(asdict(plan), indent=2) + "\n")

    def _save(self, next_step: int, elapsed: float, plan: Plan, opt, *, complete: bool, **final: float) -> None:
        if self.dist.rank != 0:
            return
        state = {
            "model": self.method.state_dict(), "optimizer": opt.state_dict(), "step": next_step, "elapsed": elapsed,
            "plan": asdict(plan), "config_hash": self.cfg.config_hash(), "complete": complete, **final,
        }
        save_checkpoint(self.ckpt_path, state)

    def _save_summary(self, r: TrainResult) -> None:
        d = asdict(r)
        d["epochs"] = r.plan.epochs
        # written last and atomically: its presence (with the export) marks the run as finished
        atomic_write_text(self.run_dir / "train_summary.json", json.dumps(d, indent=2, default=str) + "\n")

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        import platform

        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "train_summary.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None

