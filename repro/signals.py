"""A clean stop when the cluster asks for one (pre-emption).

SIGTERM and SIGUSR1 (what Slurm sends before pre-empting, or at ``--signal``) set a flag in :class:`StopRequest`; the
trainer saves a checkpoint at the next step boundary and raises :class:`Preempted`, and ``repro.run`` exits with
:data:`PREEMPTED_EXIT`, the status ``scripts/slurm.sbatch`` requeues on. Rerunning the command resumes exactly.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75
"""Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint (EX_TEMPFAIL: retry me)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """A stop signal arrived; the checkpoint of the step boundary it names is saved."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; checkpoint saved in {run_dir}; rerun the same command "
                         "to resume")
        self.signum, self.step = signum, step


class StopRequest:
    """Catches SIGTERM/SIGUSR1 while active (main thread only) and remembers the first one."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for s in STOP_SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave the defaults
                break

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("%s received: saving a checkpoint at the next step boundary", signal.Signals(signum).name)
