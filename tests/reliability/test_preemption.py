"""Cluster behaviour: SIGTERM/SIGUSR1 stop a run at a step boundary with a checkpoint and exit status 75, and a
run directory is trained (or evaluated) by one command at a time.

Tested as Slurm and a second terminal would do it: signals and concurrent commands against real ``repro.run``
subprocesses. A pre-empted run, rerun with the same command, ends with the export of an uninterrupted run byte
for byte; a second command on a directory another one holds exits non-zero in one line naming the holder, or with
``--wait`` waits and then resumes the run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from repro.checkpoint import CHECKPOINT, load_checkpoint
from repro.export import EXPORT_WEIGHTS
from repro.signals import PREEMPTED_EXIT
from tests.reliability.conftest import error_line, run_module, subprocess_env
from tests.reliability.test_resume import STEPS, cli_args, logged

pytestmark = pytest.mark.slow




def start(args: list[str], cwd: Path, name: str, **env: str) -> tuple[subprocess.Popen, Path]:
    err = cwd / f"{name}.stderr"
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(**env),
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))  # noqa: SIM115
    return proc, err


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        assert proc.poll() is None, "the run ended before the point the test waits for"
        time.sleep(0.01)
    raise AssertionError("timed out")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_stop_signal_saves_a_checkpoint_exits_75_and_the_rerun_is_bit_identical(tmp_path, reference, sig):
    out, results = tmp_path / "runs", tmp_path / "results"
    args = cli_args(out, results)
    proc, err = start(args, tmp_path, "first")
    wait_until(lambda: logged(out)[1] >= 6, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT
    text = err.read_text()
    assert f"stopped by {sig.name} at step" in text and "Traceback" not in text, text
    d, n = logged(out)
    state = load_checkpoint(d / CHECKPOINT)
    assert not state["complete"] and 6 <= state["step"] < STEPS  # the boundary after the signal, not the end
    assert not (d / EXPORT_WEIGHTS).exists()

    p = run_module(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming micl at step {state['step']}/{STEPS}" in p.stderr
    assert (d / EXPORT_WEIGHTS).read_bytes() == (reference / EXPORT_WEIGHTS).read_bytes()


def test_two_commands_never_train_one_run_directory_at_once(tmp_path, reference):
    out, results = tmp_path / "runs", tmp_path / "results"
    args = cli_args(out, results)
    # each checkpoint write (one per step here) waits 1 s: the first run lasts long enough for the two other
    # processes to start even on loaded cores (0.5 s was too short once with an experiment sharing both cores)
    first, first_err = start(args, tmp_path, "first", REPRO_TEST_SLOW_CKPT="1.0")
    wait_until(lambda: logged(out)[1] >= 2, first)

    second = run_module(args, tmp_path)  # a second terminal: refused at once, in one line naming the holder
    line = error_line(second.stderr)
    assert second.returncode == 2 and f"in use by pid {first.pid} on" in line and "--wait" in line, line
    assert first.poll() is None  # the first run is untouched

    waiting, wait_err = start([*args, "--wait"], tmp_path, "waiting")  # a requeue that waits for the holder
    wait_until(lambda: "waiting for it" in wait_err.read_text(), waiting)
    n_before = logged(out)[1]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == PREEMPTED_EXIT
    assert waiting.wait(timeout=180) == 0, wait_err.read_text()[-3000:]
    assert "resuming micl at step" in wait_err.read_text()
    d, n_after = logged(out)
    assert n_after > n_before
    # one run's worth of training between them: the export equals the uninterrupted run's
    assert (d / EXPORT_WEIGHTS).read_bytes() == (reference / EXPORT_WEIGHTS).read_bytes()
    assert first_err.read_text().count("resuming") == 0


def test_sigterm_to_torchrun_reaches_every_rank_and_the_run_resumes(tmp_path):
    """Slurm signals the launcher: torchrun forwards SIGTERM to its workers, which stop at the same step boundary
    (agreed at a logging step) with one checkpoint; torchrun itself exits 1, so a Slurm script requeues on the
    signal it trapped (scripts/slurm.sbatch), not on torchrun's status."""
    from tests.reliability.test_distributed import free_port

    out, results = tmp_path / "runs", tmp_path / "results"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(free_port())]
    args = ["-m", *cli_args(out, results)]
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen([*launch, *args], cwd=tmp_path, env=subprocess_env(REPRO_TEST_SLOW_CKPT="0.3"),
                                stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: logged(out)[1] >= 3, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    text = (tmp_path / "torchrun.log").read_text()
    # each rank writes its line in one write(2) (repro.errors.say_line), so the two never split each other
    stops = [ln for ln in text.splitlines() if ln.startswith("repro: stopped by SIGTERM at step")]
    assert len(stops) == 2 and len(set(stops)) == 1, text[-3000:]  # both ranks, the same boundary
    d, _ = logged(out)
    state = load_checkpoint(d / CHECKPOINT)
    assert not state["complete"] and f"at step {state['step']};" in stops[0]
    p = subprocess.run([*launch[:-1], str(free_port()), *args], cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming micl at step {state['step']}/{STEPS}" in p.stderr
    assert (d / EXPORT_WEIGHTS).exists()
