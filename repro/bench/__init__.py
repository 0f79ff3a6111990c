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

``--roofline`` (CPU) measures instead how near each method comes to the CPU's matmul roof in fp32 and bf16, the
roof itself measured at the model's shapes, with threads, ``torch.compile`` and the data path's share beside it
(``OUT_roofline.csv``, and a section of ``OUT.md``).

Modules: ``steps`` (a method's step, built and timed), ``datapath`` (the batch source against the step),
``data_stages`` (the data path stage by stage, per worker core, and the generated JPEGs), ``roofline`` (the CPU
roofline), ``tables`` (CSV + markdown), ``cli`` (this command).

    python -m repro.bench                                     # every method, ViT-B/16 at 224 (GPU) or tiny (CPU)
    python -m repro.bench mae micl --model vit_s vit_b vit_l --compile both --tag after
    python -m repro.bench micl --model cifar10 --data /data/cifar10   # GPU-resident data path vs synthetic
    python -m repro.bench --roofline                          # CPU: fp32 vs bf16 against the measured roof
"""

from repro.bench.cli import build_parser, main
from repro.bench.datapath import DataRow, bench_data
from repro.bench.roofline import RooflineRow, bench_roofline
from repro.bench.steps import (
    MODELS,
    VARIANTS,
    Row,
    Variant,
    bench_method,
    build,
    device_name,
    make_step,
    model_config,
    synthetic_batch,
    time_steps,
)
from repro.bench.tables import render_markdown, write_results

__all__ = [
    "MODELS",
    "VARIANTS",
    "DataRow",
    "RooflineRow",
    "Row",
    "Variant",
    "bench_data",
    "bench_method",
    "bench_roofline",
    "build",
    "build_parser",
    "device_name",
    "main",
    "make_step",
    "model_config",
    "render_markdown",
    "synthetic_batch",
    "time_steps",
    "write_results",
]
