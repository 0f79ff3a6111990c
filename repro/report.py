"""``python -m repro.report``: result records -> markdown and CSV tables and PNG plots in ``results/``.

One table per dataset: a row per (method, model, budget), pre-training facts (steps, epochs, time, img/s,
device-hours, seeds), then one column per evaluation with mean ± std over seeds (just the mean for one
seed). The random-init row is the same evaluations on an untrained backbone: the floor. When the same
(method, model, budget, eval, metric, seed) was measured more than once, the latest record counts.

Output is a pure function of the records: running the report twice changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from repro.checkpoint import atomic_write, atomic_write_text
from repro.records import ReadProblem, ResultRecord, read_all

KEY = ["dataset", "method", "model", "budget", "eval", "metric", "seed"]
EVAL_ORDER = ["knn", "linear", "finetune", "ade20k", "coco"]


def records_frame(records: list[ResultRecord]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame(columns=[*KEY, "value", "status", "time"])
    df = pd.DataFrame([r.__dict__ for r in records])
    df = df[df["status"] == "ok"]
    # latest measurement of each key wins (re-runs append; nothing is rewritten)
    df = df.sort_values("time", kind="stable").drop_duplicates(KEY, keep="last")
    return df.reset_index(drop=True)


def _fmt(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return ""
    if len(v) == 1:
        return f"{v.iloc[0]:.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _method_order(methods: list[str]) -> list[str]:
    from repro.registry import METHODS

    known = [m for m in METHODS if m in methods]
    other = sorted(m for m in methods if m not in METHODS and m != "random-init")
    return known + other + (["random-init"] if "random-init" in methods else [])


def dataset_table(df: pd.DataFrame) -> pd.DataFrame:
    """One dataset's rows -> the comparison table (strings, ready to print)."""
    rows = []
    groups = df.groupby(["method", "model", "budget"], sort=False)
    evals = [e for e in EVAL_ORDER if e in set(df["eval"])] + sorted(set(df["eval"]) - set(EVAL_ORDER) - {"pretrain"})
    for (method, model, budget), g in groups:
        pre = g[g["eval"] == "pretrain"]
        row = {"method": method, "model": model, "budget": budget}
        seeds = sorted(set(g["seed"]))
        row["seeds"] = len(seeds)
        if not pre.empty:
            row["steps"] = f"{pre['steps'].mean():.0f}"
            row["epochs"] = f"{pre['epochs'].mean():.1f}"
            row["pretrain time"] = f"{pre['pretrain_seconds'].mean():.0f}s"
            row["img/s"] = f"{pre['images_per_second'].mean():.0f}"
            row["device-hours"] = f"{pre['device_hours'].mean():.3f}"
            row["final loss"] = _fmt(pre["value"])
        else:
            for k in ("steps", "epochs", "pretrain time", "img/s", "device-hours", "final loss"):
                row[k] = "0" if method == "random-init" and k in ("steps", "epochs") else ""
        for e in evals:
            sub = g[(g["eval"] == e) & (g["metric"] == "top1")]
            row[f"{e} top1"] = _fmt(sub["value"])
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = {m: i for i, m in enumerate(_method_order(list(table["method"].unique())))}
    table["_o"] = table["method"].map(order)
    return table.sort_values(["_o", "model", "budget"], kind="stable").drop(columns="_o").reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_budget(df: pd.DataFrame, path: Path) -> bool:
    """Accuracy of every eval against pre-training device-hours, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = df[df["eval"] == "pretrain"][["method", "model", "budget", "seed", "device_hours"]]
    acc = df[(df["eval"] != "pretrain") & (df["metric"] == "top1")]
    evals = [e for e in EVAL_ORDER if e in set(acc["eval"])] + sorted(set(acc["eval"]) - set(EVAL_ORDER))
    if acc.empty or not evals:
        return False
    merged = acc.drop(columns=["device_hours"]).merge(pre, on=["method", "model", "budget", "seed"], how="left")
    merged["device_hours"] = merged["device_hours"].fillna(0.0)
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 3.8), squeeze=False)
    for ax, e in zip(axes[0], evals, strict=True):
        sub = merged[merged["eval"] == e]
        for method in _method_order(list(sub["method"].unique())):
            m = sub[sub["method"] == method].groupby("device_hours")["value"].agg(["mean", "std"]).reset_index()
            if method == "random-init":
                ax.axhline(m["mean"].iloc[0], color="gray", linestyle="--", label="random-init")
                continue
            ax.errorbar(m["device_hours"], m["mean"], yerr=m["std"].fillna(0), marker="o", capsize=3, label=method)
        ax.set_xlabel("pre-training device-hours")
        ax.set_ylabel(f"{e} top-1 (%)")
        ax.set_title(e)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, metadata={"Software": None}))
    plt.close(fig)
    return True


def generate(results_dir: Path) -> list[Path]:
    """Regenerate every table and plot from ``results_dir/records``; returns the files written."""
    results_dir = Path(results_dir)
    records, problems = read_all(results_dir / "records")
    df = records_frame(records)
    written: list[Path] = []
    index = ["# Results", "", "Generated by `python -m repro.report` from `records/*.jsonl` (append-only; one JSON "
             "line per number with its command context: device, seed, budget, config hash, git revision).", ""]
    for dataset in sorted(df["dataset"].unique()) if not df.empty else []:
        sub = df[df["dataset"] == dataset]
        table = dataset_table(sub)
        md_path, csv_path, png_path = (results_dir / f"{dataset}.md", results_dir / f"{dataset}.csv",
                                       results_dir / f"{dataset}_accuracy_vs_budget.png")
        devices = sorted({d for d in sub["device"].dropna() if d})
        md = [f"# {dataset}", "", to_markdown(table),
              "Budgets are per method (pre-training wall-clock on the device below, or epochs/steps/FLOPs). "
              "Accuracies are top-1 (%) on the test split; mean ± std over seeds when there are several. "
              "random-init: the same evaluations on an untrained backbone (the floor).", "",
              f"Devices: {', '.join(devices) or 'n/a'}", ""]
        if plot_accuracy_vs_budget(sub, png_path):
            md.append(f"![accuracy vs budget]({png_path.name})\n")
            written.append(png_path)
        atomic_write_text(md_path, "\n".join(md))
        atomic_write_text(csv_path, table.to_csv(index=False))
        written += [md_path, csv_path]
        index.append(f"- [{dataset}]({md_path.name}) ([csv]({csv_path.name})) — {len(sub)} records")
    if problems:
        index += ["", "## Unreadable record lines", ""]
        index += [f"- {Path(p.path).name}:{p.line}: {p.reason}" for p in problems]
    index_path = results_dir / "README.md"
    atomic_write_text(index_path, "\n".join(index) + "\n")
    written.append(index_path)
    return written


def report_problems(problems: list[ReadProblem]) -> None:
    for p in problems:
        print(f"repro.report: warning: {p.path}:{p.line}: {p.reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repro.report", description="Regenerate results/ tables and "
                                 "plots from results/records/*.jsonl.")
    ap.add_argument("--results", default="results", help="results directory (default: ./results)")
    args = ap.parse_args(argv)
    results_dir = Path(args.results)
    if not results_dir.exists():
        print(f"repro.report: error: {results_dir}: no such results directory", file=sys.stderr)
        return 2
    _, problems = read_all(results_dir / "records")
    report_problems(problems)
    for p in generate(results_dir):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
