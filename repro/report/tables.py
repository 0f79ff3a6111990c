"""The comparison table of one dataset: records -> rows per (method, model, budget), columns per (eval, metric)."""

from __future__ import annotations

import pandas as pd

from repro.budget import BudgetError, parse_budget
from repro.records import DATA_BOUND_SHARE, ResultRecord

KEY = ["dataset", "method", "model", "budget", "precision", "eval", "metric", "seed"]
"""One measured cell. ``precision`` is the training precision ('' in records older than it): a bf16 run and an fp32 run
of the same method and budget are different rows, never averaged together. ``method`` includes the run's variant of
its recipe (``micl[augment=none]``, from the record's ``variant``), so a variant never replaces the recipe's row."""
EVAL_ORDER = ["knn", "linear", "linear-mocov3", "finetune", "ade20k", "coco"]
METRIC_ORDER = ["top1", "top5", "mIoU", "mAcc", "box_AP", "mask_AP"]

SCRATCH = "supervised-scratch"
"""The row of the random-init backbone's fine-tuning: supervised training from scratch with the same recipe and
budget every export is fine-tuned with."""
UNTRAINED = ("random-init", SCRATCH)
"""Rows without pre-training (floors): drawn as horizontal lines, no pre-training command."""


def records_frame(records: list[ResultRecord]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame(columns=[*KEY, "value", "status", "time"])
    df = pd.DataFrame([r.__dict__ for r in records])
    df["precision"] = df["precision"].fillna("") if "precision" in df else ""
    # a variant of the recipe (``--set method.augment=none``) is its own row: ``micl[augment=none]``; ``run_method``
    # keeps the method that names its run directory and curve files
    df["run_method"] = df["method"]
    variant = df["variant"].fillna("") if "variant" in df else pd.Series("", index=df.index)
    df["method"] = df["method"].where(variant == "", df["method"] + "[" + variant + "]")
    df = df[df["status"] == "ok"]
    # latest measurement of each key wins (re-runs append; nothing is rewritten)
    df = df.sort_values("time", kind="stable").drop_duplicates(KEY, keep="last")
    df.loc[(df["method"] == "random-init") & (df["eval"] == "finetune"), "method"] = SCRATCH
    return df.reset_index(drop=True)


def fmt_cell(values: pd.Series, seeds: int = 1) -> str:
    v = values.dropna()
    if v.empty:
        return ""
    s = f"{v.iloc[0]:.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"
    return s + (f" (n={len(v)})" if len(v) < seeds else "")


def method_order(methods: list[str]) -> list[str]:
    from repro.registry import METHODS

    known = [v for m in METHODS for v in [m, *sorted(x for x in methods if x.startswith(m + "["))] if v in methods]
    other = sorted(m for m in methods if m not in known and m not in UNTRAINED)
    return known + other + [m for m in UNTRAINED if m in methods]


def ordered(items: set[str], order: list[str]) -> list[str]:
    return [x for x in order if x in items] + sorted(items - set(order))


def eval_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(eval, metric) pairs of the non-pretraining records, in table order."""
    res = df[df["eval"] != "pretrain"]
    out = []
    for e in ordered(set(res["eval"]), EVAL_ORDER):
        out += [(e, m) for m in ordered(set(res[res["eval"] == e]["metric"]), METRIC_ORDER)]
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


def mixed_devices(pre: pd.DataFrame) -> list[str]:
    """One line when the seeds of a wall-clock budget pre-trained on different devices (``--budget 90s`` buys another
    number of steps on each: a user's demo run beside the committed seeds of another machine); FLOP, step and epoch
    budgets train the same whatever the device, and are not flagged."""
    if pre.empty or "device" not in pre or "budget_seconds" not in pre or pre["budget_seconds"].isna().all():
        return []
    dev = pre["device"].fillna("").astype(str)
    if dev.nunique() < 2:
        return []
    parts = [f"{d or 'unknown'} for seed{'s' if (dev == d).sum() > 1 else ''} "
             f"{', '.join(str(x) for x in sorted(pre.loc[dev == d, 'seed']))}" for d in sorted(dev.unique())]
    return [f"a wall-clock budget on different devices ({'; '.join(parts)}): each device's seconds buy their own "
            "step count"]


def dataset_table(df: pd.DataFrame) -> pd.DataFrame:
    """One dataset's rows -> the comparison table (strings, ready to print); ``note`` holds pre-training notes."""
    rows = []
    precisions = "precision" in df and bool((df["precision"].fillna("") != "").any())
    groups = df.groupby(["method", "model", "budget", "precision"] if precisions else ["method", "model", "budget"],
                        sort=False)
    cols = eval_columns(df)
    for key, g in groups:
        method, model, budget = key[:3]
        pre = g[g["eval"] == "pretrain"]
        row = {"method": method, "model": model, "budget": budget}
        if precisions:  # a column only where some record names its training precision (tables stay as they were)
            row["precision"] = key[3] or "-"
        seeds = len(set(g["seed"]))
        row["seeds"] = seeds
        if not pre.empty:
            row["steps"] = f"{pre['steps'].mean():.0f}"
            row["epochs"] = f"{pre['epochs'].mean():.1f}"
            row["pretrain time"] = f"{pre['pretrain_seconds'].mean():.0f}s"
            row["img/s"] = f"{pre['images_per_second'].mean():.0f}"
            row["device-hours"] = f"{pre['device_hours'].mean():.3f}"
            row["final loss"] = fmt_cell(pre["value"], seeds)
        else:
            for k in ("steps", "epochs", "pretrain time", "img/s", "device-hours", "final loss"):
                row[k] = "0" if method in UNTRAINED and k in ("steps", "epochs") else ""
        mixed = []
        for e, m in cols:
            cell = g[(g["eval"] == e) & (g["metric"] == m)]
            row[f"{e} {m}"] = fmt_cell(cell["value"], seeds)
            keys = set(cell["eval_key"].fillna("")) - {""} if "eval_key" in cell else set()
            if len(keys) > 1 and e not in mixed:
                mixed.append(e)
        notes = pre.sort_values("seed")["note"].fillna("") if "note" in pre else pd.Series([], dtype=str)
        row["note"] = "; ".join(dict.fromkeys([*(n for n in notes if n), *budget_misses(pre), *data_bound(pre),
                                               *mixed_devices(pre),
                                               *(f"{e}: seeds evaluated with different settings" for e in mixed)]))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = {m: i for i, m in enumerate(method_order(list(table["method"].unique())))}
    table["_o"] = table["method"].map(order)
    table["_b"] = table["budget"].map(budget_order)
    return (table.sort_values(["_o", "model", "_b"], kind="stable").drop(columns=["_o", "_b"])
            .reset_index(drop=True))


def budget_order(spec: str) -> tuple[str, float, str]:
    """Sort key of a budget: by unit, then by amount (1.67e12flop before 1.5e13flop), unparseable ones last."""
    try:
        b = parse_budget(spec)
    except BudgetError:
        return ("~", 0.0, str(spec))
    return (b.kind, b.amount, str(spec))


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
