"""``repro.run --log tensorboard``: every metrics.jsonl value and every evaluation reach RUN_DIR/tensorboard; off,
nothing is created."""

from __future__ import annotations

import json

import pytest

from repro.run import main
from tests.reliability.conftest import call_main, read_metrics, run_dir, sets

tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                         reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')")


def test_tensorboard_holds_what_metrics_jsonl_holds_and_the_evals(tmp_path, capsys):
    args = ["micl", "--budget", "6steps", "--evals", "knn", "--no-progress", "--no-report", "--log", "tensorboard",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), *sets(train__log_every=2)]
    rc, err = call_main(main, args, capsys)
    assert rc == 0, err
    d = run_dir(tmp_path / "runs")
    acc = tb.EventAccumulator(str(d / "tensorboard"))
    acc.Reload()
    rows = read_metrics(d / "metrics.jsonl")
    keys = {k for r in rows for k in r if k != "step"}
    assert {f"train/{k}" for k in keys} <= set(acc.Tags()["scalars"])
    for k in keys:
        got = {e.step: e.value for e in acc.Scalars(f"train/{k}")}
        assert got == pytest.approx({r["step"]: r[k] for r in rows}, rel=1e-6)  # float32 in the event file
    knn = json.loads(next((d / "evals").glob("knn-*.json")).read_text())["records"][0]["value"]
    assert [e.value for e in acc.Scalars("eval/knn_top1")] == pytest.approx([knn], rel=1e-6)


def test_off_by_default_creates_nothing(tmp_path, capsys):
    args = ["micl", "--budget", "2steps", "--evals", "none", "--no-progress", "--no-report",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), *sets()]
    rc, err = call_main(main, args, capsys)
    assert rc == 0, err
    assert not (run_dir(tmp_path / "runs") / "tensorboard").exists()
