"""``python -m repro.bench``: training-step throughput and model-FLOPs utilisation of every method.

For each method x model x compile mode it builds the method exactly as ``repro.run`` would (recipe, paper
config, the trainer's optimizer and :func:`repro.trainer.train_step`), feeds it one GPU-resident synthetic batch
(uint8 images augmented once on the device), excludes the warm-up steps (allocator, autotuning, compilation),
and times each step with CUDA events (``time.perf_counter`` on CPU). It reports the median step time as img/s,
the method's analytic FLOPs per image (:mod:`repro.flops`), achieved TFLOP/s, MFU against the **measured** dense
bf16 matmul peak of the same device (fp32 on CPU), and peak memory.

``--data PATH`` adds the data path: the batch source alone (img/s it can produce) and the training step fed by it,
as a fraction of the synthetic-batch step, so a data-bound setup shows itself.

Rows accumulate in ``<out>.csv`` (keyed by device, tag, model, method, batch, compile: a rerun replaces its
rows) and ``<out>.md`` is regenerated from it, so before/after tags and several devices sit side by side.

    python -m repro.bench                                     # every method, ViT-B/16 at 224 (GPU) or tiny (CPU)
    python -m repro.bench mae micl --model vit_s vit_b vit_l --compile both --tag after
    python -m repro.bench micl --model cifar10 --data /data/cifar10   # GPU-resident data path vs synthetic
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from repro.config import ConfigError, DataConfig, RunConfig, apply_overrides, parse_set_args
from repro.flops import matmul_peak_flops, set_fused_attention
from repro.method import Batch, PretrainMethod, StepInfo
from repro.recipes import RECIPES, build_config
from repro.registry import METHODS, build_method
from repro.views import TensorAugment

log = logging.getLogger("repro.bench")

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
    amp: bool
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


def model_config(method: str, model: str, batch: int, *, compile: bool, amp: bool,
                 sets: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration ``repro.run`` would build for ``method`` on model preset ``model``."""
    recipe, overrides = MODELS.get(model, (model, {}))
    if recipe not in RECIPES:
        raise ConfigError(f"--model {model!r}: not one of {', '.join([*MODELS, *RECIPES])}")
    return build_config(method, recipe, {**overrides, "train.batch_size": batch, "train.compile": compile,
                                         "train.amp": amp, **(sets or {})})


def random_teacher_export(cfg: RunConfig, out: Path, teacher: str = "mocov3") -> Path:
    """A ``teacher`` export (MoCo v3: backbone + projector) of ``cfg``'s architecture, at its random init (from the
    global RNG): a method's prerequisite (MimCo's frozen teacher) for timing and for tests."""
    from repro.checkpoint import export_backbone, export_extra

    tcfg = model_config(teacher, cfg.recipe, 2, compile=False, amp=False)  # the teacher the same recipe trains
    tcfg = replace(tcfg, model=cfg.model)
    moco = build_method(tcfg)
    bb = moco.eval_backbone()
    meta = bb.export_meta(mean=(0.5,) * 3, std=(0.25,) * 3, method=teacher, steps=0, budget="-",
                          budget_seconds=None, config_hash="bench", git_revision="")
    for name, state in moco.extra_exports().items():
        export_extra(out, name, state)
    export_backbone(out, bb.export_state_dict(), meta)
    return out


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
    from repro.trainer import Plan, build_optimizer, resolve_hparams, train_step

    hp = resolve_hparams(cfg)
    plan = Plan(10**6, hp["global_batch"], 1, hp["lr"], hp["min_lr"], 0, hp["weight_decay"], hp["betas"], "bench",
                "steps", None, None, 0, 0.0, None)
    opt = build_optimizer(method, cfg, plan, device)
    if variant.optimizer != "fused":  # "fused" = the trainer's own choice (fused on CUDA, foreach on CPU)
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=plan.lr, betas=plan.betas, fused=False,
                                foreach=variant.optimizer != "loop")
    if variant.attention == "naive":
        set_fused_attention(method, False)
    model: Any = torch.compile(method) if cfg.train.compile else method
    amp = device.type == "cuda" and cfg.train.amp

    def step(batch: Batch, i: int) -> Any:
        out = train_step(model, method, batch, StepInfo(i, plan.total_steps), opt, plan.lr, autocast=amp,
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
    _sync(device)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def bench_method(method_name: str, model: str, batch: int, *, compile: bool, amp: bool, steps: int, warmup: int,
                 device: torch.device, peak: float, tag: str, scratch: Path, sets: dict[str, Any],
                 variant: Variant = Variant()) -> Row:
    cfg = model_config(method_name, model, batch, compile=compile, amp=amp, sets=sets)
    torch.manual_seed(0)
    method = build(cfg, device, scratch)
    flops = float(method.flops_per_image())
    base: dict[str, Any] = dict(
        device=device_name(device), tag=tag, variant=variant.name, model=model, img_size=method.backbone.img_size,
        method=method_name, batch=batch, compile=compile, amp=amp and device.type == "cuda",
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


def bench_data(method_name: str, model: str, batch: int, data: Any, *, amp: bool, steps: int, warmup: int,
               device: torch.device, tag: str, scratch: Path, sets: dict[str, Any], num_workers: int,
               decode: str = "fast", with_step: bool = True) -> DataRow:
    """img/s of the batch source alone, and (``with_step``) of the training step fed by it vs by one synthetic batch.

    ``data``: the :class:`repro.data.DatasetSplits` from :func:`repro.data.load_data`."""
    from repro.data import TensorImages
    from repro.sources import StepSampler, make_batch_source, resolve_workers

    cfg = model_config(method_name, model, batch, compile=False, amp=amp, sets=sets)
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
        _sync(device)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            run(i)
        _sync(device)
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


# --------------------------------------------------------------------------------------------- output


def _merge_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]):
    import pandas as pd

    new = pd.DataFrame(rows)
    if path.exists():
        old = pd.read_csv(path)
        if not new.empty:
            index = pd.MultiIndex.from_frame(new[keys].astype(str))
            old = old[~pd.MultiIndex.from_frame(old[keys].astype(str)).isin(index)]
        new = pd.concat([old, new], ignore_index=True)
    from repro.checkpoint import atomic_write_text

    atomic_write_text(path, new.to_csv(index=False))
    return new


