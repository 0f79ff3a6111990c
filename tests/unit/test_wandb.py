"""``--log wandb``: the values TensorBoard gets reach an offline W&B run (read back from its ``.wandb`` file), one W&B
run per run directory across the processes that reopen it, offline unless the user set ``WANDB_MODE``."""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from repro import monitor

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2",
                               reason="the wandb extra is not installed (pip install -e '.[wandb]')")


def wandb_records(path: Path) -> Iterator:
    """The protobuf records of a ``run-*.wandb`` file: a ``:W&B`` header, then LevelDB-log framing (32 KiB blocks of
    [crc32 u32, length u16, type u8] chunks; type 1 = a whole record, 2/3/4 = its first/middle/last part)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B datastore"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += 7
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def history(run_dir: Path) -> list[dict]:
    """Every logged row of every offline W&B run under ``run_dir`` (oldest first), W&B's own ``_*`` keys removed.

    ``finish()`` can return before W&B's service process has written a run's last rows: stopping the service first
    (as the end of the process does) makes the files complete."""
    import wandb

    wandb.teardown()
    rows = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item
                             if not (i.key or "/".join(i.nested_key)).startswith("_")})
    return rows


@pytest.fixture
def wandb_only(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield monitor.select(["wandb"])
    monitor.select(["tensorboard"])


def test_values_and_evals_reach_one_offline_run(tmp_path, monkeypatch, wandb_only):
    run = tmp_path / "run"
    monkeypatch.delenv("WANDB_MODE", raising=False)  # unset: offline, never a network call
    board = monitor.open_tensorboard(True, run)  # what the trainer calls
    assert board is not None
    board.scalars("train", {"loss": 1.5, "lr": 0.1}, 2)
    board.scalars("train", {"loss": 1.25, "lr": 0.2}, 4)
    board.close()
    monkeypatch.setenv("WANDB_MODE", "offline")
    board = monitor.open_tensorboard(True, run)  # what repro.evaluate calls once the evaluations land
    assert board is not None
    board.scalars("eval", {"knn_top1": 33.5}, 4)
    board.close()
    assert history(run) == [{"train/loss": 1.5, "train/lr": 0.1, "step": 2},
                            {"train/loss": 1.25, "train/lr": 0.2, "step": 4},
                            {"eval/knn_top1": 33.5, "step": 4}]
    run_id = (run / "wandb" / monitor.WANDB_ID_FILE).read_text().strip()
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}  # the same W&B run, resumed
    assert not (run / monitor.LOG_DIR).exists()  # wandb alone: no TensorBoard files


def test_a_user_set_wandb_mode_wins(tmp_path, monkeypatch, wandb_only):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    board = monitor.open_tensorboard(True, tmp_path / "run")
    assert board is not None
    board.scalars("train", {"loss": 1.0}, 1)
    board.close()
    assert not list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_off_opens_nothing(tmp_path, wandb_only):
    assert monitor.open_tensorboard(False, tmp_path / "run") is None  # non-zero ranks, and --log none
    assert not (tmp_path / "run").exists()


def test_log_values():
    assert monitor.parse_log("none") == ()
    assert monitor.parse_log("wandb") == ("wandb",)
    assert monitor.parse_log("tensorboard,wandb") == ("tensorboard", "wandb")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown backend 'mlflow'"):
        monitor.parse_log("wandb,mlflow")


def test_a_missing_wandb_fails_at_the_command_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(argparse.ArgumentTypeError, match=r"pip install -e '\.\[wandb\]'"):
        monitor.parse_log("wandb")


@pytest.mark.slow
def test_repro_run_log_wandb_holds_what_metrics_jsonl_holds_and_the_evals(tmp_path, capsys, monkeypatch):
    from repro.run import main
    from tests.reliability.conftest import call_main, read_metrics, run_dir, sets

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["micl", "--budget", "6steps", "--evals", "knn", "--no-progress", "--no-report", "--log", "wandb",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), *sets(train__log_every=2)]
    try:
        rc, err = call_main(main, args, capsys)
    finally:
        monitor.select(["tensorboard"])
    assert rc == 0, err
    d = run_dir(tmp_path / "runs")
    rows = history(d)
    train = {r["step"]: r for r in rows if any(k.startswith("train/") for k in r)}
    metrics = read_metrics(d / "metrics.jsonl")
    assert sorted(train) == [m["step"] for m in metrics]
    for m in metrics:
        assert train[m["step"]] == pytest.approx({"step": m["step"], **{f"train/{k}": v for k, v in m.items()
                                                                         if k != "step"}}, rel=1e-12)
    knn = json.loads(next((d / "evals").glob("knn-*.json")).read_text())["records"][0]["value"]
    assert [r["eval/knn_top1"] for r in rows if "eval/knn_top1" in r] == pytest.approx([knn])
    assert not (d / monitor.LOG_DIR).exists()
