"""Measure how far each method's golden losses drift across CPU kernel sets and thread counts.

    python -m tests.golden.drift [--caps default avx2 avx512] [--threads 1 2] [--dtypes float32 float64]

Runs the golden tests' ``first_logs`` in a fresh process per (``ATEN_CPU_CAPABILITY``, thread count, dtype) —
the kernel set is chosen when torch loads — and prints, per method and dtype, the greatest relative difference
from the golden file at step 0 and at steps 1-19. The tolerances in ``test_golden.py`` are set from this output.
A capability the CPU lacks falls back to the best it has (the ``cap`` column says which ran).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _child(dtype_name: str, threads: int) -> None:
    import torch

    from repro.registry import METHODS
    from tests.golden.test_golden import first_logs

    dtype = getattr(torch, dtype_name)
    out = {"cap": torch.backends.cpu.get_cpu_capability()}
    for method in sorted(METHODS):
        with tempfile.TemporaryDirectory() as d:
            out[method] = [x["loss"] for x in first_logs(method, Path(d), dtype, threads)]
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caps", nargs="+", default=["default", "avx2", "avx512"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--child", nargs=2, metavar=("DTYPE", "THREADS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child[0], int(a.child[1]))
        return 0
    files = {"float32": "losses.json", "float64": "losses_fp64.json"}
    worst: dict[tuple[str, str], list[float]] = {}
    for dtype in a.dtypes:
        golden = json.loads((Path(__file__).with_name(files[dtype])).read_text())
        for cap in a.caps:
            for th in a.threads:
                env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "PYTHONPATH": str(ROOT)}
                res = subprocess.run([sys.executable, "-m", "tests.golden.drift", "--child", dtype, str(th)], env=env,
                                     cwd=ROOT, capture_output=True, text=True, check=True)
                run = json.loads(res.stdout.strip().splitlines()[-1])
                for method, want in golden.items():
                    rel = [abs(g - w) / abs(w) for g, w in zip(run[method], want, strict=True)]
                    print(f"{dtype} {cap:>7s}->{run['cap']:<7s} threads={th} {method:7s} step0 {rel[0]:.1e} "
                          f"later {max(rel[1:]):.1e} (step {1 + rel[1:].index(max(rel[1:]))})", flush=True)
                    w = worst.setdefault((dtype, method), [0.0, 0.0])
                    w[0], w[1] = max(w[0], rel[0]), max(w[1], max(rel[1:]))
    print("\nworst relative drift from the golden files:")
    for (dtype, method), (s0, later) in sorted(worst.items()):
        print(f"  {dtype} {method:7s} step0 {s0:.1e}  steps 1-19 {later:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
