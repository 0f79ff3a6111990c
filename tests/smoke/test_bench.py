"""CPU smoke tests of ``python -m repro.bench`` (the GPU numbers come from the same code on the device)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from repro import bench

FAST = ["--steps", "1", "--warmup", "1", "--compile", "off", "--batch", "8", "--set", "model.depth=2"]


def test_bench_writes_table_and_csv_for_each_method(tmp_path):
    out = tmp_path / "tp"
    assert bench.main(["micl", "mimco", *FAST, "--out", str(out)]) == 0
    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["method"]) == ["micl", "mimco"]
    assert (df["img_per_s"] > 0).all() and (df["mfu"] > 0).all()
    assert (df["gflop_per_img"] > 0).all() and (df["peak_tflops"] > 0).all()
    # MFU is analytic FLOPs x img/s / peak, and img/s is batch / step time
    row = df.iloc[0]
    assert row["mfu"] == pytest.approx(row["gflop_per_img"] * 1e9 * row["img_per_s"] / (row["peak_tflops"] * 1e12))
    assert row["img_per_s"] == pytest.approx(8 / (row["ms_per_step"] / 1000))
    md = out.with_suffix(".md").read_text()
    assert "| current | tiny | 32 | micl | 8 |" in md and "| current | tiny | 32 | mimco | 8 |" in md
    assert bench.device_name(torch.device("cpu")) in md


def test_rerun_replaces_its_rows_and_other_tags_stay(tmp_path):
    out = tmp_path / "tp"
    assert bench.main(["mae", *FAST, "--out", str(out), "--tag", "before"]) == 0
    assert bench.main(["mae", *FAST, "--out", str(out), "--tag", "after"]) == 0
    assert bench.main(["mae", *FAST, "--out", str(out), "--tag", "after"]) == 0
    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["tag"]) == ["after", "before"]
    md = out.with_suffix(".md").read_text()
    assert "| before | tiny |" in md and "| after | tiny |" in md


def test_time_steps_excludes_warmup():
    calls: list[int] = []
    times = bench.time_steps(calls.append, steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)


def test_data_path_row_on_real_cifar_jpegs(tmp_path, cifar_jpeg_subset):
    out = tmp_path / "tp"
    assert bench.main(["micl", *FAST, "--out", str(out), "--data", str(cifar_jpeg_subset)]) == 0
    df = pd.read_csv(tmp_path / "tp_data.csv")
    assert list(df["source"]) == ["in-memory on cpu"]
    assert df["loader_img_per_s"].iloc[0] > 0 and 0 < df["ratio"].iloc[0] < 10
    assert "## Data path" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["nosuch"], "unknown method 'nosuch'"),
    (["mae", "--batch", "mae=0"], "--batch 'mae=0'"),
    (["mae", "--model", "vit_xxl"], "--model 'vit_xxl'"),
    (["mae", "--set", "model.nosuch=1"], "model.nosuch"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, capsys, argv, needle):
    assert bench.main([*argv, "--out", str(tmp_path / "tp")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tp.csv").exists()
