"""The training run's metrics log: one JSON object per line in ``out_dir/metrics.jsonl`` (+ TensorBoard).

Line format (keys present when measured at that step)::

    {"step": 100, "time": 12.3, "lr": 0.001, "tokens_per_s": 5300.0,
     "train/loss": 4.1, "train/loss/rgb": 5.0, ...,
     "val/loss": 4.3, "val/loss/rgb": 5.2, ...}

``time`` is wall seconds since the run (or resumed run) started. The evaluation report reads this file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["MetricsLog", "read_metrics"]

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL metrics file (main process only) with an optional TensorBoard writer."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False, truncate_after_step: int | None = None) -> None:
        """Open ``out_dir/metrics.jsonl``; when resuming, drop lines logged after ``truncate_after_step`` (they
        belong to steps the resumed run will redo)."""
        from tokenizers_mm.io_atomic import write_text

        self.path = Path(out_dir) / METRICS_NAME
        if truncate_after_step is None:
            write_text(self.path, "")
        elif self.path.exists():  # rewritten atomically: a crash here keeps the old log
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed (pip install tensorboard); logging to %s only", self.path)
            else:
                self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        record: dict[str, Any] = {"step": int(step)}
        for key, value in values.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and value is not None:
                    self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (a torn last line from a killed run is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping a malformed line in %s", path)
    return records
