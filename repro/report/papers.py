"""The papers' numbers (``results/reference.csv``) beside ours: a difference only for the same setting."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from repro.report.tables import UNTRAINED, eval_columns, fmt_cell, method_order, to_markdown

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
                             "metric": m, "ours": fmt_cell(ours), "paper": _paper_value(r),
                             "difference": f"{ours.mean() - float(r['value']):+.2f}", "paper metric": r["metric"],
                             "source": r["source"], "verification": r["verification"]})
    return pd.DataFrame(rows, columns=cols)


def paper_context(df: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """The papers' numbers for the methods and evaluations in this dataset's records, as the papers state them."""
    methods = method_order(sorted(set(df["method"]) - set(UNTRAINED)))
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
