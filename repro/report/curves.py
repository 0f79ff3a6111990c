"""Loss curves: a run's ``metrics.jsonl`` copied into ``results/curves`` so plots outlive the run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from repro.checkpoint import atomic_write_text
from repro.records import ReadProblem, run_dir_path


def curve_path(results_dir: Path, dataset: str, method: str, budget: str, seed: int, config_hash: str) -> Path:
    return Path(results_dir) / "curves" / dataset / f"{method}-{budget.replace('/', '_')}-s{seed}-{config_hash}.csv"


def read_metrics(path: Path) -> tuple[pd.DataFrame, list[ReadProblem]]:
    """A run's ``metrics.jsonl``: one row per logged step (the last line wins where a resumed run re-logged)."""
    rows, problems = [], []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(ReadProblem(str(path), i, f"not a metrics line: {e}"))
            continue
        if not isinstance(rec, dict) or "step" not in rec or "loss" not in rec:
            problems.append(ReadProblem(str(path), i, "not a metrics line: no step and loss"))
            continue
        rows.append(rec)
    if not rows:
        return pd.DataFrame(columns=["step", "loss"]), problems
    df = pd.DataFrame(rows)
    first = [c for c in ("step", "elapsed_s", "loss", "lr", "img_per_s") if c in df]
    df = df[first + sorted(set(df.columns) - set(first))]
    return df.drop_duplicates("step", keep="last").sort_values("step", kind="stable").reset_index(drop=True), problems


def import_curves(runs_dir: Path, results_dir: Path, df: pd.DataFrame) -> tuple[list[Path], list[ReadProblem]]:
    """Copy the loss curve of every recorded pre-training run found under ``runs_dir`` into ``results/curves``."""
    written: list[Path] = []
    problems: list[ReadProblem] = []
    pre = df[df["eval"] == "pretrain"] if not df.empty else df
    for _, r in pre.iterrows():
        if not r["config_hash"]:
            continue
        d = run_dir_path(runs_dir, r["dataset"], r["run_method"], str(r["model"]).split()[0], r["budget"], r["seed"],
                         r["config_hash"])
        if not (d / "metrics.jsonl").exists():
            continue
        curve, probs = read_metrics(d / "metrics.jsonl")
        problems += probs
        if curve.empty:
            continue
        path = curve_path(results_dir, r["dataset"], r["run_method"], r["budget"], r["seed"], r["config_hash"])
        atomic_write_text(path, curve.to_csv(index=False))
        written.append(path)
    return written, problems
