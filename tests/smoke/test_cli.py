"""``python -m repro.run`` end to end on tiny settings, bad input, and a 2-process gloo DDP run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from repro.records import read_all

SMALL = ["--set", "model.depth=2", "--set", "train.batch_size=32", "--set", "data.builtin_train=256",
         "--set", "data.builtin_test=128", "--set", "eval.linear_epochs=5", "--set", "eval.linear_warmup_epochs=1",
         "--no-progress"]


def run(args: list[str], env, cwd: Path, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_run_two_methods_end_to_end_then_rerun_is_idempotent(tmp_path, cpu_env):
    args = ["repro.run", "micl", "mae", "--budget", "6steps", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), *SMALL]
    p = run(args, cpu_env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs, problems = read_all(tmp_path / "results" / "records")
    assert not problems
    got = {(r.method, r.eval) for r in recs}
    for m in ("micl", "mae"):
        assert {(m, "pretrain"), (m, "knn"), (m, "linear")} <= got
    assert {("random-init", "knn"), ("random-init", "linear")} <= got
    pre = [r for r in recs if r.eval == "pretrain"]
    assert all(r.steps == 6 and r.world_size == 1 and r.budget_seconds is None and r.device for r in pre)
    table = (tmp_path / "results" / "builtin-shapes.md").read_text()
    assert "random-init" in table and "knn top1" in table and "linear top1" in table
    assert (tmp_path / "results" / "builtin-shapes_accuracy_vs_budget.png").stat().st_size > 1000
    export = next((tmp_path / "runs" / "builtin-shapes" / "micl").iterdir())
    meta = json.loads((export / "backbone.json").read_text())
    assert meta["timm_model"] == "vit_tiny_patch16_224" and meta["timm_kwargs"]["patch_size"] == 4
    assert meta["method"] == "micl" and meta["steps"] == 6

    before = (tmp_path / "results" / "records" / "builtin-shapes.jsonl").read_text()
    p2 = run(args, cpu_env, tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "skipping pre-training" in p2.stderr
    assert (tmp_path / "results" / "records" / "builtin-shapes.jsonl").read_text() == before

    report = run(["repro.report", "--results", str(tmp_path / "results")], cpu_env, tmp_path)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "results" / "builtin-shapes.md").read_text() == table


@pytest.mark.parametrize(("args", "needle"), [
    (["nosuch", "--budget", "1m"], "unknown method 'nosuch'"),
    (["micl", "--budget", "5"], "--budget '5'"),
    (["micl", "--budget", "5x"], "unknown unit"),
    (["micl", "--budget=-3h"], "must be positive"),
    (["micl", "--budget", "0m"], "must be positive"),
    (["micl", "--budget", "1m", "--set", "train.nope=1"], "unknown key 'train.nope'"),
    (["micl", "--budget", "1m", "--set", "train.batch_size=x"], "expected an integer"),
    (["micl", "--budget", "1m", "--data", "/nonexistent/data"], "does not exist"),
    (["micl", "--budget", "1m", "--evals", "knn,bogus"], "unknown evaluation 'bogus'"),
])
def test_bad_input_is_one_line_error(tmp_path, cpu_env, args, needle):
    p = run(["repro.run", *args, "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")],
            cpu_env, tmp_path, timeout=120)
    assert p.returncode == 2
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("repro: error:")]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_torchrun_two_process_gloo(tmp_path, cpu_env):
    """MAE, plus MoCo v3 (gathered keys, synced BN) and MACRL (gathered keys into the memory bank) under DDP."""
    p = run(["torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", "-m", "repro.run", "mae",
             "mocov3", "macrl", "--budget", "4steps", "--evals", "none", "--out", str(tmp_path / "runs"),
             "--results", str(tmp_path / "results"), *SMALL, "--set", "macrl.bank_size=256"], cpu_env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs, _ = read_all(tmp_path / "results" / "records")
    assert sorted(r.method for r in recs) == ["macrl", "mae", "mocov3"]
    assert all(r.world_size == 2 and r.steps == 4 and math.isfinite(r.value) for r in recs)


def test_mimco_trains_its_teacher_first_and_records_the_split(tmp_path, cpu_env):
    args = ["repro.run", "mimco", "--budget", "6steps", "--evals", "knn", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), *SMALL]
    p = run(args, cpu_env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = next((tmp_path / "runs" / "builtin-shapes" / "mimco").iterdir())
    stage1 = run_dir / "stage1-mocov3"
    assert (stage1 / "projector.safetensors").exists() and (stage1 / "backbone.safetensors").exists()
    meta = json.loads((run_dir / "backbone.json").read_text())
    assert meta["budget"] == "6steps" and meta["steps"] == 3
    assert meta["extra"]["stage1"]["steps"] == 3 and meta["extra"]["stage1"]["method"] == "mocov3"
    recs, _ = read_all(tmp_path / "results" / "records")
    pre = [r for r in recs if r.eval == "pretrain"]
    assert [r.method for r in pre] == ["mimco"]  # the teacher is part of mimco's budget, not a row of its own
    assert "stage 1 mocov3 teacher 3steps" in pre[0].note and "stage 2 student 3steps" in pre[0].note
    assert pre[0].pretrain_seconds >= meta["extra"]["stage1"]["seconds"]
    assert any(r.method == "mimco" and r.eval == "knn" for r in recs)
    p2 = run(args, cpu_env, tmp_path)
    assert p2.returncode == 0 and "skipping pre-training" in p2.stderr


def test_pretrain_on_real_cifar10_jpegs(tmp_path, cpu_env, cifar_jpeg_subset):
    p = run(["repro.run", "micl", "--budget", "3steps", "--data", str(cifar_jpeg_subset), "--recipe", "tiny",
             "--evals", "knn", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
             "--set", "model.depth=2", "--set", "train.batch_size=32", "--no-progress"], cpu_env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs, _ = read_all(tmp_path / "results" / "records")
    knn = [r for r in recs if r.eval == "knn" and r.method == "micl"]
    assert len(knn) == 1 and 0.0 <= knn[0].value <= 100.0 and knn[0].dataset == cifar_jpeg_subset.name


def test_cifar10_recipe_on_real_cifar10_jpegs_with_finetune_and_scratch_rows(tmp_path, cpu_env, cifar_jpeg_subset):
    """The issue-8 command shape, shrunk: the cifar10 recipe on real CIFAR JPEGs, fine-tuning the export and the
    random-init backbone (the supervised-from-scratch row)."""
    p = run(["repro.run", "mae", "--budget", "2steps", "--data", str(cifar_jpeg_subset), "--recipe", "cifar10",
             "--evals", "knn,finetune", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
             "--set", "model.depth=1", "--set", "train.batch_size=32", "--set", "eval.finetune_epochs=1",
             "--set", "eval.finetune_batch_size=32", "--no-progress"], cpu_env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs, _ = read_all(tmp_path / "results" / "records")
    pre = [r for r in recs if r.eval == "pretrain"]
    assert len(pre) == 1 and pre[0].recipe == "cifar10" and pre[0].model.startswith("vit_small_patch16_224 p4 @32")
    assert {(r.method, r.eval) for r in recs if r.eval == "finetune"} == {("mae", "finetune"),
                                                                         ("random-init", "finetune")}
    md = (tmp_path / "results" / f"{cifar_jpeg_subset.name}.md").read_text()
    assert "| supervised-scratch |" in md and "| random-init |" in md
