"""Training stages as data: each module says what trains, the loss, and what the host adds to a batch.

    sam      SAM itself: from scratch (all modules) or fine-tuning a converted SAM (``config.train_modules``)
    hq       HQ-SAM's new modules on a frozen SAM
    stage1   Pi-SAM's High-Resolution Mask Decoder (+ RGB embedding) on a frozen SAM
    stage2   Pi-SAM's Precise Interactor on a frozen stage-1 model

``get(config)`` returns the stage of ``config.stage`` (1 and 2 are accepted for stage1 and stage2).
"""

from __future__ import annotations

from pisam_jax.training.stages.base import Stage, image_features, normalise
from pisam_jax.training.stages.hq import HqStage
from pisam_jax.training.stages.pisam import Stage1, Stage2
from pisam_jax.training.stages.sam import SamStage

STAGES: dict[str, type[Stage]] = {s.name: s for s in (SamStage, HqStage, Stage1, Stage2)}
_ALIASES = {"1": "stage1", "2": "stage2"}


def stage_name(value) -> str:
    """``config.stage`` -> a key of STAGES; raises ValueError naming the choices."""
    name = _ALIASES.get(str(value), str(value))
    if name not in STAGES:
        raise ValueError(f"config.stage must be one of {', '.join(STAGES)}, got {value!r}")
    return name


def get(config) -> Stage:
    return STAGES[stage_name(config.stage)](config)


__all__ = ["STAGES", "Stage", "get", "image_features", "normalise", "stage_name"]
