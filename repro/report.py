"""``python -m repro.report``: result records -> markdown and CSV tables and PNG plots in ``results/``.

One table per dataset: a row per (method, model, budget), pre-training facts (steps, epochs, time, img/s,
device-hours, seeds), then one column per (evaluation, metric) with mean ± std over seeds (just the mean for
one seed). The random-init row is the same evaluations on an untrained backbone: the floor. When the same
(method, model, budget, eval, metric, seed) was measured more than once, the latest record counts.

Beside our numbers, the papers' numbers from ``results/reference.csv``: a difference only where the paper's
setting is ours (ImageNet-1k pre-training, same method, architecture and epochs), the rest as context.

Loss curves: ``--runs DIR`` copies each recorded run's ``metrics.jsonl`` into ``results/curves/<dataset>/``
as CSV; the loss plot is drawn from those copies, so it is reproduced without the run directories.

Output is a pure function of ``results/`` (records, reference.csv, curves): running the report twice
changes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

from repro.checkpoint import atomic_write, atomic_write_text
from repro.records import DATA_BOUND_SHARE, ReadProblem, ResultRecord, read_all, run_dir_path

KEY = ["dataset", "method", "model", "budget", "eval", "metric", "seed"]
EVAL_ORDER = ["knn", "linear", "finetune", "ade20k", "coco"]
METRIC_ORDER = ["top1", "top5", "mIoU", "mAcc", "box_AP", "mask_AP"]

# reference.csv: the facts as the shared reference file gives them, then the keys that match them to records
REFERENCE_FACTS = ["method", "arch", "pretrain_epochs", "metric", "value", "source", "verification"]
REFERENCE_KEYS = ["method_key", "model_key", "epochs_key", "eval_key", "metric_key"]
VERIFIED = ("official-repo-doc", "official-repo-figure", "paper-abstract")
"""``verification`` values that mean the number was read in a primary source; anything else is marked."""
UNVERIFIED_MARK = "†"
IMAGENET_1K = {"imagenet", "imagenet1k", "in1k", "ilsvrc2012", "ilsvrc"}
"""Dataset names (lower case, letters and digits only) that are ImageNet-1k pre-training."""
TIMM_DEPTH = {"tiny": 12, "small": 12, "base": 12, "large": 24, "huge": 32, "giant": 40}
BUILTIN_DATASET = "builtin-shapes"

VERIFICATION_RULE = (
    f"{UNVERIFIED_MARK} = unverified. A paper number counts as verified when its `verification` is "
    + ", ".join(f"`{v}`" for v in VERIFIED[:-1]) + f" or `{VERIFIED[-1]}`"
    + " (read in the official repository's documents or figures, or the paper's abstract); any other value "
    "(`unverified`: recalled from the paper, not re-read) is marked."
)
MATCH_RULE = (
    "A paper number is compared with ours only when the setting is the same: ImageNet-1k pre-training, "
    "the same method, the same architecture (timm name at its native resolution, patch size and depth) and "
    "the same number of pre-training epochs (ours rounded to an integer; a paper's unknown or uncertain "
    "epoch count never matches)."
)


SCRATCH = "supervised-scratch"
"""The row of the random-init backbone's fine-tuning: supervised training from scratch with the same recipe and
budget every export is fine-tuned with."""
UNTRAINED = ("random-init", SCRATCH)
"""Rows without pre-training (floors): drawn as horizontal lines, no pre-training command."""


def records_frame(records: list[ResultRecord]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame(columns=[*KEY, "value", "status", "time"])
    df = pd.DataFrame([r.__dict__ for r in records])
    df = df[df["status"] == "ok"]
    # latest measurement of each key wins (re-runs append; nothing is rewritten)
    df = df.sort_values("time", kind="stable").drop_duplicates(KEY, keep="last")
    df.loc[(df["method"] == "random-init") & (df["eval"] == "finetune"), "method"] = SCRATCH
    return df.reset_index(drop=True)


def _fmt(values: pd.Series, seeds: int = 1) -> str:
    v = values.dropna()
    if v.empty:
        return ""
    s = f"{v.iloc[0]:.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"
    return s + (f" (n={len(v)})" if len(v) < seeds else "")


def _method_order(methods: list[str]) -> list[str]:
    from repro.registry import METHODS

    known = [m for m in METHODS if m in methods]
    other = sorted(m for m in methods if m not in METHODS and m not in UNTRAINED)
    return known + other + [m for m in UNTRAINED if m in methods]


def _ordered(items: set[str], order: list[str]) -> list[str]:
    return [x for x in order if x in items] + sorted(items - set(order))


def eval_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(eval, metric) pairs of the non-pretraining records, in table order."""
    res = df[df["eval"] != "pretrain"]
    out = []
    for e in _ordered(set(res["eval"]), EVAL_ORDER):
        out += [(e, m) for m in _ordered(set(res[res["eval"] == e]["metric"]), METRIC_ORDER)]
    return out


