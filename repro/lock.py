"""One process at a time per run directory.

:func:`run_lock`: an exclusive ``flock`` on ``RUN_DIR/.lock``, held by rank 0 while a run trains and while its export
is evaluated. A second command on the same directory (a requeue while the first still runs, a second terminal) gets
one line naming the holder and a non-zero exit, or waits for it with ``--wait``. The kernel drops the lock when its
holder dies, so a killed run never leaves a stale lock. (``flock`` on NFS is only as good as the NFS server's lock
manager; on a local or Lustre file system it is exact.) Pre-emption signals are :mod:`repro.signals`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from repro import distributed

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another process holds the run directory; the message names it."""


@contextlib.contextmanager
def run_lock(run_dir: Path, *, main: bool = True, wait: bool = False) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (rank 0 takes it; every rank learns whether it got it)."""
    f = None
    problem = ""
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole block
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if wait:
                log.info("%s: in use by %s; waiting for it (--wait)", run_dir, holder)
                fcntl.flock(f, fcntl.LOCK_EX)
            else:
                problem = f"{run_dir}: in use by {holder}; wait for it (--wait) or use another --out"
        if not problem:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            f.flush()
    problem = distributed.broadcast_object(problem)
    try:
        if problem:
            raise RunLocked(problem)
        yield
    finally:
        if f is not None:
            f.close()  # closing the descriptor releases the flock
