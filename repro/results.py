"""A results directory as a pandas DataFrame, for notebooks: ``repro.results.load("results")``.

The records (``results/records/<dataset>.jsonl``) are the source of truth and :mod:`repro.report` turns them into
fixed tables; a question the tables do not answer (accuracy per FLOP, seed spread, what changed between two
revisions) is a few lines of pandas over this frame instead of a parser of its own. One row per record, every field
of :class:`repro.records.ResultRecord` a column with a dtype (numbers are numbers, a missing one is NaN / <NA>,
``time`` a UTC timestamp), plus derived columns:

- ``budget_kind`` / ``budget_amount``: the parsed budget ('time' seconds, 'epochs', 'steps', 'flop'); <NA> for rows
  without one (``-`` of the random-init floors, ``official`` of converted checkpoints).
- ``flops``: the FLOP budget of ``...flop`` runs (NaN otherwise), the x axis of compute-matched comparisons.
- ``eval_metric``: ``"<eval>/<metric>"``, one name per measured quantity, for ``pivot_table(columns=...)``.
- ``pretrained``: False for the floors (random-init, supervised-scratch), which had no pre-training.

``latest=True`` keeps what the tables show instead: records with status 'ok', the latest of each (dataset, method,
model, budget, eval, metric, seed), random-init fine-tuning named supervised-scratch
(:func:`repro.report.tables.records_frame`). Lines that are not records (a torn last line after a power cut) do not
stop the load: they are logged and listed in ``df.attrs["problems"]``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd

from repro.budget import BudgetError, parse_budget
from repro.records import ResultRecord, read_all
from repro.report.tables import UNTRAINED, records_frame

log = logging.getLogger("repro")

COLUMNS = [f.name for f in fields(ResultRecord)]
DERIVED = ["budget_kind", "budget_amount", "flops", "eval_metric", "pretrained"]
INTS = {"seed": "int64", "world_size": "int64", "steps": "Int64"}
"""Integer fields; ``steps`` is nullable (evaluation records of converted checkpoints have none)."""
FLOATS = ["value", "budget_seconds", "pretrain_seconds", "epochs", "images_per_second", "device_hours",
          "data_wait_share", "eval_seconds"]


def records_dir(path: Path) -> Path:
    """``DIR/records`` for a results directory; ``DIR`` itself when it holds the ``*.jsonl`` files."""
    path = Path(path)
    if (path / "records").is_dir():
        return path / "records"
    if path.is_dir() and any(path.glob("*.jsonl")):
        return path
    raise FileNotFoundError(f"{path}: no results here (expected {path / 'records'}/<dataset>.jsonl)")


def load(path: str | Path, *, latest: bool = False) -> pd.DataFrame:
    """The records under results directory ``path`` as a typed DataFrame (see the module docstring)."""
    recs, problems = read_all(records_dir(Path(path)))
    for p in problems:
        log.warning("%s:%d: skipped (%s)", p.path, p.line, p.reason)
    if latest:
        df = records_frame(recs).reindex(columns=COLUMNS)
    else:
        df = pd.DataFrame([asdict(r) for r in recs], columns=COLUMNS)
    df = typed(df)
    df.attrs["problems"] = [f"{p.path}:{p.line}: {p.reason}" for p in problems]
    return df


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Dtypes per field, and the derived columns."""
    df = df.copy()
    for c in COLUMNS:
        if c in INTS:
            df[c] = pd.to_numeric(df[c]).astype(INTS[c])
        elif c in FLOATS:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        elif c == "time":
            df[c] = pd.to_datetime(df[c].replace("", None), format="%Y-%m-%dT%H:%M:%S%z", utc=True, errors="coerce")
        else:
            df[c] = df[c].astype("string")
    budgets = {spec: _budget(spec) for spec in df["budget"].dropna().unique()}
    df["budget_kind"] = df["budget"].map(lambda s: budgets.get(s, (None, None))[0]).astype("string")
    df["budget_amount"] = df["budget"].map(lambda s: budgets.get(s, (None, None))[1]).astype("float64")
    df["flops"] = df["budget_amount"].where(df["budget_kind"] == "flop").astype("float64")
    df["eval_metric"] = (df["eval"] + "/" + df["metric"]).astype("string")
    df["pretrained"] = ~df["method"].isin(UNTRAINED).astype(bool)
    return df.reset_index(drop=True)


def _budget(spec: str) -> tuple[str | None, float | None]:
    try:
        b = parse_budget(spec)
    except BudgetError:
        return None, None  # '-' (no pre-training), 'official' (a released checkpoint)
    return b.kind, b.amount
