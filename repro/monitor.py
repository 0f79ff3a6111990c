"""Optional live monitoring: TensorBoard scalars beside ``metrics.jsonl`` (``repro.run --log tensorboard``).

Nothing is imported or created when it is off. When on, rank 0 writes ``RUN_DIR/tensorboard/``: ``train/<key>``
for every value of each metrics line (loss and its parts, lr, img/s, momentum, ...) at its step, and
``eval/<eval>_<metric>`` for each evaluation of the export when it lands (at the run's last step).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from repro.config import ConfigError

LOG_DIR = "tensorboard"


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


def open_tensorboard(enabled: bool, run_dir: Path) -> TensorBoard | None:
    return TensorBoard(run_dir) if enabled else None