BUDGET_TOLERANCE = 0.05
"""A wall-clock run whose pre-training time is further than this from its budget is flagged in the tables."""


def budget_misses(pre: pd.DataFrame) -> list[str]:
    """One line per seed whose wall-clock pre-training missed its budget by more than :data:`BUDGET_TOLERANCE`."""
    out = []
    for _, r in pre.sort_values("seed").iterrows():
        b, t = r.get("budget_seconds"), r.get("pretrain_seconds")
        if b is None or t is None or pd.isna(b) or pd.isna(t) or not b:
            continue
        miss = t / b - 1.0
        if abs(miss) > BUDGET_TOLERANCE:
            out.append(f"seed {r['seed']} pre-trained {t:.1f}s of a {b:.0f}s budget ({miss:+.0%})")
    return out


def data_bound(pre: pd.DataFrame) -> list[str]:
    """One line per seed whose pre-training waited for batches more than :data:`DATA_BOUND_SHARE` of its time."""
    if "data_wait_share" not in pre:
        return []
    out = []
    for _, r in pre.sort_values("seed").iterrows():
        w = r.get("data_wait_share")
        if w is not None and not pd.isna(w) and w > DATA_BOUND_SHARE:
            out.append(f"seed {r['seed']} data-bound: waited for batches {w:.0%} of pre-training")
    return out


def dataset_table(df: pd.DataFrame) -> pd.DataFrame:
    """One dataset's rows -> the comparison table (strings, ready to print); ``note`` holds pre-training notes."""
    rows = []
    groups = df.groupby(["method", "model", "budget"], sort=False)
    cols = eval_columns(df)
    for (method, model, budget), g in groups:
        pre = g[g["eval"] == "pretrain"]
        row = {"method": method, "model": model, "budget": budget}
        seeds = len(set(g["seed"]))
        row["seeds"] = seeds
        if not pre.empty:
            row["steps"] = f"{pre['steps'].mean():.0f}"
            row["epochs"] = f"{pre['epochs'].mean():.1f}"
            row["pretrain time"] = f"{pre['pretrain_seconds'].mean():.0f}s"
            row["img/s"] = f"{pre['images_per_second'].mean():.0f}"
            row["device-hours"] = f"{pre['device_hours'].mean():.3f}"
            row["final loss"] = _fmt(pre["value"], seeds)
        else:
            for k in ("steps", "epochs", "pretrain time", "img/s", "device-hours", "final loss"):
                row[k] = "0" if method in UNTRAINED and k in ("steps", "epochs") else ""
        mixed = []
        for e, m in cols:
            cell = g[(g["eval"] == e) & (g["metric"] == m)]
            row[f"{e} {m}"] = _fmt(cell["value"], seeds)
            keys = set(cell["eval_key"].fillna("")) - {""} if "eval_key" in cell else set()
            if len(keys) > 1 and e not in mixed:
                mixed.append(e)
        notes = pre.sort_values("seed")["note"].fillna("") if "note" in pre else pd.Series([], dtype=str)
        row["note"] = "; ".join(dict.fromkeys([*(n for n in notes if n), *budget_misses(pre), *data_bound(pre),
                                               *(f"{e}: seeds evaluated with different settings" for e in mixed)]))
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


def table_markdown(table: pd.DataFrame) -> tuple[str, list[str]]:
    """The table without its ``note`` column, a ``[n]`` marker on each noted row, and the numbered notes."""
    if "note" not in table:
        return to_markdown(table), []
    shown = table.drop(columns="note")
    notes: list[str] = []
    for i, note in enumerate(table["note"]):
        if note:
            notes.append(f"{len(notes) + 1}. {table.at[i, 'method']} {table.at[i, 'model']} {table.at[i, 'budget']}: "
                         f"{note}")
            shown.at[i, "method"] = f"{table.at[i, 'method']} [{len(notes)}]"
    return to_markdown(shown), notes


# --- the papers' numbers ------------------------------------------------------------------------------------


