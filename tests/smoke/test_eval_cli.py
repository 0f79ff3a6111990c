"""``python -m evals.<protocol>`` as a user runs it: a fresh interpreter evaluates an export, records the number,
and a bad export or path fails with one line and status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from repro.checkpoint import file_sha256, write_checksum
from repro.data import load_data
from repro.export import EXPORT_WEIGHTS
from repro.pretrain import random_init_export
from repro.records import read_records
from tests.unit.test_finetune import MODEL, ROOT, SMALL_DATA


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return random_init_export(MODEL, load_data(SMALL_DATA), seed=0, out=tmp_path_factory.mktemp("runs"), recipe="tiny")


def _cli(args: list[str], env, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_evaluates_an_export_and_fails_in_one_line(export_dir, tmp_path, cpu_env):
    small = ["--set", "data.builtin_train=64", "--set", "data.builtin_test=32", "--no-progress"]
    p = _cli(["evals.knn", "--export", str(export_dir), "--results", str(tmp_path / "res"), *small], cpu_env, ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "knn top1 = " in p.stdout
    recs, torn = read_records(tmp_path / "res" / "records" / "builtin-shapes.jsonl")
    assert not torn and [(r.method, r.eval, r.metric) for r in recs] == [("random-init", "knn", "top1")]
    assert recs[0].export_sha256 == file_sha256(export_dir / EXPORT_WEIGHTS)  # the record names the weights it measured

    missing = _cli(["evals.knn", "--export", str(tmp_path / "nope"), *small], cpu_env, ROOT)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and missing.stderr.startswith("evals: error: ")
    assert "nope" in missing.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "backbone.json").write_text((export_dir / "backbone.json").read_text())
    state = load_file(str(export_dir / EXPORT_WEIGHTS))
    save_file({**state, "extra.weight": torch.zeros(1)}, str(bad / EXPORT_WEIGHTS))
    for name in ("backbone.json", EXPORT_WEIGHTS):  # written as such: the key is what is wrong, not the bytes
        write_checksum(bad / name)
    p = _cli(["evals.finetune", "--export", str(bad), *small], cpu_env, ROOT)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("evals: error: ") and "extra.weight" in p.stderr
