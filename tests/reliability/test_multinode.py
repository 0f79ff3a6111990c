"""Multi-node: the same ``repro.run`` command on two "nodes" (two torchrun agents, ``--nnodes 2``, c10d rendezvous
on 127.0.0.1, gloo) trains exactly what one node with two processes trains, and a run whose second node died
resumes like a one-node run.

Both nodes share the run directory, as cluster nodes share a file system; rank 0 (on whichever node the
rendezvous puts it) writes checkpoints, the export and the records.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro.checkpoint import CHECKPOINT, load_checkpoint
from repro.export import EXPORT_WEIGHTS
from tests.reliability.conftest import read_metrics, run_dir, sets, subprocess_env
from tests.reliability.test_distributed import _children, free_port

pytestmark = pytest.mark.slow
STEPS = 12


def run_args(out: Path) -> list[str]:
    return ["-m", "repro.run", "mae", "--budget", f"{STEPS}steps", "--evals", "none", "--no-progress", "--no-report",
            "--out", str(out), "--results", str(out.parent / "results"),
            *sets(train__log_every=1, train__ckpt_every_s=0)]


def torchrun(launch: list[str], out: Path, cwd: Path, log: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *run_args(out)]
    return subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(**env), stdout=open(cwd / log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)


def two_nodes(out: Path, cwd: Path, tag: str, **env: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    port = free_port()
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{tag}-{port}"]
    return (torchrun(launch, out, cwd, f"{tag}-node0.log", **env),
            torchrun(launch, out, cwd, f"{tag}-node1.log", **env))


def finish(*procs: subprocess.Popen, timeout: float = 240) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("one-node")
    p = torchrun(["--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(free_port())], base / "runs", base,
                 "one-node.log")
    assert finish(p) == [0], (base / "one-node.log").read_text()[-3000:]
    return run_dir(base / "runs", "mae")


def losses(d: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl")}


def test_two_nodes_train_exactly_what_one_node_with_two_processes_trains(tmp_path, one_node):
    a, b = two_nodes(tmp_path / "runs", tmp_path, "nodes")
    rcs = finish(a, b)
    assert rcs == [0, 0], (tmp_path / "nodes-node0.log").read_text()[-3000:]
    d = run_dir(tmp_path / "runs", "mae")
    assert d.name == one_node.name
    assert losses(d) == losses(one_node) and len(losses(d)) == STEPS
    assert (d / EXPORT_WEIGHTS).read_bytes() == (one_node / EXPORT_WEIGHTS).read_bytes()


def test_a_run_whose_node_died_resumes_like_one_node(tmp_path, one_node):
    out = tmp_path / "runs"
    # checkpoint writes wait 0.3 s each (one per step here), so the kill lands mid-run
    a, b = two_nodes(out, tmp_path, "dies", REPRO_TEST_SLOW_CKPT="0.3")
    deadline = time.monotonic() + 180
    while True:
        ds = list(out.glob("*/mae/*"))
        if ds and (ds[0] / CHECKPOINT).exists() and len(read_metrics(ds[0] / "metrics.jsonl")) >= 4:
            break
        assert a.poll() is None and b.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "dies-node0.log").read_text()[-3000:]
        time.sleep(0.05)
    for pid in [*_children(b.pid), b.pid]:  # the second node dies: its worker and its agent
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    rc_a = a.wait(timeout=180)
    b.wait(timeout=30)
    assert rc_a != 0  # the surviving node does not hang and does not claim success
    d = run_dir(out, "mae")
    state = load_checkpoint(d / CHECKPOINT)
    assert not state["complete"] and 0 < state["step"] < STEPS
    a2, b2 = two_nodes(out, tmp_path, "resume")
    assert finish(a2, b2) == [0, 0], (tmp_path / "resume-node0.log").read_text()[-3000:]
    assert (d / EXPORT_WEIGHTS).read_bytes() == (one_node / EXPORT_WEIGHTS).read_bytes()
    assert losses(d) == losses(one_node)  # every step's loss, before and after the resume
