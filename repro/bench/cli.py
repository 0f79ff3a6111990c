"""The ``python -m repro.bench`` command line (see :mod:`repro.bench`)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from repro.bench.datapath import DataRow, bench_data
from repro.bench.steps import (
    CPU_BATCH,
    GPU_BATCH,
    MODELS,
    VARIANTS,
    Row,
    bench_method,
    build,
    device_name,
    model_config,
)
from repro.bench.tables import write_results
from repro.config import ConfigError, DataConfig, parse_set_args
from repro.flops import matmul_peak_flops
from repro.precision import resolve_precision
from repro.recipes import RECIPES
from repro.registry import METHODS

log = logging.getLogger("repro.bench")


def _batch_for(method: str, model: str, device: torch.device, given: dict[str, int]) -> int:
    if method in given:
        return given[method]
    if "*" in given:
        return given["*"]
    if device.type != "cuda":
        return CPU_BATCH
    b = GPU_BATCH.get(model, 128)
    if method != "micl":
        return b
    # MiCL x8, kept to whole loss groups of its default size (1800): a batch above one group must split into groups
    from repro.micl import MiCLConfig

    group = MiCLConfig().loss_group_size or b * 8
    return b * 8 if b * 8 <= group else group * (b * 8 // group)


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
    from repro import bench  # the package's docstring is the help text; deferred: the package imports this module

    doc = bench.__doc__ or ""
    p = argparse.ArgumentParser(prog="python -m repro.bench", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(doc.split("\n\n")[1:]))
    p.add_argument("methods", nargs="*", metavar="METHOD", help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--model", nargs="+", default=None,
                   help=f"model presets: {', '.join(MODELS)} or a recipe name ({', '.join(RECIPES)}); "
                        "default vit_b on CUDA, tiny on CPU")
    p.add_argument("--batch", nargs="+", default=[], metavar="N|METHOD=N",
                   help=f"per-device batch (default on CUDA {GPU_BATCH}, MiCL x8; {CPU_BATCH} on CPU)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="eager, torch.compile, or both side by side (default both)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="train.precision of the step (default auto: bf16 on CUDA, fp32 on CPU; repro.precision)")
    p.add_argument("--no-amp", action="store_true", help="deprecated: --precision fp32")
    p.add_argument("--roofline", action="store_true",
                   help="CPU roofline instead of the step table: the matmul roof measured at the model's shapes, "
                        "each method's achieved GFLOP/s in fp32 and bf16 (alternating), 1 vs all threads, the data "
                        "path's share and torch.compile against a 90-s demo (default model cifar10-cpu, batch 128, "
                        "2 steps per block; see repro.bench.roofline)")
    p.add_argument("--compile-methods", nargs="*", default=["micl"], metavar="METHOD",
                   help="with --roofline: the methods whose compiled step is measured (default micl; compiling costs "
                        "~15-150 s per method and precision on 2 shared cores)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (median reported; default 30, with --roofline 2 per block)")
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
    if args.steps is None:
        args.steps = 2 if args.roofline else 30
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
    precision = "fp32" if args.no_amp else args.precision
    if args.roofline:
        return _roofline(args, methods, device, given, sets)
    dtype = torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32
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
    failed: list[str] = []
    stage_rows: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as tmp:
        for model in models:
            for name in methods:
                batch = _batch_for(name, model, device, given)
                if streamed:
                    stage_rows += _stages(name, model, batch, data, device, args, Path(tmp), sets)
                for v in ([] if args.data_only else args.variant):
                    for c in compiles:
                        try:
                            r = bench_method(name, model, batch, compile=c, precision=precision, steps=args.steps,
                                             warmup=args.warmup, device=device, peak=peak, tag=args.tag,
                                             scratch=Path(tmp), sets=sets, variant=VARIANTS[v])
                        except ConfigError:
                            raise  # the user's arguments: one line, exit 2
                        except Exception as e:  # one method's failure (a compile error, OOM) must not lose the rest
                            failed.append(f"{model} {name} {v} {'compiled' if c else 'eager'}")
                            log.error("%s %s %s %s failed: %s", model, name, v, "compiled" if c else "eager",
                                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                            continue
                        rows.append(r)
                        write_results(Path(args.out), rows, data_rows)  # a bench cut short keeps what it measured
                        log.info("%-6s %-7s %-12s batch %4d %-8s %8.0f img/s %7.1f ms/step %6.1f TFLOP/s MFU %5.1f%%%s",
                                 model, name, r.variant, batch, "compiled" if c else "eager", r.img_per_s,
                                 r.ms_per_step, r.tflops, 100 * r.mfu, f" ({r.note})" if r.note else "")
                for decode in (decodes if streamed else ["fast"]) if data is not None else []:
                    d = bench_data(name, model, batch, data, precision=precision, steps=args.steps,
                                   warmup=args.warmup,
                                   device=device, tag=args.tag, scratch=Path(tmp), sets=sets,
                                   num_workers=args.num_workers, decode=decode, with_step=not args.data_only)
                    data_rows.append(d)
                    log.info("%-6s %-7s data: %s loader %.0f img/s; step real %.0f vs synthetic %.0f img/s (%.1f%%)",
                             model, name, d.source, d.loader_img_per_s, d.real_img_per_s, d.synthetic_img_per_s,
                             100 * d.ratio)
    md, csv = write_results(Path(args.out), rows, data_rows)
    log.info("wrote %s and %s", md, csv)
    if stage_rows:
        from repro.bench.data_stages import write_stages

        log.info("wrote %s", write_stages(Path(args.out), stage_rows))
    if failed:
        log.error("%d measurement(s) failed: %s", len(failed), "; ".join(failed))
        return 1
    return 0


def _stages(name: str, model: str, batch: int, data: Any, device: torch.device, args: argparse.Namespace,
            scratch: Path, sets: dict[str, Any]) -> list[Any]:
    """The per-stage, per-core breakdown of each ``--decode`` pipeline for this method's views."""
    from repro.bench.data_stages import measure_stages

    cfg = model_config(name, model, batch, compile=False, precision="fp32", sets=sets)
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


def _roofline(args: argparse.Namespace, methods: list[str], device: torch.device, given: dict[str, int],
              sets: dict[str, Any]) -> int:
    """``--roofline``: the CPU roofline rows of ``methods`` into OUT_roofline.csv and OUT.md's CPU section."""
    from repro.bench.roofline import bench_roofline

    if device.type != "cpu":
        raise ConfigError("--roofline measures the CPU: use --device cpu on a CUDA machine")
    if args.model and len(args.model) > 1:
        raise ConfigError("--roofline takes one --model (default cifar10-cpu)")
    model = args.model[0] if args.model else "cifar10-cpu"
    unknown = [m for m in args.compile_methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--compile-methods: unknown method {unknown[0]!r}")
    batch = given.get("*", 128)
    tag = args.tag if args.tag != "current" else "roofline"
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as tmp:
        for name in methods:  # written method by method: a bench cut short keeps what it measured
            rows = bench_roofline([name], recipe=model, batch=batch, steps=args.steps,
                                  warmup=max(1, args.warmup // 5),
                                  compile_methods=tuple(m for m in args.compile_methods if m == name), tag=tag,
                                  scratch=Path(tmp), sets=sets, log=log.info)
            md, _ = write_results(Path(args.out), [], [], rows)
            log.info("wrote %s and %s", md, Path(args.out).parent / f"{Path(args.out).name}_roofline.csv")
    return 0