def load_reference(path: Path) -> pd.DataFrame:
    """``reference.csv`` as strings (values kept as the source wrote them); empty when the file is absent."""
    if not Path(path).exists():
        return pd.DataFrame(columns=REFERENCE_FACTS + REFERENCE_KEYS)
    ref = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REFERENCE_FACTS + REFERENCE_KEYS if c not in ref.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return ref


def is_imagenet_1k(dataset: str) -> bool:
    return re.sub(r"[^a-z0-9]", "", dataset.lower()) in IMAGENET_1K


def canonical_model(label: str) -> str:
    """A model label without the tokens that restate the timm name's defaults.

    ``vit_base_patch16_224 p16 @224 d12`` -> ``vit_base_patch16_224``; ``vit_tiny_patch16_224 p4 @32 d6`` keeps
    its overrides, so it never equals a paper's ``vit_tiny_patch16_224``.
    """
    name, *tokens = label.split()
    m = re.fullmatch(r"vit_([a-z]+)_patch(\d+)_(\d+)", name)
    if m is None:
        return label
    defaults = {f"p{m.group(2)}", f"@{m.group(3)}"}
    if m.group(1) in TIMM_DEPTH:
        defaults.add(f"d{TIMM_DEPTH[m.group(1)]}")
    return " ".join([name, *(t for t in tokens if t not in defaults)])


def _paper_value(r: pd.Series) -> str:
    return r["value"] + ("" if r["verification"] in VERIFIED else f" {UNVERIFIED_MARK}")


