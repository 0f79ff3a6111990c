"""Silent corruption and full disks, against real ``repro.run`` processes.

The probe behind it: a run stopped by SIGTERM, 64 bytes in the middle of its ``checkpoint.pt`` flipped, the same
command again: it resumed and trained on the corrupted tensors. Now a checkpoint is checked against the SHA-256
written with it before anything is loaded; with a previous checkpoint the run resumes from that one and still ends
byte for byte as an uninterrupted run, without one it stops in one line naming the file and what to do. A disk
that fills after the pre-flight check stops the run in one line naming the directory and the space needed, leaves
the last checkpoint verified and no temp file, and the same command resumes once there is room (a real tmpfs;
skipped where mounting one is not permitted). The in-process versions are ``tests/unit/test_integrity.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from repro.checkpoint import CHECKPOINT, PREVIOUS_CHECKPOINT, load_checkpoint, verify_file
from repro.export import EXPORT_WEIGHTS
from repro.signals import PREEMPTED_EXIT
from tests.reliability.conftest import error_line, run_module, tree
from tests.reliability.test_preemption import start, wait_until
from tests.reliability.test_resume import STEPS, cli_args, logged

pytestmark = pytest.mark.slow




def flip_middle(path: Path, n: int = 64) -> None:
    """The probe's corruption: ``n`` bytes in the middle of the file inverted in place."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def sigterm_after(args: list[str], cwd: Path, lines: int) -> Path:
    """Start the run, SIGTERM it once ``lines`` steps are logged; it saves a checkpoint and exits 75."""
    out = Path(args[args.index("--out") + 1])
    proc, err = start(args, cwd, "first")
    wait_until(lambda: logged(out)[1] >= lines, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT, err.read_text()[-3000:]
    d, _ = logged(out)
    assert d is not None
    return d


def test_a_corrupted_newest_checkpoint_resumes_from_the_previous_one_bit_identically(tmp_path, reference):
    args = cli_args(tmp_path / "runs", tmp_path / "results")  # a checkpoint after every step
    d = sigterm_after(args, tmp_path, 6)
    newest = load_checkpoint(d / CHECKPOINT)["step"]
    previous = load_checkpoint(d / PREVIOUS_CHECKPOINT)["step"]
    assert previous < newest < STEPS
    flip_middle(d / CHECKPOINT)

    p = run_module(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    fell_back = [x for x in p.stderr.splitlines() if "resuming from the previous checkpoint" in x]
    assert len(fell_back) == 1, p.stderr[-3000:]
    assert f"{d / CHECKPOINT}: unreadable checkpoint: its bytes changed after it was written" in fell_back[0]
    assert f"{PREVIOUS_CHECKPOINT} (step {previous})" in fell_back[0]
    assert f"resuming micl at step {previous}/{STEPS}" in p.stderr
    assert (d / EXPORT_WEIGHTS).read_bytes() == (reference / EXPORT_WEIGHTS).read_bytes()
    assert verify_file(d / CHECKPOINT)[1] and verify_file(d / PREVIOUS_CHECKPOINT)[1]  # both good again


def test_the_probe_a_corrupted_only_checkpoint_stops_the_run_in_one_line(tmp_path):
    """As the probe ran it: the default checkpoint cadence, so the SIGTERM checkpoint is the only one."""
    args = [a.replace("train.ckpt_every_s=0", "train.ckpt_every_s=600") for a in cli_args(tmp_path / "runs",
                                                                                           tmp_path / "results")]
    d = sigterm_after(args, tmp_path, 6)
    assert not (d / PREVIOUS_CHECKPOINT).exists()
    flip_middle(d / CHECKPOINT)
    before = tree(tmp_path / "runs")

    p = run_module(args, tmp_path)
    assert p.returncode == 2
    line = error_line(p.stderr)
    assert line.startswith(f"repro: error: {d / CHECKPOINT}: unreadable checkpoint: its bytes changed after it was "
                           "written"), line
    assert "there is no previous checkpoint: nothing was loaded" in line and "delete the run directory" in line
    assert "resuming" not in p.stderr
    assert tree(tmp_path / "runs") == before  # nothing trained, nothing rewritten


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 40 MB tmpfs (the run needs ~25 MB: two checkpoints and the export); skipped where mounting is refused."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_disk_that_fills_mid_run_stops_it_in_one_line_and_the_same_command_resumes(tmp_path, small_disk,
                                                                                     reference):
    args = cli_args(small_disk / "runs", tmp_path / "results")
    # each checkpoint's temp file waits 1 s before its rename: while the first one waits, another process takes
    # all but 512 kB of the disk; the pre-flight check has long passed, and the second checkpoint does not fit
    proc, err = start(args, tmp_path, "first", REPRO_TEST_SLOW_CKPT="1.0")

    def first_checkpoint_written() -> bool:
        """Its temp file complete (hashed: the sidecar is written) and waiting for its rename."""
        d, _ = logged(small_disk / "runs")
        return (d is not None and (d / f"{CHECKPOINT}.sha256").exists() and not (d / CHECKPOINT).exists()
                and any(not p.name.startswith(f".{CHECKPOINT}.sha256") for p in d.glob(f".{CHECKPOINT}.*.tmp")))

    wait_until(first_checkpoint_written, proc)
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - (512 << 10))
    assert proc.wait(timeout=180) == 2, err.read_text()[-3000:]
    d, _ = logged(small_disk / "runs")
    assert d is not None
    line = error_line(err.read_text())
    assert line.startswith(f"repro: error: {d}: no space left on the device while writing {CHECKPOINT} (it needs "
                           "about "), line
    assert "rerun the same command" in line
    assert not list(d.glob(".*.tmp"))  # the failed write's temp file is gone
    assert load_checkpoint(d / CHECKPOINT)["step"] == 1 and verify_file(d / CHECKPOINT)[1]
    assert not (d / EXPORT_WEIGHTS).exists()

    filler.unlink()  # room again
    p = run_module(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming micl at step 1/{STEPS}" in p.stderr
    assert (d / EXPORT_WEIGHTS).read_bytes() == (reference / EXPORT_WEIGHTS).read_bytes()
