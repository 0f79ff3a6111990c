"""Integrity checks of the records: numbers of one run that were measured on different weights.

Every evaluation record names the SHA-256 of the ``backbone.safetensors`` it measured (``export_sha256``, verified as
the export was loaded). One run (same method, model, dataset, budget, seed and config hash) has one export; when its
records name two, the export was replaced between evaluations (the run re-trained into a fresh directory, a copy
restored from elsewhere, a different machine's run merged in) and the table would silently average numbers of
different weights. The report prints these warnings; it does not pick a side.

Only the measurements the tables use count: the latest record of each evaluation and metric. A run re-trained and
re-evaluated in full (the demo's wall-clock budget run again over the committed records) supersedes every record of
the old export, so the table holds one export's numbers and nothing is flagged; a re-run that re-measured only some
evaluations leaves the others on the old export, and is.
"""

from __future__ import annotations

import pandas as pd

RUN_KEY = ["method", "model", "dataset", "budget", "seed", "config_hash"]
"""What identifies one pre-training run in the records (and so one export)."""


def export_checksum_conflicts(df: pd.DataFrame) -> list[str]:
    """One human-readable line per run whose records name more than one export checksum.

    ``df`` is a frame of result records (``ResultRecord`` fields as columns), all of them: the latest record of each
    (run, evaluation, metric) is chosen here, by ``time``, as the tables choose it. Records without a checksum (older
    than the field, or pre-training rows) and without a config hash (random-init floors and converted official
    checkpoints: no run identity, so two different releases of one method and model are not a conflict) are left
    out.
    """
    if df.empty or "export_sha256" not in df.columns or any(c not in df.columns for c in RUN_KEY):
        return []
    sha = df["export_sha256"].fillna("").astype(str)
    cfg = df["config_hash"].fillna("").astype(str)
    sub = df[(sha != "") & (cfg != "")]
    if "status" in sub.columns:
        sub = sub[sub["status"].fillna("ok") == "ok"]
    if "time" in sub.columns:  # the measurement each table cell uses; older ones of the same evaluation are superseded
        sub = sub.sort_values("time", kind="stable").drop_duplicates([*RUN_KEY, "eval", "metric"], keep="last")
    out: list[str] = []
    for key, g in sub.groupby(RUN_KEY, sort=True, dropna=False):
        digests = g["export_sha256"].astype(str)
        if digests.nunique() < 2:
            continue
        method, model, dataset, budget, seed, config_hash = key
        parts = []
        for digest in sorted(digests.unique(), key=lambda d: (-int((digests == d).sum()), d)):
            rows = g[digests == digest]
            evals = ", ".join(sorted({f"{e}/{m}" for e, m in zip(rows["eval"], rows["metric"], strict=True)}))
            parts.append(f"{digest[:12]} in {len(rows)} record{'s' if len(rows) != 1 else ''} ({evals})")
        out.append(f"{dataset}: {method} {model} budget {budget} seed {seed} (config {config_hash}): records name "
                   f"{digests.nunique()} different exports: {'; '.join(parts)}; the export changed between "
                   "evaluations: re-evaluate the current export or drop the stale records")
    return out
