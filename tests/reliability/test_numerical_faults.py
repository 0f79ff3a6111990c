"""A loss that becomes NaN/inf, through the CLI: a real divergence (a learning rate of 1e9), not an injected NaN.

The run stops with one error line naming the step, exits non-zero, keeps its last good checkpoint (which loads,
holds only steps before the bad one and finite weights), exports nothing, and records a 'failed' pretrain row
(never an 'ok' one). tests/unit/test_trainer.py covers the trainer's guard with an injected NaN.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from repro.checkpoint import CHECKPOINT, load_checkpoint
from repro.export import EXPORT_META, EXPORT_WEIGHTS
from repro.records import read_records
from tests.reliability.conftest import call_main, error_line, read_metrics, sets

STEPS = 8


def argv(tmp_path, method: str) -> list[str]:
    return [method, "--budget", f"{STEPS}steps", "--evals", "none", "--no-progress", "--no-report",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
            *sets(train__base_lr="1e9", train__log_every=1, train__ckpt_every_s=0)]


@pytest.mark.parametrize("method", ["micl", "mae"])
def test_diverging_run_stops_keeps_last_good_checkpoint_and_records_failure(tmp_path, capsys, method):
    from pathlib import Path

    from repro.run import main

    rc, err = call_main(main, argv(tmp_path, method), capsys)
    assert rc == 2
    line = error_line(err)
    m = re.fullmatch(r"repro: error: non-finite loss at step (\d+); stopped, last good checkpoint kept in (\S+)", line)
    assert m, line
    bad, run = int(m[1]), Path(m[2])
    assert 0 < bad < STEPS

    state = load_checkpoint(run / CHECKPOINT)
    assert not state["complete"] and 0 < state["step"] <= bad  # holds steps 0 .. step-1, all before the bad one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    logged = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, bad + 1))  # every step before the bad one, none after
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert not (run / EXPORT_WEIGHTS).exists() and not (run / EXPORT_META).exists()
    assert not (run / "train_summary.json").exists()

    recs, problems = read_records(tmp_path / "results" / "records" / "builtin-shapes.jsonl")
    assert not problems
    assert [(r.method, r.eval, r.status) for r in recs] == [(method, "pretrain", "failed")]
    assert f"non-finite loss at step {bad}" in recs[0].note and math.isnan(recs[0].value)

    # the same command again resumes from the kept checkpoint and diverges at the same step: deterministic
    rc, err = call_main(main, argv(tmp_path, method), capsys)
    assert rc == 2 and f"non-finite loss at step {bad};" in error_line(err)
    recs, _ = read_records(tmp_path / "results" / "records" / "builtin-shapes.jsonl")
    assert [r.status for r in recs] == ["failed", "failed"]
