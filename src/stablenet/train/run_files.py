"""The files of a training run besides its checkpoints: ``config.yaml``, ``metrics.csv``, TensorBoard, the log line.

Only rank 0 writes them (Note [global batch] in ``stablenet.train.distributed``); every write is atomic.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

from stablenet.atomic import atomic_write_text, atomic_write_yaml

__all__ = ["CONFIG_FILE", "METRICS_FILE", "epoch_line", "open_tensorboard", "write_config", "write_metrics"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"

logger = logging.getLogger("stablenet.train.trainer")


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """``run_dir/config.yaml``: the resolved configuration (and, under a time budget, the plan and its outcome)."""
    atomic_write_yaml(run_dir / CONFIG_FILE, config)


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``run_dir/metrics.csv``, one row per epoch; the columns are the union of the rows' keys, in first-seen order
    (an epoch without evaluation leaves its accuracy cells empty)."""
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / METRICS_FILE, buf.getvalue())


def open_tensorboard(run_dir: Path):
    """A ``SummaryWriter`` in ``run_dir/tensorboard``, or ``None`` when tensorboard is not installed (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _percent(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One concise line for the log: ``epoch 3/30: loss 0.412, train 93.1%, test 95.2%, cert@0.5 81.0%, ...``."""
    parts = [f"loss {row['train_loss']:.4f}", f"train {_percent(row['train_acc'])}"]
    if row.get("test_acc") not in (None, ""):
        cert_key = next((k for k in row if k.startswith("cert_acc@")), None)
        parts.append(f"test {_percent(row['test_acc'])}")
        if cert_key is not None:
            parts.append(f"cert@{cert_key.split('@')[1]} {_percent(row[cert_key])}")
    parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.0f} img/s", f"{row['time_s']:.1f} s"]
    return f"epoch {row['epoch']}/{epochs}: " + ", ".join(parts)
