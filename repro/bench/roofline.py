"""The CPU roofline, measured: how near each method's training step comes to this CPU's matmul rate, in fp32 and bf16.

The roof is not a datasheet number: it is the best fwd+bwd rate of ``F.linear`` at the shapes the ViT's blocks run
(rows = batch x (tokens + 1); (D, 3D) qkv, (D, D) proj, (D, 4D) fc1, (4D, D) fc2), timed in the same process just
before the methods, per precision and per thread count. Against it: each method's achieved training GFLOP/s
(analytic FLOPs per image from :mod:`repro.flops` x img/s of the trainer's own step, fed by the in-memory batch
source as in training, so the data path's share is measured in the same loop). Also measured side by side, because
they are the other knobs a CPU user has: ``torch.set_num_threads`` (the cores this process is given vs one), and
``torch.compile`` of the step with its compile time charged against a short wall-clock demo (90 s): a compiled step
that is faster but costs more to compile than it saves in the demo does not pay there.

The cores are shared with other work: the fp32 and bf16 measurements of a method alternate in short blocks (the
order flips every block), so contention that comes and goes hits both precisions alike; medians are reported.
"""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from repro.bench.steps import build, make_step, model_config
from repro.flops import matmul_peak_flops

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEMO_SECONDS = 90.0
"""The wall-clock demo a compile must pay for itself in (``repro.run --budget 90s``)."""


def cpu_name() -> str:
    """This CPU's ``model name`` from /proc/cpuinfo (the platform's processor string where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class RooflineRow:
    device: str
    """CPU model name and the cores this process may use."""
    tag: str
    model: str
    method: str
    batch: int
    precision: str
    threads: int
    compile: bool
    img_per_s: float
    """Of the training step alone (forward, backward, optimizer, post-step hook); the data path is beside it."""
    ms_per_step: float
    data_ms_per_step: float
    """Median seconds in ``next(batches)`` per step: the in-memory source (index, crop, augment on the CPU)."""
    data_share: float
    """Data time / (data + step): the share of a training loop's wall-clock the data path takes here."""
    gflop_per_img: float
    achieved_gflops: float
    peak_gflops: float
    """Measured ``F.linear`` fwd+bwd GFLOP/s at the model's block shapes, same precision and threads."""
    square_peak_gflops: float
    """Measured (1024 x 1024) @ (1024 x 1024) matmul GFLOP/s, same precision and threads (the usual 'peak')."""
    roof_ratio: float
    """achieved / peak: how much of the matmul roof the whole step reaches."""
    compile_s: float
    """Compiled rows: seconds the first call costs beyond an eager step (tracing, code generation); else 0."""
    demo_steps: float
    """Steps that fit in :data:`DEMO_SECONDS` of wall-clock (compile time charged), data path included."""
    torch: str
    date: str
    note: str = ""


