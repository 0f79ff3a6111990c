"""PNG plots: loss curves per dataset and accuracy against pre-training compute."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from repro.checkpoint import atomic_write
from repro.report.curves import curve_path
from repro.report.tables import EVAL_ORDER, UNTRAINED, method_order, ordered


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    """Atomic, byte-reproducible PNG (no software/date metadata), then free the figure."""
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, metadata={"Software": None}))
    _pyplot().close(fig)

def plot_loss_curves(df: pd.DataFrame, results_dir: Path, path: Path) -> bool:
    """Pre-training loss against step from ``results/curves``, one panel per method (losses differ by method)."""
    pre = df[df["eval"] == "pretrain"].sort_values(["model", "budget", "seed"], kind="stable")
    curves = []
    for _, r in pre.iterrows():
        p = curve_path(results_dir, r["dataset"], r["run_method"], r["budget"], r["seed"], r["config_hash"])
        if r["config_hash"] and p.exists():
            curves.append((r, pd.read_csv(p)))
    if not curves:
        return False
    plt = _pyplot()

    methods = method_order(sorted({r["method"] for r, _ in curves}))
    several_models = len({r["model"] for r, _ in curves}) > 1
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for r, c in curves:
            if r["method"] != method:
                continue
            label = f"{r['model']} {r['budget']} s{r['seed']}" if several_models else f"{r['budget']} s{r['seed']}"
            ax.plot(c["step"], c["loss"], marker=".", markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("pre-training loss")
        ax.set_title(method)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def _budget_flops(budget: str) -> float:
    """The FLOPs of a FLOP budget ('1.5e13flop'); NaN for any other kind (or an untrained row's '-')."""
    from repro.budget import BudgetError, parse_budget

    try:
        b = parse_budget(budget)
    except BudgetError:
        return float("nan")
    return b.amount if b.kind == "flop" else float("nan")


def plot_accuracy_vs_budget(df: pd.DataFrame, path: Path) -> bool:
    """Accuracy of every eval against pre-training compute, one line per method: training FLOPs (when every trained
    run had a FLOP budget; log scale) and the measured pre-training wall-clock hours (as measured, so contention on a
    shared machine stretches them: the axis says so).

    Every seed is drawn as a small point; the mean of a budget with several seeds carries its std as an error bar,
    and lines join only budgets with at least two seeds (a one-seed point is never joined to multi-seed means). The
    random-init floor is a dashed line with its seed spread shaded. Panels whose evaluation has no trained row (the
    demo's fine-tune of the scratch backbone alone) are left out."""
    plt = _pyplot()

    pre = df[df["eval"] == "pretrain"][["method", "model", "budget", "seed", "pretrain_seconds"]]
    acc = df[(df["eval"] != "pretrain") & (df["metric"] == "top1")]
    trained_acc = acc[~acc["method"].isin(UNTRAINED)]
    evals = ordered(set(trained_acc["eval"]), EVAL_ORDER)
    if trained_acc.empty or not evals:
        return False
    keep = [c for c in acc.columns if c != "pretrain_seconds"]
    merged = acc[keep].merge(pre, on=["method", "model", "budget", "seed"], how="left")
    merged["hours"] = merged["pretrain_seconds"].fillna(0.0) / 3600
    merged["flops"] = merged["budget"].map(_budget_flops)
    trained = merged[~merged["method"].isin(UNTRAINED)]
    axes_x = [("hours", "pre-training wall-clock hours (measured; contended time included)")]
    if trained["flops"].notna().all():
        axes_x.insert(0, ("flops", "pre-training FLOPs (analytic)"))
    fig, axes = plt.subplots(len(axes_x), len(evals), figsize=(5 * len(evals), 3.8 * len(axes_x)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (xcol, xlabel) in enumerate(axes_x):
        for ax, e in zip(axes[row], evals, strict=True):
            sub = merged[merged["eval"] == e]
            xs = sub[~sub["method"].isin(UNTRAINED)]
            for i, method in enumerate(method_order(list(sub["method"].unique()))):
                msub = sub[sub["method"] == method]
                if method in UNTRAINED:
                    mean, std = msub["value"].mean(), msub["value"].std(ddof=1)
                    style = "--" if method == "random-init" else ":"
                    ax.axhline(mean, color="gray", linestyle=style, label=f"{method} (n={len(msub)})")
                    if len(msub) > 1:
                        ax.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
                    continue
                colour = colours[i % len(colours)]
                ax.scatter(msub[xcol], msub["value"], s=10, color=colour, alpha=0.5)
                m = msub.groupby("budget").agg(x=(xcol, "mean"), mean=("value", "mean"), std=("value", "std"),
                                               n=("value", "size")).sort_values("x")
                multi = m[m["n"] > 1]
                if not multi.empty:
                    ax.errorbar(multi["x"], multi["mean"], yerr=multi["std"], marker="o", capsize=3, color=colour,
                                label=f"{method} (mean ± std)")
                single = m[m["n"] == 1]
                if not single.empty:
                    ax.plot(single["x"], single["mean"], linestyle="none", marker="o", mfc="none", color=colour,
                            label=f"{method} (one seed)")
            if xcol == "flops":
                ax.set_xscale("log")
            elif xs["budget"].nunique() <= 1 and not xs.empty:  # one budget (the demo): an axis from 0, not a sliver
                ax.set_xlim(0, float(xs[xcol].max()) * 1.5 or 1.0)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(f"{e} top-1 (%)")
            ax.set_title(e)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    _save_png(fig, path)
    return True


# --- the index: how each number was produced -----------------------------------------------------------------
