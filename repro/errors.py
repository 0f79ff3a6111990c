"""Exceptions raised in one layer and caught in another (the trainer's, which the evaluations also raise)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def say_line(line: str) -> None:
    """Write one line to stderr in a single write(2): ranks that share a log file never split each other's lines."""
    text = line.rstrip("\n") + "\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest's capsys, a notebook): no fd to share
        sys.stderr.write(text)
        return
    sys.stderr.flush()
    os.write(fd, text.encode())


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step. The last good checkpoint is kept."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"non-finite loss at step {step}; stopped, last good checkpoint kept in {run_dir}")
        self.step = step
