"""Shared helpers of the reliability tests: tiny CLI settings, in-process and subprocess runs of the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repro.lock import LOCK_FILE
from tests.conftest import ROOT

# as tests/smoke/test_cli.py's SMALL, smaller: 2 blocks, batch 16 of 64 built-in images (4 steps per epoch)
SMALL = {"model.depth": 2, "train.batch_size": 16, "data.builtin_train": 64, "data.builtin_test": 32}


def sets(**extra: object) -> list[str]:
    """``--set`` arguments for SMALL plus ``extra`` (keys with '__' for '.', e.g. train__log_every=1)."""
    items = {**SMALL, **{k.replace("__", "."): v for k, v in extra.items()}}
    return [a for k, v in items.items() for a in ("--set", f"{k}={v}")]


SLOW_CHECKPOINT = Path(__file__).with_name("slow_checkpoint")
"""A ``sitecustomize`` that slows checkpoint renames when ``REPRO_TEST_SLOW_CKPT`` is set (see its docstring)."""


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(ROOT), env.get("PYTHONPATH", "")]
    if extra.get("REPRO_TEST_SLOW_CKPT"):
        paths.insert(0, str(SLOW_CHECKPOINT))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def run_module(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=subprocess_env(**env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def call_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a CLI ``main(argv)`` in this process (no interpreter start-up): its exit status and its stderr."""
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def error_line(stderr: str, prefix: str = "repro: error:") -> str:
    """The one ``<prog>: error: ...`` line of a failed run (exactly one, on one line)."""
    lines = [x for x in stderr.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def run_dir(out: Path, method: str = "micl", dataset: str = "builtin-shapes") -> Path:
    dirs = sorted((Path(out) / dataset / method).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that a failed command changed nothing). A run directory's
    ``.lock`` is left out: it holds only who last held the directory, rewritten by every command that takes it."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run's directory (test_resume's short MiCL run): what a stopped, corrupted or requeued run
    must end bit-identical to."""
    from tests.reliability.test_resume import cli_args

    base = tmp_path_factory.mktemp("reference")
    p = run_module(cli_args(base / "runs", base / "results"), base)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir(base / "runs")


@pytest.fixture(autouse=True)
def _one_thread_cli(monkeypatch):
    """In-process CLI runs leave torch's thread count alone (without OMP_NUM_THREADS they set cpu_count threads)."""
    if "OMP_NUM_THREADS" not in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
