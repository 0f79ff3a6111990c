"""How each number was made: the recorded commands, the hardware and the wall-clock of every run."""

from __future__ import annotations

import pandas as pd

from repro.report.papers import BUILTIN_DATASET
from repro.report.tables import EVAL_ORDER, UNTRAINED, method_order, ordered


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
            run_method = str(g["run_method"].iloc[0]) if "run_method" in g else method  # without its [variant]
            commands.setdefault((budget, recipe, model, seeds), []).append(run_method)
        for seed, s in g.groupby("seed", sort=True):
            pre = s[s["eval"] == "pretrain"]
            ev = s[s["eval"] != "pretrain"]
            first = pre.iloc[0] if not pre.empty else s.iloc[0]
            device = first["device"] or "n/a"
            if device != "n/a" and int(first["world_size"] or 1) > 1:
                device = f"{device} × {int(first['world_size'])}"
            seconds = ev.groupby("eval")["eval_seconds"].max()
            evals = ", ".join(f"{e} {_duration(seconds[e])}".strip() for e in ordered(set(ev["eval"]), EVAL_ORDER))
            runs.append({"method": method, "model": model, "budget": budget, "seed": seed, "device": device,
                         "pre-training": _duration(first["pretrain_seconds"]) if not pre.empty else "",
                         "evaluations": evals, "config": first["config_hash"], "git revision": first["git_revision"],
                         "recorded": max(s["time"])})
    table = pd.DataFrame(runs)
    if not table.empty:
        order = {m: i for i, m in enumerate(method_order(list(table["method"].unique())))}
        table["_o"] = table["method"].map(order)
        table = table.sort_values(["_o", "model", "budget", "seed"], kind="stable").drop(columns="_o")
    dataset = str(sub["dataset"].iloc[0])
    lines = [_command(dataset, method_order(methods), budget, recipe, model, list(seeds))
             for (budget, recipe, model, seeds), methods in commands.items()]
    return lines, table.reset_index(drop=True)


# --- generate ------------------------------------------------------------------------------------------------