def paper_comparisons(df: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """Our mean beside every paper number of the same setting (see ``MATCH_RULE``), and the difference."""
    cols = ["method", "model", "budget", "epochs", "eval", "metric", "ours", "paper", "difference", "paper metric",
            "source", "verification"]
    rows = []
    ref = ref[(ref["epochs_key"] != "") & (ref["method_key"] != "")]
    for (dataset, method, model, budget), g in df.groupby(["dataset", "method", "model", "budget"], sort=True):
        pre = g[g["eval"] == "pretrain"]
        if not is_imagenet_1k(dataset) or pre.empty or pre["epochs"].isna().all():
            continue
        epochs = round(float(pre["epochs"].mean()))
        same = ref[(ref["method_key"] == method) & (ref["model_key"] == canonical_model(model))
                   & (ref["epochs_key"] == str(epochs))]
        for e, m in eval_columns(g):
            ours = g[(g["eval"] == e) & (g["metric"] == m)]["value"].dropna()
            if ours.empty:
                continue
            for _, r in same[(same["eval_key"] == e) & (same["metric_key"] == m)].iterrows():
                rows.append({"method": method, "model": model, "budget": budget, "epochs": str(epochs), "eval": e,
                             "metric": m, "ours": _fmt(ours), "paper": _paper_value(r),
                             "difference": f"{ours.mean() - float(r['value']):+.2f}", "paper metric": r["metric"],
                             "source": r["source"], "verification": r["verification"]})
    return pd.DataFrame(rows, columns=cols)


def paper_context(df: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """The papers' numbers for the methods and evaluations in this dataset's records, as the papers state them."""
    methods = _method_order(sorted(set(df["method"]) - set(UNTRAINED)))
    evals = {e for e, _ in eval_columns(df)}
    sub = ref[ref["method_key"].isin(methods) & (ref["model_key"] != "")
              & ref["eval_key"].str.split("@").str[0].isin(evals)]
    rows = []
    for method in methods:
        for _, r in sub[sub["method_key"] == method].iterrows():
            rows.append({"method": method, "arch": r["arch"],
                         "epochs": r["pretrain_epochs"], "eval": r["eval_key"], "metric": r["metric"],
                         "value": _paper_value(r), "source": r["source"]})
    return pd.DataFrame(rows, columns=["method", "arch", "epochs", "eval", "metric", "value", "source"])


def reference_markdown(dataset: str, df: pd.DataFrame, ref: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """The 'against the papers' section of one dataset's page, and the comparisons table."""
    if ref.empty:
        return [], paper_comparisons(df, ref)
    comp = paper_comparisons(df, ref)
    ctx = paper_context(df, ref)
    md = ["## Against the papers", "", MATCH_RULE, ""]
    if comp.empty:
        why = ("this is not ImageNet-1k pre-training" if not is_imagenet_1k(dataset)
               else "no row has a paper number for the same method, architecture and epochs")
        md += [f"No difference is shown: {why}. The papers' numbers below are context, not targets.", ""]
    else:
        md += ["difference = ours − paper (ours: mean over seeds).", "", to_markdown(comp)]
    if not ctx.empty:
        md += ["### The papers' numbers for these methods and evaluations", "", to_markdown(ctx)]
    md += [VERIFICATION_RULE + " Rows whose source cites another paper were measured by that paper's authors.", ""]
    return md, comp


# --- loss curves --------------------------------------------------------------------------------------------


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
        d = run_dir_path(runs_dir, r["dataset"], r["method"], str(r["model"]).split()[0], r["budget"], r["seed"],
                         r["config_hash"])
        if not (d / "metrics.jsonl").exists():
            continue
        curve, probs = read_metrics(d / "metrics.jsonl")
        problems += probs
        if curve.empty:
            continue
        path = curve_path(results_dir, r["dataset"], r["method"], r["budget"], r["seed"], r["config_hash"])
        atomic_write_text(path, curve.to_csv(index=False))
        written.append(path)
    return written, problems



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
        p = curve_path(results_dir, r["dataset"], r["method"], r["budget"], r["seed"], r["config_hash"])
        if r["config_hash"] and p.exists():
            curves.append((r, pd.read_csv(p)))
    if not curves:
        return False
    plt = _pyplot()

    methods = _method_order(sorted({r["method"] for r, _ in curves}))
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
    """Accuracy of every eval against pre-training compute, one line per method: device-hours, and when every
    trained run had a FLOP budget also training FLOPs (a second row; log scale)."""
    plt = _pyplot()

    pre = df[df["eval"] == "pretrain"][["method", "model", "budget", "seed", "device_hours"]]
    acc = df[(df["eval"] != "pretrain") & (df["metric"] == "top1")]
    evals = _ordered(set(acc["eval"]), EVAL_ORDER)
    if acc.empty or not evals:
        return False
    merged = acc.drop(columns=["device_hours"]).merge(pre, on=["method", "model", "budget", "seed"], how="left")
    merged["device_hours"] = merged["device_hours"].fillna(0.0)
    merged["flops"] = merged["budget"].map(_budget_flops)
    trained = merged[~merged["method"].isin(UNTRAINED)]
    axes_x = [("device_hours", "pre-training device-hours")]
    if not trained.empty and trained["flops"].notna().all():
        axes_x.insert(0, ("flops", "pre-training FLOPs (analytic)"))
    fig, axes = plt.subplots(len(axes_x), len(evals), figsize=(5 * len(evals), 3.8 * len(axes_x)), squeeze=False)
    for row, (xcol, xlabel) in enumerate(axes_x):
        for ax, e in zip(axes[row], evals, strict=True):
            sub = merged[merged["eval"] == e]
            for method in _method_order(list(sub["method"].unique())):
                msub = sub[sub["method"] == method]
                if method in UNTRAINED:
                    ax.axhline(msub["value"].mean(), color="gray",
                               linestyle="--" if method == "random-init" else ":", label=method)
                    continue
                m = msub.groupby("budget").agg(x=(xcol, "mean"), mean=("value", "mean"),
                                               std=("value", "std")).sort_values("x")
                ax.errorbar(m["x"], m["mean"], yerr=m["std"].fillna(0), marker="o", capsize=3, label=method)
            if xcol == "flops":
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{e} top-1 (%)")
            ax.set_title(e)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


# --- the index: how each number was produced -----------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None or pd.isna(seconds):
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _command(dataset: str, methods: list[str], budget: str, recipe: str, model: str, seeds: list[int]) -> str:
    from repro.recipes import RECIPES

    args = ["python -m repro.run", *methods, "--budget", budget]
    if dataset != BUILTIN_DATASET:
        args += ["--data", f"<path to {dataset}>"]
    if recipe:
        args += ["--recipe", recipe]
    overrides = RECIPES[recipe](methods[0]) if recipe in RECIPES else []
    recipe_model = next((o.value for o in overrides if o.key == "model.name"), "vit_base_patch16_224")
    if model.split()[0] != recipe_model:
        args += ["--model", model.split()[0]]
    if seeds != [0]:
        args += ["--seeds", *map(str, seeds)]
    return " ".join(args)


def record_commands(sub: pd.DataFrame) -> pd.Series:
    """Each record's command line in time order ('' for records written before commands were recorded)."""
    return sub.sort_values("time", kind="stable").get("command", pd.Series([""] * len(sub))).fillna("")


def provenance(sub: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """One dataset's commands (rebuilt from the records) and one row per run: hardware and wall-clock."""
    runs = []
    commands: dict[tuple, list[str]] = {}  # one command for the methods run alike
    for (method, model, budget), g in sub.groupby(["method", "model", "budget"], sort=False):
        if method not in UNTRAINED:
            recipe = next((x for x in g["recipe"] if x), "")
            seeds = tuple(sorted(int(s) for s in set(g["seed"])))
            commands.setdefault((budget, recipe, model, seeds), []).append(method)
        for seed, s in g.groupby("seed", sort=True):
            pre = s[s["eval"] == "pretrain"]
            ev = s[s["eval"] != "pretrain"]
            first = pre.iloc[0] if not pre.empty else s.iloc[0]
            device = first["device"] or "n/a"
            if device != "n/a" and int(first["world_size"] or 1) > 1:
                device = f"{device} × {int(first['world_size'])}"
            seconds = ev.groupby("eval")["eval_seconds"].max()
            evals = ", ".join(f"{e} {_duration(seconds[e])}".strip() for e in _ordered(set(ev["eval"]), EVAL_ORDER))
            runs.append({"method": method, "model": model, "budget": budget, "seed": seed, "device": device,
                         "pre-training": _duration(first["pretrain_seconds"]) if not pre.empty else "",
                         "evaluations": evals, "config": first["config_hash"], "git revision": first["git_revision"],
                         "recorded": max(s["time"])})
    table = pd.DataFrame(runs)
    if not table.empty:
        order = {m: i for i, m in enumerate(_method_order(list(table["method"].unique())))}
        table["_o"] = table["method"].map(order)
        table = table.sort_values(["_o", "model", "budget", "seed"], kind="stable").drop(columns="_o")
    dataset = str(sub["dataset"].iloc[0])
    lines = [_command(dataset, _method_order(methods), budget, recipe, model, list(seeds))
             for (budget, recipe, model, seeds), methods in commands.items()]
    return lines, table.reset_index(drop=True)


# --- generate ------------------------------------------------------------------------------------------------


def generate(results_dir: Path, runs_dir: Path | None = None) -> list[Path]:
    """Regenerate every table and plot from ``results_dir``; returns the files written.

    With ``runs_dir``, first copy the loss curves of the recorded runs found there into ``results_dir/curves``.
    """
    results_dir = Path(results_dir)
    records, problems = read_all(results_dir / "records")
    df = records_frame(records)
    ref = load_reference(results_dir / "reference.csv")
    written: list[Path] = []
    if runs_dir is not None and Path(runs_dir).is_dir():
        curves, curve_problems = import_curves(Path(runs_dir), results_dir, df)
        written += curves
        report_problems(curve_problems)
    index = ["# Results", "", "Generated by `python -m repro.report` from `records/*.jsonl` (append-only; one JSON "
             "line per number with its context: device, seed, budget, selection rule, config hash, git revision), "
             "`reference.csv` (the papers' numbers) and `curves/` (pre-training losses copied from the run "
             "directories). Do not edit the generated files; rerun the report.", ""]
    how: list[str] = []
    for dataset in sorted(df["dataset"].unique()) if not df.empty else []:
        sub = df[df["dataset"] == dataset]
        table = dataset_table(sub)
        md_path, csv_path = results_dir / f"{dataset}.md", results_dir / f"{dataset}.csv"
        acc_png = results_dir / f"{dataset}_accuracy_vs_budget.png"
        loss_png = results_dir / f"{dataset}_loss_curves.png"
        papers_csv = results_dir / f"{dataset}_vs_papers.csv"
        devices = sorted({d for d in sub["device"].dropna() if d})
        table_md, notes = table_markdown(table)
        md = [f"# {dataset}", "", table_md]
        if notes:
            md += ["Notes:", "", *notes, ""]
        md += ["Budgets are per method (pre-training wall-clock on the device below, or epochs/steps/FLOPs). "
               "Accuracies (%) are on the test split (top1/top5; mIoU and AP for dense tasks); mean ± std over seeds "
               "when there are several, (n=k) when only k of the seeds have that number. random-init: the same "
               "evaluations on an untrained backbone (the floor); supervised-scratch: that backbone fine-tuned with "
               "the same recipe and budget as every export (supervised training from scratch).", "",
               f"Devices: {', '.join(devices) or 'n/a'}", ""]
        links = [f"[table]({md_path.name})", f"[csv]({csv_path.name})"]
        if plot_accuracy_vs_budget(sub, acc_png):
            md.append(f"![accuracy vs budget]({acc_png.name})\n")
            written.append(acc_png)
            links.append(f"[accuracy vs budget]({acc_png.name})")
        if plot_loss_curves(sub, results_dir, loss_png):
            md.append(f"![pre-training loss]({loss_png.name})\n")
            md.append(f"Pre-training loss per logged step (data: `curves/{dataset}/`). Each method has its own "
                      "loss, so compare the shapes, not the levels across panels.\n")
            written.append(loss_png)
            links.append(f"[loss curves]({loss_png.name}) ([data](curves/{dataset}/))")
        ref_md, comp = reference_markdown(dataset, sub, ref)
        md += ref_md
        atomic_write_text(md_path, "\n".join(md))
        csv_table = table if table.get("note", pd.Series(dtype=str)).astype(bool).any() else table.drop(
            columns="note", errors="ignore")
        atomic_write_text(csv_path, csv_table.to_csv(index=False))
        written += [md_path, csv_path]
        if not comp.empty:
            atomic_write_text(papers_csv, comp.to_csv(index=False))
            written.append(papers_csv)
            links.append(f"[vs papers csv]({papers_csv.name})")
        index.append(f"- **{dataset}** — {' · '.join(links)} — {len(sub)} records")
        commands, runs = provenance(sub)
        cmds = record_commands(sub)
        recorded = list(dict.fromkeys(c for c in cmds if c))
        if recorded:
            how += [f"### {dataset}", "", "Commands (as recorded, in the order they ran):", "", "```", *recorded,
                    "```", ""]
            versions = sorted({v for v in sub.get("versions", pd.Series(dtype=str)).fillna("") if v})
            if versions:
                how += ["Package versions: " + "; ".join(f"`{v}`" for v in versions), ""]
            if (cmds == "").any():  # older records without a command line
                how += ["Rebuilt from records that predate recorded commands:", "", "```", *commands, "```", ""]
            how.append(to_markdown(runs))
        else:
            how += [f"### {dataset}", "", "Commands (rebuilt from the records):", "", "```",
                    *commands, "```", "", to_markdown(runs)]
    if not ref.empty:
        index.append(f"- [reference.csv](reference.csv) — the papers' numbers ({len(ref)} rows) with the keys that "
                     "match them to our records")
    if how:
        index += ["", "## How each number was produced", "",
                  "Records carry the command line that produced them and the package versions; records "
                  "written before that are shown with commands rebuilt from them (method, budget, recipe, "
                  "seeds), whose `--set` overrides and data path are not in the records, but the config hash names "
                  "the run directory `runs/<dataset>/<method>/<model>-<budget>-s<seed>-<config>/`, whose "
                  "`config.json` holds every setting. random-init and supervised-scratch rows come from the same "
                  "commands (evaluated once per model and seed). Device is the pre-training hardware (× processes); "
                  "times are wall-clock; an evaluation's selection rule is in its record.", "", *how]
    if problems:
        index += ["", "## Unreadable record lines", ""]
        index += [f"- {Path(p.path).name}:{p.line}: {p.reason}" for p in problems]
    index_path = results_dir / "README.md"
    about = [results_dir / n for n in ABOUT_FILES if (results_dir / n).is_file()]
    head = [p.read_text().rstrip("\n") + "\n" for p in about]
    if head:
        index = [*head, f"*The sections above are {', '.join(p.name for p in about)}; what follows is generated.*",
                 "", *index]
    atomic_write_text(index_path, "\n".join(index).rstrip("\n") + "\n")
    written.append(index_path)
    return written


ABOUT_FILES = ("NOTES.md", "claims.md")
"""Hand-written notes and generated claims placed, in this order, at the top of a results directory's README."""


def report_problems(problems: list[ReadProblem]) -> None:
    for p in problems:
        print(f"repro.report: warning: {p.path}:{p.line}: {p.reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repro.report", description="Regenerate results/ tables and "
                                 "plots from results/records/*.jsonl.")
    ap.add_argument("--results", default="results", help="results directory (default: ./results)")
    ap.add_argument("--runs", default="runs", help="run directories to copy loss curves from into "
                    "<results>/curves (default: ./runs; skipped when absent)")
    args = ap.parse_args(argv)
    results_dir = Path(args.results)
    if not results_dir.exists():
        print(f"repro.report: error: {results_dir}: no such results directory", file=sys.stderr)
        return 2
    _, problems = read_all(results_dir / "records")
    report_problems(problems)
    for p in generate(results_dir, Path(args.runs)):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