def linear_shapes(embed_dim: int, mlp_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(in, out) of a ViT block's four linears."""
    hidden = int(embed_dim * mlp_ratio)
    return [(embed_dim, 3 * embed_dim), (embed_dim, embed_dim), (embed_dim, hidden), (hidden, embed_dim)]


def linear_rate(rows: int, shapes: list[tuple[int, int]], dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of ``repeats`` passes of fwd+bwd (input and weight gradients) through ``shapes`` at ``rows`` rows."""
    g = torch.Generator().manual_seed(0)
    layers = []
    for fan_in, fan_out in shapes:
        x = torch.randn(rows, fan_in, generator=g).to(dtype).requires_grad_(True)
        w = (torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5).to(dtype).requires_grad_(True)
        b = torch.zeros(fan_out, dtype=dtype, requires_grad=True)
        layers.append((x, w, b, torch.randn(rows, fan_out, generator=g).to(dtype)))

    def once() -> None:
        for x, w, b, grad in layers:
            F.linear(x, w, b).backward(grad)

    once()  # warm-up: allocations, oneDNN primitive creation
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    seconds = time.perf_counter() - t0
    flops = sum(6.0 * rows * i * o for i, o in shapes) * repeats
    return flops / seconds


def measure_peaks(embed_dim: int, rows: int, threads: int, trials: int = 3) -> dict[str, tuple[float, float]]:
    """precision -> (block-shape linear peak, square matmul peak) in FLOP/s on ``threads`` threads: the best of
    ``trials``, fp32 and bf16 alternating."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = {p: [0.0, 0.0] for p in PRECISIONS}
    try:
        for t in range(trials):
            for p in PRECISIONS if t % 2 == 0 else PRECISIONS[::-1]:
                best[p][0] = max(best[p][0], linear_rate(rows, linear_shapes(embed_dim), DTYPES[p]))
                best[p][1] = max(best[p][1], matmul_peak_flops(torch.device("cpu"), DTYPES[p], n=1024, repeats=4,
                                                               trials=1))
    finally:
        torch.set_num_threads(before)
    return {p: (v[0], v[1]) for p, v in best.items()}


class _Loop:
    """One method in one precision (and compile mode): the trainer's step fed by the in-memory batch source."""

    def __init__(self, method_name: str, recipe: str, batch: int, precision: str, compile: bool, data: Any,
                 scratch: Path, sets: dict[str, Any]) -> None:
        from repro.sources import StepSampler, make_batch_source

        device = torch.device("cpu")
        self.cfg = model_config(method_name, recipe, batch, compile=compile, precision=precision,
                                sets={"train.device": "cpu", **sets})
        torch.manual_seed(0)
        self.method = build(self.cfg, device, scratch)
        self.step = make_step(self.cfg, self.method, device)
        sampler = StepSampler(len(data.train), batch, seed=0)
        self.source = make_batch_source(data, self.method.views, self.method.backbone.img_size, sampler, device,
                                        self.cfg.data)
        self.it: Iterator[Any] = self.source.batches(0, 10**6)
        self.i = 0

    def run(self, n: int) -> list[tuple[float, float]]:
        """(data seconds, step seconds) of each of ``n`` steps."""
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            batch = next(self.it)
            t1 = time.perf_counter()
            self.step(batch, self.i)
            out.append((t1 - t0, time.perf_counter() - t1))
            self.i += 1
        return out


def _median(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def bench_roofline(methods: list[str], *, recipe: str = "cifar10-cpu", batch: int = 128, steps: int = 4,
                   warmup: int = 1, blocks: int = 2, compile_methods: tuple[str, ...] = ("micl",),
                   threads: tuple[int, ...] | None = None, tag: str = "roofline", scratch: Path,
                   sets: dict[str, Any] | None = None, log: Any = None) -> list[RooflineRow]:
    """The roofline rows of ``methods`` on the CPU (see the module docstring).

    Per method: ``blocks`` alternating blocks of ``steps`` steps per precision on the default thread count, one
    block per precision on each other entry of ``threads``, and for ``compile_methods`` the compiled step per
    precision (its first call, less one eager step, charged as compile time, then ``steps`` steady steps)."""
    from repro.data import load_data

    sets = dict(sets or {})
    cores = torch.get_num_threads()
    threads = threads or tuple(sorted({cores, 1}, reverse=True))
    device = f"{cpu_name()} ({cores} threads)"
    today, version = _dt.date.today().isoformat(), torch.__version__
    data = load_data(model_config(methods[0], recipe, batch, compile=False, sets=sets).data)
    probe = build(model_config(methods[0], recipe, batch, compile=False, sets=sets), torch.device("cpu"),
                  scratch).backbone
    rows_per_batch = batch * (probe.vit.patch_embed.num_patches + 1)
    best: dict[tuple[int, str], list[float]] = {(t, p): [0.0, 0.0] for t in threads for p in PRECISIONS}

    def remeasure_peaks() -> None:
        """One more trial of the roof per thread count: the roof is the best seen over the whole run, so a trial
        slowed by other work on the cores does not lower it."""
        for t in threads:
            for p, (lin, square) in measure_peaks(probe.embed_dim, rows_per_batch, t, trials=1).items():
                best[t, p] = [max(best[t, p][0], lin), max(best[t, p][1], square)]

    raw: list[tuple[str, float, str, int, bool, list[tuple[float, float]], float]] = []
    for name in methods:
        remeasure_peaks()
        loops = {p: _Loop(name, recipe, batch, p, False, data, scratch, sets) for p in PRECISIONS}
        flops = float(loops["fp32"].method.flops_per_image())
        for t in threads:
            torch.set_num_threads(t)
            try:
                times: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}
                for p in PRECISIONS:
                    loops[p].run(warmup)
                for b in range(blocks if t == cores else 1):
                    for p in PRECISIONS if b % 2 == 0 else PRECISIONS[::-1]:
                        times[p] += loops[p].run(steps)
            finally:
                torch.set_num_threads(cores)
            raw += [(name, flops, p, t, False, times[p], 0.0) for p in PRECISIONS]
            if log:
                log("%-7s %d thr eager: %s", name, t, ", ".join(f"{p} {batch / _median(times[p])[1]:.0f} img/s"
                                                                for p in PRECISIONS))
        del loops
        if name not in compile_methods:
            continue
        for p in PRECISIONS:
            try:
                loop = _Loop(name, recipe, batch, p, True, data, scratch, sets)
                first = loop.run(1)
                steady = loop.run(steps)
            except Exception as e:  # noqa: BLE001 - a compiler failure is a finding of the bench, not its end
                raw.append((name, flops, p, cores, True, [], float("nan")))
                if log:
                    log("%-7s %s compile failed: %s", name, p, e)
                continue
            eager = next(r for r in raw if r[0] == name and r[2] == p and r[3] == cores and not r[4])
            data_s, step_s = _median(eager[5])
            compile_s = max(0.0, sum(d + s for d, s in first) - (data_s + _median(steady)[1]))
            raw.append((name, flops, p, cores, True, steady, compile_s))
            if log:
                log("%-7s %s compiled: %.0f img/s after %.0f s of compiling", name, p,
                    batch / _median(steady)[1], compile_s)
    remeasure_peaks()
    if log:
        for t in threads:
            log("roof at %d threads, %d x %d rows: %s", t, rows_per_batch, probe.embed_dim,
                ", ".join(f"{p} {best[t, p][0] / 1e9:.0f} (square {best[t, p][1] / 1e9:.0f}) GFLOP/s"
                          for p in PRECISIONS))
    out: list[RooflineRow] = []
    for name, flops, p, t, compiled, step_times, compile_s in raw:
        peak, square = best[t, p]
        if not step_times:
            out.append(RooflineRow(device, tag, recipe, name, batch, p, t, compiled, 0.0, 0.0, 0.0, 0.0, flops / 1e9,
                                   0.0, peak / 1e9, square / 1e9, 0.0, 0.0, 0.0, version, today, "compile failed"))
            continue
        data_s, step_s = _median(step_times)
        achieved = flops * batch / step_s
        demo = max(0.0, DEMO_SECONDS - compile_s) / (data_s + step_s)
        out.append(RooflineRow(device, tag, recipe, name, batch, p, t, compiled, batch / step_s, 1000 * step_s,
                               1000 * data_s, data_s / (data_s + step_s), flops / 1e9, achieved / 1e9, peak / 1e9,
                               square / 1e9, achieved / peak, compile_s, demo, version, today))
    return out


def render_roofline(df: Any) -> list[str]:
    """Markdown lines of the CPU roofline section from the roofline CSV's rows."""
    lines = ["## CPU roofline", "",
             "Generated by `python -m repro.bench --roofline` (`repro/bench/roofline.py`). The roof is measured, not",
             "assumed: the best `F.linear` forward+backward rate at the ViT block's shapes (rows = batch x (tokens +",
             "1), widths D, 3D, 4D), per precision and thread count, timed in the same run (the square 1024-matmul",
             "rate beside it). Achieved = analytic FLOPs per image (`repro/flops.py`) x img/s of the trainer's own",
             "step (`repro.trainer.train_step`), median over the timed steps; data = the in-memory batch source's",
             "time per step as a share of data + step. fp32 and bf16 of a method run in alternating blocks (order",
             "flipped each block), so that any contention from other work on the cores hits both alike;",
             "compare columns within a row, not across runs. Demo steps: steps a 90-s budget buys, compile time",
             "charged, data path included.", ""]
    for (dev, tag), g in df.groupby(["device", "tag"], sort=False):
        cores = int(g["threads"].max())
        lines += [f"### {dev}, {tag}", "", "Measured roof (GFLOP/s, fwd+bwd `F.linear` at block shapes; square "
                  "1024 matmul in brackets):", ""]
        for t in sorted({int(x) for x in g["threads"]}, reverse=True):
            pk = {p: g[(g["threads"] == t) & (g["precision"] == p)] for p in PRECISIONS}
            cells = [f"{p} {r['peak_gflops'].iloc[0]:.0f} ({r['square_peak_gflops'].iloc[0]:.0f})"
                     for p, r in pk.items() if not r.empty]
            lines.append(f"- {t} thread{'s' if t > 1 else ''}: {', '.join(cells)}")
        lines += ["", f"Per method, eager, {cores} threads, model `{g['model'].iloc[0]}`, batch "
                  f"{int(g['batch'].iloc[0])}:", "",
                  "| method | GFLOP/img | fp32 img/s | fp32 GFLOP/s | fp32 of roof | bf16 img/s | bf16 GFLOP/s "
                  "| bf16 of roof | bf16 / fp32 | data share fp32 / bf16 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        eager = g[(g["compile"].astype(str) != "True") & (g["threads"] == cores)]
        for method, m in eager.groupby("method", sort=False):
            r = {p: m[m["precision"] == p].iloc[-1] for p in PRECISIONS if not m[m["precision"] == p].empty}
            if len(r) < 2:
                continue
            a, b = r["fp32"], r["bf16"]
            lines.append(f"| {method} | {a['gflop_per_img']:.2f} | {a['img_per_s']:.0f} | {a['achieved_gflops']:.0f} | "
                         f"{100 * a['roof_ratio']:.0f}% | {b['img_per_s']:.0f} | {b['achieved_gflops']:.0f} | "
                         f"{100 * b['roof_ratio']:.0f}% | {b['img_per_s'] / a['img_per_s']:.2f}x | "
                         f"{100 * a['data_share']:.0f}% / {100 * b['data_share']:.0f}% |")
        lines += ["", "Threads and compile (img/s of the step; demo = steps in 90 s with compile time charged):", "",
                  "| method | precision | 1 thread img/s | "
                  f"{cores} threads img/s | speed-up | compiled img/s | compile s | eager demo steps "
                  "| compiled demo steps |", "|---|---|---|---|---|---|---|---|---|"]
        for (method, precision), m in g.groupby(["method", "precision"], sort=False):
            def pick(t: int, c: bool, m: Any = m) -> Any:
                s = m[(m["threads"] == t) & ((m["compile"].astype(str) == "True") == c)]
                return None if s.empty else s.iloc[-1]
            one, full, comp = pick(1, False), pick(cores, False), pick(cores, True)
            if full is None:
                continue
            c_cells = ("-", "-", "-") if comp is None else (
                (f"{comp['img_per_s']:.0f}", f"{comp['compile_s']:.0f}", f"{comp['demo_steps']:.0f}")
                if comp["img_per_s"] > 0 else ("failed", "-", "-"))
            lines.append(f"| {method} | {precision} | {'-' if one is None else f'{one.img_per_s:.0f}'} | "
                         f"{full['img_per_s']:.0f} | "
                         f"{'-' if one is None else f'{full.img_per_s / one.img_per_s:.2f}x'} | {c_cells[0]} | "
                         f"{c_cells[1]} | {full['demo_steps']:.0f} | {c_cells[2]} |")
        notes = sorted({str(n) for n in g["note"] if isinstance(n, str) and n})
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines
