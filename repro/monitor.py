"""Optional live monitoring beside ``metrics.jsonl``: TensorBoard and/or Weights & Biases (``repro.run --log``).

Nothing is imported or created when it is off. When on (``train.tensorboard``, which ``repro.run --log`` sets, is the
switch; the callers pass it for rank 0 only), each selected backend gets the same values: ``train/<key>`` for every
value of each metrics line (loss and its parts, lr, img/s, momentum, ...) at its step, and
``eval/<eval>_<metric>`` for each evaluation of the export when it lands (at the run's last step).

- ``tensorboard`` writes ``RUN_DIR/tensorboard/``.
- ``wandb`` writes ``RUN_DIR/wandb/``: offline unless the user set ``WANDB_MODE`` (a training node often has no
  network, and an online ``wandb.init`` without one stalls; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads
  later). The W&B run id is kept in ``RUN_DIR/wandb/repro-run-id``, so a resumed run and its evaluations, which
  open the monitor again, continue the same W&B run. Values are logged against a ``step`` metric rather than
  W&B's own step counter, which refuses the evaluation's step once a later process resumes the run.

``repro.run --log`` picks the backends with :func:`select` (the config holds only the on/off switch, so the choice
is process state, set by each process's own command line, e.g. every torchrun rank's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from repro.config import ConfigError

LOG_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "repro-run-id"
BACKENDS = ("tensorboard", "wandb")
_selected: tuple[str, ...] = ("tensorboard",)

log = logging.getLogger("repro")


def select(backends: Sequence[str]) -> None:
    """Set the backends an enabled monitor writes to (default: TensorBoard alone, what ``train.tensorboard`` meant
    before there was a choice)."""
    global _selected
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise ConfigError(f"--log: unknown backend {bad[0] if bad else ''!r}; choose from {', '.join(BACKENDS)}")
    _selected = tuple(dict.fromkeys(backends))


def parse_log(value: str) -> tuple[str, ...]:
    """``--log``'s value: ``none`` -> (), else a comma list of :data:`BACKENDS`."""
    names = tuple(dict.fromkeys(x.strip().lower() for x in value.split(",") if x.strip()))
    if names in ((), ("none",)):
        return ()
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown backend {bad[0]!r}; choose none or from {', '.join(BACKENDS)}")
    for n in names:  # fail at the command line, not after the data has loaded
        if importlib.util.find_spec(n) is None:
            raise argparse.ArgumentTypeError(f"{n} needs the {n} package: pip install -e '.[{n}]'")
    return names


class Backend(Protocol):
    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter`` that fails early with the install hint."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard (--log tensorboard) needs the tensorboard package: "
                              "pip install -e '.[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / LOG_DIR))

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run directory (see the module docstring for offline mode and the kept run id)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--log wandb needs the wandb package: pip install -e '.[wandb]'") from None
        run_dir = Path(run_dir)
        root = run_dir / WANDB_DIR
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)
            id_file.write_text(run_id + "\n")
        if "WANDB_MODE" not in os.environ:
            log.info("W&B offline in %s (set WANDB_MODE=online to stream; wandb sync uploads later)", root)
        # the mode is passed, not left to W&B: it reads WANDB_MODE only at its first init in a process
        mode: Any = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name, mode=mode,
            project=os.environ.get("WANDB_PROJECT", "repro"), config=_run_config(run_dir),
            settings=wandb.Settings(console="off", quiet=True, reinit="create_new", x_disable_stats=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        self.run.log({**{f"{prefix}/{k}": float(v) for k, v in values.items()}, "step": int(step)})

    def close(self) -> None:
        self.run.finish()


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json`` (written before training) as the W&B run config, so runs can be filtered by it."""
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class Monitor:
    """Every selected backend behind the one interface the trainer and the evaluations call."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        for b in self.backends:
            b.scalars(prefix, values, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def open_monitor(enabled: bool, run_dir: Path) -> Monitor | None:
    """The selected backends writing under ``run_dir``, or None when monitoring is off (nothing imported)."""
    if not enabled:
        return None
    opened: list[Backend] = []
    try:
        for name in _selected:
            opened.append(TensorBoard(run_dir) if name == "tensorboard" else WandB(run_dir))
    except BaseException:
        for b in opened:
            b.close()
        raise
    return Monitor(opened)


open_tensorboard = open_monitor
"""The name the trainer and ``repro.evaluate`` call (it predates the W&B backend)."""
