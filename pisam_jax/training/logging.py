"""Metric writing for training: JSONL (the record tests and scripts read) and TensorBoard (tensorboardX).

``clu.metric_writers`` needs TensorFlow, so this is our own small writer (JAX_NOTES 2.6). Only process 0
writes; other processes get a writer that does nothing.

    WORKDIR/metrics.jsonl       one JSON object a logged step: {"step": 20, "loss": ..., "learning_rate": ...}
    WORKDIR/tensorboard/        event files: ``tensorboard --logdir WORKDIR/tensorboard`` (scalars, and the
                                sample-prediction panels ``samples/<i>`` of ``training.samples``)

A run calls ``truncate_after(start)`` before its first write: a fresh start (0) empties the JSONL, a resume cuts it
back to the restored step, so it always reads as one uninterrupted run; TensorBoard gets the same cut as a purge
step (``SummaryWriter(purge_step=...)``: TensorBoard drops the earlier events from that step on).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pisam_jax import outputs

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
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self._tb = None
        self._purge_step = None
        self._tb_available = False
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                import tensorboardX  # noqa: F401  (optional: the JSONL is the record)

                self._tb_available = True
            except ImportError:
                pass

    def truncate_after(self, step: int) -> None:
        """Drop records with a step after ``step`` (written by a run that was killed later than its checkpoint, or
        before its first one); TensorBoard's events after ``step`` are purged when it next writes."""
        if not self.enabled:
            return
        self._purge_step = step + 1
        if not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", -1) <= step]
        outputs.write_file(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def _tensorboard(self):
        """The SummaryWriter, made on first use (after ``truncate_after`` has set the purge step)."""
        if self._tb is None and self._tb_available:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / TB_DIR), purge_step=self._purge_step)
        return self._tb

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
        tb = self._tensorboard()
        if tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    tb.add_scalar(k, float(v), int(step))

    @property
    def writes_images(self) -> bool:
        """Whether :meth:`image` writes anything (process 0 with tensorboardX): else skip composing images."""
        return self.enabled and self._tb_available

    def image(self, step: int, tag: str, image) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (sample predictions, ``training.samples``)."""
        if self.writes_images:
            self._tensorboard().add_image(tag, image, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int, *, enabled: bool, desc: str = "train"):
    """A tqdm bar over steps with count, rate and ETA (disabled: a no-op object with the same methods)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
