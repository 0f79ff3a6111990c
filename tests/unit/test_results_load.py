"""``repro.results.load``: a results directory's records as a typed DataFrame, one row per record, with the derived
budget columns; ``latest=True`` is the tables' view; a torn line is reported, not fatal."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from repro import results
from repro.records import ResultRecord, append_records


def rec(**kw) -> ResultRecord:
    base = dict(method="mae", model="vit_tiny p4 @32 d6", dataset="cifar10", budget="1.5e+13flop", eval="knn",
                metric="top1", value=40.0, seed=0, time="2026-11-30T23:17:23+0000", steps=261)
    return ResultRecord(**{**base, **kw})


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    append_records(root / "records" / "cifar10.jsonl", [
        rec(),
        rec(eval="pretrain", metric="final_loss", value=0.72, pretrain_seconds=138.0, device_hours=0.038),
        rec(method="micl", value=45.5, seed=1),
        rec(value=41.0, time="2026-12-01T10:00:00+0000"),  # a re-run of the first: the tables keep this one
        rec(method="mocov3", value=float("nan"), status="failed"),
        rec(method="random-init", budget="-", eval="finetune", value=31.0, steps=None),
    ])
    append_records(root / "records" / "builtin-shapes.jsonl", [
        rec(dataset="builtin-shapes", budget="2h", budget_seconds=7200.0, value=90.0),
    ])
    with open(root / "records" / "builtin-shapes.jsonl", "a") as f:
        f.write('{"method": "mae", "val')  # a power cut mid-append
    return root


def test_one_typed_row_per_record_with_derived_columns(results_dir):
    df = results.load(results_dir)
    assert len(df) == 7  # every record, re-runs and failures included
    assert df["value"].dtype == "float64" and df["seed"].dtype == "int64" and df["steps"].dtype == "Int64"
    assert df["method"].dtype == "string" and isinstance(df["time"].dtype, pd.DatetimeTZDtype)
    assert df["time"].min() == pd.Timestamp("2026-11-30T23:17:23", tz="UTC")
    assert set(df.columns) >= set(results.COLUMNS) | set(results.DERIVED)

    flop = df[df["budget"] == "1.5e+13flop"]
    assert (flop["budget_kind"] == "flop").all() and (flop["flops"] == 1.5e13).all()
    timed = df[df["budget"] == "2h"].iloc[0]
    assert (timed["budget_kind"], timed["budget_amount"], timed["dataset"]) == ("time", 7200.0, "builtin-shapes")
    assert math.isnan(timed["flops"])
    floor = df[df["method"] == "random-init"].iloc[0]
    assert pd.isna(floor["budget_kind"]) and math.isnan(floor["flops"]) and pd.isna(floor["steps"])
    assert not floor["pretrained"] and df[df["method"] != "random-init"]["pretrained"].all()
    assert sorted(df["eval_metric"].unique()) == ["finetune/top1", "knn/top1", "pretrain/final_loss"]
    pre = df[df["eval"] == "pretrain"].iloc[0]
    assert (pre["pretrain_seconds"], pre["device_hours"]) == (138.0, 0.038)
    assert df["command"].str.len().gt(0).all()  # filled by append_records: who produced each number

    assert df.attrs["problems"] == [f"{results_dir / 'records' / 'builtin-shapes.jsonl'}:2: truncated trailing line "
                                    "(interrupted write?)"]


def test_latest_is_the_tables_view(results_dir):
    df = results.load(results_dir, latest=True)
    knn = df[(df["method"] == "mae") & (df["eval"] == "knn") & (df["dataset"] == "cifar10")]
    assert knn["value"].tolist() == [41.0]  # the re-run, not the first measurement
    assert "failed" not in set(df["status"])
    assert "supervised-scratch" in set(df["method"]) and "random-init" not in set(df["method"])
    assert df["seed"].dtype == "int64" and df["flops"].dtype == "float64"
    # a notebook's one-liner: accuracy per method and FLOP budget
    table = df[df["eval_metric"] == "knn/top1"].pivot_table(index="method", columns="flops", values="value")
    assert table.loc["micl", 1.5e13] == 45.5


def test_a_records_folder_or_an_empty_one_loads_and_a_wrong_path_is_an_error(results_dir, tmp_path):
    assert len(results.load(results_dir / "records")) == 7
    (tmp_path / "empty" / "records").mkdir(parents=True)
    empty = results.load(tmp_path / "empty")
    assert empty.empty and set(empty.columns) >= set(results.DERIVED) and empty["seed"].dtype == "int64"
    with pytest.raises(FileNotFoundError, match="no results here"):
        results.load(tmp_path / "nowhere")
