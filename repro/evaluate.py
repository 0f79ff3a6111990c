"""The evaluation loop: each requested evaluation of an export once per value of its own settings, recorded
exactly once even across kills. The one ``repro`` module besides ``repro.run`` that reads ``evals.registry``."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from evals.registry import EVALS
from evals.settings import keyed
from repro.checkpoint import (
    atomic_write_text,
)
from repro.lock import run_lock
from repro.monitor import open_tensorboard
from repro.records import (
    ResultRecord,
    append_records,
    now_iso,
    read_records,
)

log = logging.getLogger("repro")


def evaluate(export_dir: Path, evals: list[str], ctx, records_path: Path, tensorboard: bool = False, *,
             wait: bool = False) -> list[ResultRecord]:
    """Run each requested eval once per export and eval settings (a marker file keyed by :func:`eval_key` makes
    re-runs skip finished evals); the export's run directory is locked meanwhile, so two commands never record the
    same evaluation twice."""
    with run_lock(export_dir, wait=wait):
        recs = _evaluate_locked(export_dir, evals, ctx, records_path)
    board = open_tensorboard(tensorboard and bool(recs), export_dir)
    if board is not None:
        board.scalars("eval", {f"{r.eval}_{r.metric}": r.value for r in recs}, int(recs[0].steps or 0))
        board.close()
    return recs


def eval_key(name: str, ctx) -> str:
    """What an evaluation's numbers depend on besides the export (whose seed it shares): its own settings
    (the keyed fields of ``ctx.settings[name]``, as they resolve on ``ctx.device``) and the data (name, test split,
    split sizes). It names the done-marker and is stored in each record, so the tables can tell when the seeds of
    one cell were evaluated differently."""
    blob = {"eval": name, "settings": keyed(ctx.settings[name], getattr(ctx, "device", None)),
            "dataset": ctx.data.name, "test_split": ctx.data.test_split_name,
            "sizes": [len(ctx.data.train), len(ctx.data.test)]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _same(a: ResultRecord, b: ResultRecord) -> bool:
    return (a.eval_key, a.time, a.eval, a.metric, a.seed, a.method) == (b.eval_key, b.time, b.eval, b.metric, b.seed,
                                                                         b.method)


def _evaluate_locked(export_dir: Path, evals: list[str], ctx, records_path: Path) -> list[ResultRecord]:
    """Per eval: run it unless its marker (keyed by :func:`eval_key`) says done; then, as one idempotent step, save
    the records in the marker, append them to the records file unless a killed earlier attempt already did, and
    mark the marker appended. A kill anywhere in between neither loses the numbers nor records them twice."""
    done_dir = export_dir / "evals"
    out: list[ResultRecord] = []
    for name in evals:
        key = eval_key(name, ctx)
        marker = done_dir / f"{name}-{key}.json"
        state = json.loads(marker.read_text()) if marker.exists() else None
        if state is not None and state.get("appended"):
            continue
        if state is None:
            recs = [replace(r, eval_key=key, time=r.time or now_iso())
                    for r in EVALS[name].run(ctx, export_dir, ctx.settings[name])]
            state = {"eval": name, "key": key, "settings": keyed(ctx.settings[name], getattr(ctx, "device", None)),
                     "records": [asdict(r) for r in recs], "appended": False}
            atomic_write_text(marker, json.dumps(state, indent=2, default=str) + "\n")
        else:  # measured, but a kill came before the marker said appended
            recs = [ResultRecord.from_dict(d) for d in state["records"]]
        present, _ = read_records(records_path)
        if not all(any(_same(r, p) for p in present) for r in recs):
            append_records(records_path, [r for r in recs if not any(_same(r, p) for p in present)])
        state["appended"] = True
        atomic_write_text(marker, json.dumps(state, indent=2, default=str) + "\n")
        for r in recs:
            log.info("%-12s %-7s %s = %.2f", r.method, r.eval, r.metric, r.value)
        out += recs
    return out
