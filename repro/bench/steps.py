"""One training step of a method, timed: the method built as ``repro.run`` builds it, the trainer's own step
(:func:`repro.trainer.train_step`) and the variants that undo one optimisation each."""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repro.config import ConfigError, RunConfig, apply_overrides
from repro.flops import set_fused_attention
from repro.method import Batch, PretrainMethod, StepInfo
from repro.pretrain import random_teacher_export
from repro.recipes import RECIPES, build_config
from repro.registry import METHODS, build_method
from repro.views import TensorAugment

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {}),
    "vit_s": ("in1k", {"model.name": "vit_small_patch16_224"}),
    "vit_b": ("in1k", {"model.name": "vit_base_patch16_224"}),
    "vit_l": ("in1k", {"model.name": "vit_large_patch16_224"}),
}
"""Model presets: (recipe, overrides). Any other recipe name (e.g. ``cifar10``) is accepted as its own preset."""

GPU_BATCH = {"tiny": 512, "vit_s": 256, "vit_b": 128, "vit_l": 64}
"""Per-device batch on CUDA by model; MiCL (10-token sequences at ViT-B) gets 8x."""
CPU_BATCH = 32


@dataclass
class Row:
    device: str
    tag: str
    variant: str
    model: str
    img_size: int
    method: str
    batch: int
    compile: bool
    precision: str
    """The resolved ``train.precision`` of the step ('fp32' or 'bf16'); the column was ``amp`` before."""
    img_per_s: float
    ms_per_step: float
    gflop_per_img: float
    tflops: float
    peak_tflops: float
    mfu: float
    peak_mem_gib: float | None
    torch: str
    date: str
    note: str = ""


def model_config(method: str, model: str, batch: int, *, compile: bool, precision: str = "auto",
                 sets: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration ``repro.run`` would build for ``method`` on model preset ``model``."""
    recipe, overrides = MODELS.get(model, (model, {}))
    if recipe not in RECIPES:
        raise ConfigError(f"--model {model!r}: not one of {', '.join([*MODELS, *RECIPES])}")
    return build_config(method, recipe, {**overrides, "train.batch_size": batch, "train.compile": compile,
                                         "train.precision": precision, **(sets or {})})


def build(cfg: RunConfig, device: torch.device, scratch: Path) -> PretrainMethod:
    cls = METHODS[cfg.method]
    pre = cls.prerequisite
    if pre is not None and pre.missing(cfg.method_cfg):
        cfg_teacher = random_teacher_export(cfg, scratch / f"teacher-{cfg.model.name}-{cfg.model.img_size}",
                                            pre.method)
        cfg = apply_overrides(cfg, {f"method.{pre.config_field}": str(cfg_teacher)})
    method = build_method(cfg)
    return method.to(device).train()


@dataclass(frozen=True)
class Variant:
    """How the step runs. The default is what the trainer does; the others undo one optimisation each, so the
    table shows what each is worth (``naive`` undoes all three: the habits of the official implementations)."""

    attention: str = "fused"
    """'fused': timm's F.scaled_dot_product_attention (flash / memory-efficient kernels); 'naive': softmax(QK^T)V."""
    optimizer: str = "fused"
    """AdamW implementation: 'fused' (the trainer's: one fused kernel on CUDA, foreach on CPU), 'foreach'
    (multi-tensor), 'loop' (per parameter)."""
    sync: bool = False
    """Read the loss on the host after every step (``loss.item()``), as most training scripts log."""

    @property
    def name(self) -> str:
        parts = [f"attn={self.attention}"] if self.attention != "fused" else []
        parts += [f"adamw={self.optimizer}"] if self.optimizer != "fused" else []
        parts += ["sync"] if self.sync else []
        return " ".join(parts) or "tuned"


VARIANTS = {
    "tuned": Variant(),
    "naive": Variant("naive", "loop", True),
    "naive-attn": Variant(attention="naive"),
    "loop-adamw": Variant(optimizer="loop"),
    "foreach-adamw": Variant(optimizer="foreach"),
    "sync": Variant(sync=True),
}


def make_step(cfg: RunConfig, method: PretrainMethod, device: torch.device,
              variant: Variant = Variant()) -> Callable[[Batch, int], Any]:
    """The trainer's own step (optimizer, autocast, compile) as a closure ``step(batch, i)``."""
    from repro.budget import Budget
    from repro.plan import make_plan, resolve_hparams
    from repro.trainer import build_optimizer, train_step

    plan = make_plan(resolve_hparams(cfg), Budget("steps", 10**6, "bench"), steps_per_epoch=1, total_steps=10**6,
                     warmup_steps=0)
    opt = build_optimizer(method, cfg, plan, device)
    if variant.optimizer != "fused":  # "fused" = the trainer's own choice (fused on CUDA, foreach on CPU)
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=plan.lr, betas=plan.betas, fused=False,
                                foreach=variant.optimizer != "loop")
    if variant.attention == "naive":
        set_fused_attention(method, False)
    model: Any = torch.compile(method) if cfg.train.compile else method
    precision = cfg.resolved_precision(device.type)

    def step(batch: Batch, i: int) -> Any:
        out = train_step(model, method, batch, StepInfo(i, plan.total_steps), opt, plan.lr, precision=precision,
                         clip_grad=cfg.train.clip_grad)
        if variant.sync:
            out.loss.item()
        return out

    return step


def synthetic_batch(method: PretrainMethod, batch: int, device: torch.device) -> Batch:
    size = method.backbone.img_size
    g = torch.Generator(device="cpu").manual_seed(0)
    images = (torch.rand(batch, 3, size, size, generator=g) * 255).to(torch.uint8).to(device)
    return Batch(TensorAugment(method.views, size, (0.5,) * 3, (0.25,) * 3)(images))


def time_steps(run: Callable[[int], Any], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones (CUDA events: no sync between steps)."""
    for i in range(warmup):
        run(i)
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (start, end) in enumerate(events):
            start.record()
            run(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1000.0 for s, e in events]
    out = []
    for i in range(steps):
        t0 = time.perf_counter()
        run(warmup + i)
        out.append(time.perf_counter() - t0)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def bench_method(method_name: str, model: str, batch: int, *, compile: bool, precision: str, steps: int,
                 warmup: int, device: torch.device, peak: float, tag: str, scratch: Path, sets: dict[str, Any],
                 variant: Variant = Variant()) -> Row:
    cfg = model_config(method_name, model, batch, compile=compile, precision=precision, sets=sets)
    torch.manual_seed(0)
    method = build(cfg, device, scratch)
    flops = float(method.flops_per_image())
    base: dict[str, Any] = dict(
        device=device_name(device), tag=tag, variant=variant.name, model=model, img_size=method.backbone.img_size,
        method=method_name, batch=batch, compile=compile, precision=cfg.resolved_precision(device.type),
        gflop_per_img=flops / 1e9, peak_tflops=peak / 1e12, torch=torch.__version__,
        date=_dt.date.today().isoformat())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        data = synthetic_batch(method, batch, device)
        step = make_step(cfg, method, device, variant)
        times = time_steps(lambda i: step(data, i), steps, warmup, device)
    except torch.cuda.OutOfMemoryError:
        del method
        torch.cuda.empty_cache()
        return Row(**base, img_per_s=0.0, ms_per_step=0.0, tflops=0.0, mfu=0.0, peak_mem_gib=None,
                   note="out of memory")
    sec = statistics.median(times)
    ips = batch / sec
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Row(**base, img_per_s=ips, ms_per_step=sec * 1000, tflops=flops * ips / 1e12, mfu=flops * ips / peak,
               peak_mem_gib=mem)