def render_markdown(runs, data) -> str:
    """Tables per device: eager and compiled side by side for each (tag, model, method, batch)."""
    lines = ["# Training-step throughput", "",
             "Generated by `python -m repro.bench` (do not edit; the CSV beside this file is the source).",
             "MFU = analytic FLOPs per image (`repro/flops.py`) x img/s / the dense matmul peak measured in the same",
             "run (bf16 on CUDA, fp32 on CPU). Median step time after warm-up; GPU-resident synthetic batch.",
             "Variant `tuned` is the trainer's step; `attn=naive adamw=loop sync` is the official codes' habits.", ""]
    devices = set() if runs is None or runs.empty else {str(d) for d in runs["device"]}
    if not any(not d.startswith("cpu") for d in devices):
        lines += ["**No GPU rows yet.** The CPU rows below check the tool and show relative costs only; CPU MFU is "
                  "against a CPU fp32 matmul and says nothing about a GPU. `scripts/gpu_session.sh bench` runs the "
                  "GPU table (ViT-S/B/L, naive vs tuned, eager vs compiled, CIFAR-10 data path).", ""]
    if runs is not None and not runs.empty:
        for dev, df in runs.groupby("device", sort=False):
            peak = df["peak_tflops"].max()
            lines += [f"## {dev}", "", f"Measured matmul peak: {peak:.1f} TFLOP/s; torch {df['torch'].iloc[-1]}.", "",
                      "| tag | variant | model | px | method | batch | GFLOP/img | eager img/s | eager MFU "
                      "| compiled img/s | compiled MFU | peak mem GiB | note |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            keys = ["tag", "variant", "model", "method", "batch"]
            for (tag, variant, model, method, batch), g in df.groupby(keys, sort=False):
                cells = {}
                for c in (False, True):
                    r = g[g["compile"].astype(str) == str(c)]
                    if r.empty or r.iloc[-1]["img_per_s"] == 0:
                        cells[c] = ("-", "-")
                    else:
                        cells[c] = (f"{r.iloc[-1]['img_per_s']:.0f}", f"{100 * r.iloc[-1]['mfu']:.1f}%")
                last = g.iloc[-1]
                mem = "-" if g["peak_mem_gib"].isna().all() else f"{g['peak_mem_gib'].max():.1f}"
                note = "; ".join(sorted({str(n) for n in g["note"] if isinstance(n, str) and n}))
                lines.append(f"| {tag} | {variant} | {model} | {last['img_size']} | {method} | {batch} | "
                             f"{last['gflop_per_img']:.2f} | {cells[False][0]} | {cells[False][1]} | "
                             f"{cells[True][0]} | {cells[True][1]} | {mem} | {note} |")
            lines.append("")
    if data is not None and not data.empty:
        lines += ["## Data path", "",
                  "Loader img/s: the batch source alone (decode/augment/transfer). Real vs synthetic: the eager",
                  "training step fed by the source, as a fraction of the same step on one GPU-resident batch.", "",
                  "| device | tag | model | method | batch | source | loader img/s | synthetic img/s | real img/s "
                  "| real / synthetic |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data.itertuples():
            step = ("-", "-", "-") if r.synthetic_img_per_s != r.synthetic_img_per_s else (  # NaN: --data-only
                f"{r.synthetic_img_per_s:.0f}", f"{r.real_img_per_s:.0f}", f"{100 * r.ratio:.1f}%")
            lines.append(f"| {r.device} | {r.tag} | {r.model} | {r.method} | {r.batch} | {r.source} | "
                         f"{r.loader_img_per_s:.0f} | {step[0]} | {step[1]} | {step[2]} |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, rows: list[Row], data_rows: list[DataRow]) -> tuple[Path, Path]:
    from repro.checkpoint import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    csv = out.with_suffix(".csv")
    data_csv = out.parent / f"{out.name}_data.csv"
    runs = _merge_csv(csv, [asdict(r) for r in rows],
                      ["device", "tag", "variant", "model", "method", "batch", "compile"]) \
        if rows or csv.exists() else None
    data = _merge_csv(data_csv, [asdict(r) for r in data_rows],
                      ["device", "tag", "model", "method", "batch", "source"]) \
        if data_rows or data_csv.exists() else None
    md = out.with_suffix(".md")
    atomic_write_text(md, render_markdown(runs, data) + "\n")
    return md, csv


# ----------------------------------------------------------------------------------------------- CLI


def _batch_for(method: str, model: str, device: torch.device, given: dict[str, int]) -> int:
    if method in given:
        return given[method]
    if "*" in given:
        return given["*"]
    if device.type != "cuda":
        return CPU_BATCH
    b = GPU_BATCH.get(model, 128)
    return b * 8 if method == "micl" else b


def _parse_batch(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        key, _, value = item.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"--batch {item!r}: expected N or METHOD=N") from None
        if n < 1 or (key and key not in METHODS):
            raise ConfigError(f"--batch {item!r}: expected a positive N or METHOD=N with a registered method")
        out[key or "*"] = n
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("methods", nargs="*", metavar="METHOD", help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--model", nargs="+", default=None,
                   help=f"model presets: {', '.join(MODELS)} or a recipe name ({', '.join(RECIPES)}); "
                        "default vit_b on CUDA, tiny on CPU")
    p.add_argument("--batch", nargs="+", default=[], metavar="N|METHOD=N",
                   help=f"per-device batch (default on CUDA {GPU_BATCH}, MiCL x8; {CPU_BATCH} on CPU)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="eager, torch.compile, or both side by side (default both)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default: bf16 autocast)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (median reported; default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (compilation, autotune; default 5)")
    p.add_argument("--data", default=None, help="also measure the data path on this dataset (ImageFolder/CIFAR)")
    p.add_argument("--data-only", action="store_true",
                   help="with --data: measure the data path alone (stages per core, loader img/s), no training steps")
    p.add_argument("--decode", nargs="+", default=None, choices=("pil", "fast", "gpu"),
                   help="streamed datasets: the data.decode pipelines to measure side by side (default: pil fast, and "
                        "gpu on CUDA)")
    p.add_argument("--stage-images", type=int, default=200,
                   help="images per (method, pipeline) in the per-stage breakdown (default 200)")
    p.add_argument("--num-workers", type=int, default=-1,
                   help="DataLoader workers for streamed datasets (-1: one per core this process may use, less one)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every method (as repro.run --set)")
    p.add_argument("--variant", nargs="+", default=["tuned"], choices=sorted(VARIANTS),
                   help="how the step runs: tuned (the trainer: SDPA attention, fused AdamW, no host sync), naive "
                        "(softmax attention, per-parameter AdamW, loss.item() every step: the official codes' "
                        "habits), or one optimisation undone (naive-attn, loop-adamw, foreach-adamw, sync)")
    p.add_argument("--tag", default="current", help="label of this measurement (e.g. before / after)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="results/throughput", help="writes OUT.md, OUT.csv (default results/throughput)")
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak measurement")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from repro.data import DataError

    try:
        return _main(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; one of {', '.join(METHODS)}")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    if args.data_only and not args.data:
        raise ConfigError("--data-only needs --data PATH")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    methods = args.methods or list(METHODS)
    models = args.model or (["vit_b"] if device.type == "cuda" else ["tiny"])
    for m in models:
        if m not in MODELS and m not in RECIPES:
            raise ConfigError(f"--model {m!r}: not one of {', '.join([*MODELS, *RECIPES])}")
    given = _parse_batch(args.batch)
    sets: dict[str, Any] = dict(parse_set_args(args.sets))
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    amp = not args.no_amp
    dtype = torch.bfloat16 if device.type == "cuda" and amp else torch.float32
    size = args.peak_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak_flops(device, dtype, n=size, repeats=20 if device.type == "cuda" else 8)
    log.info("%s: measured %s matmul peak %.1f TFLOP/s", device_name(device), str(dtype).removeprefix("torch."),
             peak / 1e12)
    data = None
    if args.data:  # decoded once (in-memory datasets), before any timing; a bad path fails here
        from repro.data import load_data

        data = load_data(DataConfig(path=args.data, num_workers=args.num_workers))
    from repro.data import FileImages

    streamed = data is not None and isinstance(data.train, FileImages)
    decodes = args.decode or (["pil", "fast", "gpu"] if device.type == "cuda" else ["pil", "fast"])
    rows: list[Row] = []
    data_rows: list[DataRow] = []
    stage_rows: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as tmp:
        for model in models:
            for name in methods:
                batch = _batch_for(name, model, device, given)
                if streamed:
                    stage_rows += _stages(name, model, batch, data, device, args, Path(tmp), sets)
                for v in ([] if args.data_only else args.variant):
                    for c in compiles:
                        r = bench_method(name, model, batch, compile=c, amp=amp, steps=args.steps,
                                         warmup=args.warmup, device=device, peak=peak, tag=args.tag,
                                         scratch=Path(tmp), sets=sets, variant=VARIANTS[v])
                        rows.append(r)
                        log.info("%-6s %-7s %-12s batch %4d %-8s %8.0f img/s %7.1f ms/step %6.1f TFLOP/s MFU %5.1f%%%s",
                                 model, name, r.variant, batch, "compiled" if c else "eager", r.img_per_s,
                                 r.ms_per_step, r.tflops, 100 * r.mfu, f" ({r.note})" if r.note else "")
                for decode in (decodes if streamed else ["fast"]) if data is not None else []:
                    d = bench_data(name, model, batch, data, amp=amp, steps=args.steps, warmup=args.warmup,
                                   device=device, tag=args.tag, scratch=Path(tmp), sets=sets,
                                   num_workers=args.num_workers, decode=decode, with_step=not args.data_only)
                    data_rows.append(d)
                    log.info("%-6s %-7s data: %s loader %.0f img/s; step real %.0f vs synthetic %.0f img/s (%.1f%%)",
                             model, name, d.source, d.loader_img_per_s, d.real_img_per_s, d.synthetic_img_per_s,
                             100 * d.ratio)
    md, csv = write_results(Path(args.out), rows, data_rows)
    log.info("wrote %s and %s", md, csv)
    if stage_rows:
        from repro.bench_data import write_stages

        log.info("wrote %s", write_stages(Path(args.out), stage_rows, _merge_csv))
    return 0


def _stages(name: str, model: str, batch: int, data: Any, device: torch.device, args: argparse.Namespace,
            scratch: Path, sets: dict[str, Any]) -> list[Any]:
    """The per-stage, per-core breakdown of each ``--decode`` pipeline for this method's views."""
    from repro.bench_data import measure_stages

    cfg = model_config(name, model, batch, compile=False, amp=False, sets=sets)
    method = build(cfg, torch.device("cpu"), scratch)
    out = []
    for decode in args.decode or ["pil", "fast", "gpu"]:
        r = measure_stages(data.train, method.views, method.backbone.img_size, decode, images=args.stage_images,
                           batch=batch, device=device, method=name, tag=args.tag, device_label=device_name(device))
        out.append(r)
        log.info("%-7s %d view(s) @%d decode=%-4s %s -> %.2f ms/img, %.0f img/s per core", name, r.views, r.size,
                 decode, " ".join(f"{k} {getattr(r, k + '_ms'):.2f}" for k in ("read", "decode", "crop", "augment",
                                                                              "collate")),
                 r.worker_ms, r.img_per_s_per_core)
    return out


if __name__ == "__main__":
    sys.exit(main())
