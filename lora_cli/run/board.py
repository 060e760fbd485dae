"""TensorBoard event files (``log.tensorboard: true``): every metrics.jsonl row also goes
to ``output_dir/tensorboard``, so ``tensorboard --logdir output_dir`` shows the run."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def available() -> bool:
    """Whether the tensorboard package (which torch's SummaryWriter needs) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class Board:
    """A SummaryWriter fed metrics rows: train/<key> for log rows, eval/<key> for evaluations."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(folder))

    def add(self, row: dict) -> None:
        step = row["step"]
        for key, value in row.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
