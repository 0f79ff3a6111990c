"""Unusable output directories fail before data loading and training, with one line naming the path and nothing
written: a read-only ``--out``, an ``--out``/``--results`` that is (or lies under) a regular file, and a disk too
full for two checkpoints and the export (``repro.checkpoint.run_disk_bytes``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import repro.checkpoint
from tests.reliability.conftest import call_main, error_line, sets, tree

NOBODY = 65534


def argv(out: Path, results: Path) -> list[str]:
    return ["micl", "--budget", "4steps", "--evals", "none", "--no-progress", "--no-report", "--out", str(out),
            "--results", str(results), *sets()]


def main_as_nobody(args: list[str], err_path: Path) -> int:
    """``repro.run.main(args)`` in a forked child that dropped root for an unprivileged user, so that permission
    bits apply (root ignores them). The child has everything imported already; the check fails before any work."""
    from repro.run import main

    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            with open(err_path, "w") as err:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                sys.stderr = err
                code = main(args)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_read_only_out_dir_fails_before_any_work(tmp_path, capsys):
    from repro.run import main

    if os.geteuid() != 0:
        base = tmp_path
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            rc, err = call_main(main, argv(ro / "runs", base / "results"), capsys)
        finally:
            ro.chmod(0o700)
        assert not (base / "results").exists()
    else:  # as root, run the check as nobody, in directories nobody can reach
        base = Path(tempfile.mkdtemp(prefix="repro-ro-"))
        try:
            base.chmod(0o755)
            ro, results = base / "ro", base / "results"
            ro.mkdir(mode=0o555)
            ro.chmod(0o555)
            results.mkdir()
            os.chown(results, NOBODY, NOBODY)
            rc = main_as_nobody(argv(ro / "runs", results), base / "stderr")
            err = (base / "stderr").read_text()
            assert tree(ro) == {} and tree(results) == {}
        finally:
            shutil.rmtree(base)
    assert rc == 2, err
    assert error_line(err) == f"repro: error: {ro / 'runs'}: not writable ({ro}: Permission denied)"


@pytest.mark.parametrize("which", ["out", "results"])
def test_output_under_a_regular_file(tmp_path, capsys, which):
    from repro.run import main

    (tmp_path / "file").write_text("a file, not a directory\n")
    bad = tmp_path / "file" / "sub"
    out, results = (bad, tmp_path / "results") if which == "out" else (tmp_path / "runs", bad)
    before = tree(tmp_path)
    rc, err = call_main(main, argv(out, results), capsys)
    assert rc == 2
    assert error_line(err) == f"repro: error: {bad}: cannot be created, {tmp_path / 'file'} is not a directory"
    assert tree(tmp_path) == before


def test_results_is_a_regular_file(tmp_path, capsys):
    from repro.run import main

    (tmp_path / "results").write_text("oops\n")
    rc, err = call_main(main, argv(tmp_path / "runs", tmp_path / "results"), capsys)
    assert rc == 2 and error_line(err) == f"repro: error: {tmp_path / 'results'}: not a directory"
    assert not (tmp_path / "runs").exists()


def test_disk_too_full_for_two_checkpoints_fails_before_training(tmp_path, capsys, monkeypatch):
    from repro.run import main

    seen: list[Path] = []

    def almost_full(path: Path) -> int:
        seen.append(Path(path))
        return 1_000_000  # 1 MB: less than two checkpoints of even the 2-block test model

    monkeypatch.setattr(repro.checkpoint, "free_bytes", almost_full)
    rc, err = call_main(main, argv(tmp_path / "runs", tmp_path / "results"), capsys)
    assert rc == 2
    line = error_line(err)
    assert line.startswith(f"repro: error: {tmp_path / 'runs' / 'builtin-shapes' / 'micl'}/")
    assert ": 1.0 MB free, this run needs about " in line and "(two checkpoints of model and optimizer state" in line
    assert seen == [tmp_path]  # measured on the nearest existing directory
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()

    monkeypatch.setattr(repro.checkpoint, "free_bytes", lambda path: 10**12)
    rc, err = call_main(main, argv(tmp_path / "runs", tmp_path / "results"), capsys)
    assert rc == 0, err
