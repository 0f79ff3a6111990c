"""Exceptions raised in one layer and caught in another (the trainer's, which the evaluations also raise)."""

from __future__ import annotations

from pathlib import Path


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step. The last good checkpoint is kept."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"non-finite loss at step {step}; stopped, last good checkpoint kept in {run_dir}")
        self.step = step
