"""Kill and resume: ``python -m repro.run`` SIGKILLed at a random moment, then re-run with the same command,
ends bit-identical to an uninterrupted run with the same seed.

What must continue across the kill: the weights (the exported ``backbone.safetensors``, byte for byte), the data
order and RNG (every logged per-step loss equals the uninterrupted run's), the LR schedule (every logged lr) and
the budget accounting (``plan.json``, the step count, one 'ok' pretrain record). A checkpoint write interrupted
mid-file is never loaded: the previous checkpoint survives and the half-written temp file is removed on resume.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from repro.checkpoint import CHECKPOINT, load_checkpoint
from repro.export import EXPORT_META, EXPORT_WEIGHTS
from repro.records import read_records
from tests.reliability.conftest import call_main, read_metrics, run_dir, run_module, sets, subprocess_env

STEPS = 24
RECORDS = Path("records") / "builtin-shapes.jsonl"


def cli_args(out: Path, results: Path) -> list[str]:
    # log and checkpoint after every step, so a kill can land anywhere between and inside checkpoint writes
    return ["repro.run", "micl", "--budget", f"{STEPS}steps", "--evals", "none", "--no-progress", "--no-report",
            "--out", str(out), "--results", str(results), *sets(train__log_every=1, train__ckpt_every_s=0)]


@dataclass(frozen=True)
class Trial:
    name: str
    lines: int
    """Kill once metrics.jsonl holds this many lines (this many steps logged) ..."""
    delay: float
    """... plus this many seconds."""
    slow_ckpt: float = 0.0
    """REPRO_TEST_SLOW_CKPT (``slow_checkpoint/sitecustomize.py``): seconds a checkpoint's temp file waits before
    its rename (0 = off); the kill then waits for such a temp file, so it lands inside a checkpoint write."""



_rng = random.Random(20240611)
TRIALS = [
    Trial("early", _rng.randint(1, 4), _rng.uniform(0.0, 0.05)),
    Trial("middle", _rng.randint(8, 14), _rng.uniform(0.0, 0.05)),
    Trial("late", _rng.randint(STEPS - 8, STEPS - 6), _rng.uniform(0.0, 0.05)),
    Trial("mid-checkpoint-write", _rng.randint(3, 8), _rng.uniform(0.0, 0.1), slow_ckpt=0.6),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    base = tmp_path_factory.mktemp("reference")
    p = run_module(cli_args(base / "runs", base / "results"), base)
    assert p.returncode == 0, p.stderr[-3000:]
    return base


def temp_files(d: Path | None) -> list[Path]:
    return sorted(d.glob(".*.tmp")) if d is not None and d.exists() else []


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, timeout: float = 180) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds; False if it finished first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return proc.returncode == -signal.SIGKILL
        time.sleep(0.004)
    proc.kill()
    proc.wait()
    raise AssertionError("the run neither reached the kill point nor finished")


def logged(out: Path) -> tuple[Path | None, int]:
    """The run directory (once it exists) and how many metric lines it holds."""
    parent = out / "builtin-shapes" / "micl"
    d = next(iter(parent.iterdir()), None) if parent.exists() else None
    m = d / "metrics.jsonl" if d is not None else None
    return d, (m.read_text().count("\n") if m is not None and m.exists() else 0)


def by_step(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """step -> (loss, lr); a step logged twice (killed after its line, before its checkpoint) must agree."""
    out: dict[int, tuple[float, float]] = {}
    for r in rows:
        v = (r["loss"], r["lr"])
        assert out.setdefault(r["step"], v) == v, f"step {r['step']} logged twice with different values"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("trial", TRIALS, ids=lambda t: t.name)
def test_sigkill_then_rerun_is_bit_identical(tmp_path, reference, trial):
    out, results = tmp_path / "runs", tmp_path / "results"
    args = cli_args(out, results)

    def ready() -> bool:
        d, n = logged(out)
        return n >= trial.lines and (not trial.slow_ckpt or bool(temp_files(d)))

    with open(tmp_path / "killed.stderr", "w") as err:
        env = {"REPRO_TEST_SLOW_CKPT": str(trial.slow_ckpt)} if trial.slow_ckpt else {}
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=subprocess_env(**env),
                                stdout=subprocess.DEVNULL, stderr=err)
        assert kill_when(proc, ready, trial.delay), "the run finished before the kill; move the kill point earlier"

    d, n_logged = logged(out)
    assert d is not None and 0 < n_logged < STEPS
    assert not (d / "train_summary.json").exists() and not (d / EXPORT_META).exists()
    ckpt = d / CHECKPOINT
    assert ckpt.exists()  # written after every step, and the first step was logged
    state = load_checkpoint(ckpt)  # whatever the kill interrupted, checkpoint.pt itself is whole
    assert not state["complete"] and n_logged - 1 <= state["step"] <= n_logged
    if trial.slow_ckpt:
        assert temp_files(d), "the kill should have landed inside a checkpoint write"
        assert state["step"] == n_logged - 1  # the write of step n was interrupted; step n - 1's survives
    assert not (results / RECORDS).exists() or not read_records(results / RECORDS)[0]

    p = run_module(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming micl at step {state['step']}/{STEPS}" in p.stderr
    assert not temp_files(d)  # the interrupted write's temp file is gone, never loaded

    ref = run_dir(reference / "runs")
    assert run_dir(out).name == ref.name
    assert (d / EXPORT_WEIGHTS).read_bytes() == (ref / EXPORT_WEIGHTS).read_bytes()
    assert (d / "plan.json").read_bytes() == (ref / "plan.json").read_bytes()
    got, want = by_step(read_metrics(d / "metrics.jsonl")), by_step(read_metrics(ref / "metrics.jsonl"))
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # per-step loss (data order, masks, crops) and lr (schedule) continue exactly
    recs, problems = read_records(results / RECORDS)
    ref_recs, _ = read_records(reference / "results" / RECORDS)
    assert not problems and len(recs) == 1 == len(ref_recs)
    r, rr = recs[0], ref_recs[0]
    assert (r.status, r.eval, r.steps, r.value, r.config_hash) == ("ok", "pretrain", STEPS, rr.value, rr.config_hash)
    assert r.pretrain_seconds > 0 and r.images_per_second > 0


def test_kill_after_final_checkpoint_loses_no_record(tmp_path, capsys):
    """Killed after the complete checkpoint but before the export and the record: the re-run exports the same
    weights and appends the pretrain record with the real final loss and throughput (not NaN / 0)."""
    from repro.run import main

    out, results = tmp_path / "runs", tmp_path / "results"
    argv = cli_args(out, results)[1:]
    rc, err = call_main(main, argv, capsys)
    assert rc == 0, err
    d = run_dir(out)
    first = read_records(results / RECORDS)[0]
    weights = (d / EXPORT_WEIGHTS).read_bytes()
    assert load_checkpoint(d / CHECKPOINT)["complete"]
    for name in (EXPORT_WEIGHTS, EXPORT_META, "train_summary.json"):
        (d / name).unlink()
    (results / RECORDS).unlink()  # the state a kill right after the final checkpoint leaves
    rc, err = call_main(main, argv, capsys)
    assert rc == 0, err
    again = read_records(results / RECORDS)[0]
    assert len(first) == len(again) == 1
    assert again[0].value == first[0].value and again[0].images_per_second == first[0].images_per_second
    assert again[0].steps == STEPS and (d / EXPORT_WEIGHTS).read_bytes() == weights
    rc, err = call_main(main, argv, capsys)  # finished: skipped, and no second record
    assert rc == 0 and len(read_records(results / RECORDS)[0]) == 1


def test_interrupted_checkpoint_write_is_never_loaded(tmp_path):
    """In-process version of the mid-write kill: the write fails between temp file and rename; the previous
    checkpoint is what loads, and the temp file is removed."""
    from repro.checkpoint import save_checkpoint

    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dies(state, p):
        Path(p).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", dies)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert load_checkpoint(path)["step"] == 1 and not temp_files(tmp_path)
