"""Metric writing for training: JSONL (the record tests and scripts read) and TensorBoard (tensorboardX).

``clu.metric_writers`` needs TensorFlow, so this is our own small writer (JAX_NOTES 2.6). Only process 0
writes; other processes get a writer that does nothing.

    WORKDIR/metrics.jsonl       one JSON object a logged step: {"step": 20, "loss": ..., "learning_rate": ...}
    WORKDIR/tensorboard/        event files: ``tensorboard --logdir WORKDIR/tensorboard`` (scalars, and the
                                sample-prediction panels ``samples/<i>`` of ``training.samples``)

On resume the JSONL is cut back to the restored step, so it always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file (a torn last line, from a killed run, is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / TB_DIR))
            except ImportError:  # optional: the JSONL is the record
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records with a step after ``step`` (written by a run that was killed later than its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in values.items():
            v = float(v) if isinstance(v, (int, float)) or hasattr(v, "__float__") else v
            record[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), int(step))

    @property
    def writes_images(self) -> bool:
        """Whether :meth:`image` writes anything (process 0 with tensorboardX): else skip composing images."""
        return self.enabled and self._tb is not None

    def image(self, step: int, tag: str, image) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (sample predictions, ``training.samples``)."""
        if self.writes_images:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int, *, enabled: bool, desc: str = "train"):
    """A tqdm bar over steps with count, rate and ETA (disabled: a no-op object with the same methods)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
