"""What a training workdir is, and what may change when a run resumes in one (``train.py --workdir``).

A workdir is ours when it is new or empty, or when its ``config.json`` holds a training configuration (written
first thing when a run starts), or when it holds nothing but what a run writes (a run killed before it wrote
its config.json). Anything else, a model directory above all, is refused: a run would overwrite its files.

On resume the configuration is compared with the one the latest checkpoint was written with, field by field
over the whole (nested) config, so fields added later are covered without a list of them here. A difference
in a field that changes the run (the learning rate, the data, the model, the seed, ...: every field not in
``SAFE_TO_CHANGE``) is refused, listing the fields; a difference in a field that only changes how the run is
watched or where it reads from (logging, progress, checkpoint cadence, the last step, data threads, the data
root, process coordinates) is allowed and printed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pisam_jax import models, outputs
from pisam_jax.training import checkpoints as ckpt_lib
from pisam_jax.training import logging as log_lib

RUN_CONFIG = "config.json"
EXPORT_DIR = "export"
# everything a run writes at the top of its workdir
RUN_ENTRIES = frozenset({RUN_CONFIG, log_lib.METRICS_FILE, log_lib.TB_DIR, ckpt_lib.CHECKPOINT_DIR, EXPORT_DIR})

# Dotted config fields (fnmatch patterns) that may differ on resume: they do not change the parameters a step
# computes. Everything else does, including fields this list has never heard of.
SAFE_TO_CHANGE = (
    "log_every_steps", "log_images_*", "progress",  # what is logged and shown
    "checkpoint.*",  # how often and how many checkpoints are kept, async or not
    "max_steps",  # where the run stops, not what each step does (the schedule follows num_epochs)
    "data.threads", "data.prefetch",  # reader parallelism: the stream is the same for any number of threads
    "data.data_root",  # where the datasets are (moved or mounted elsewhere); their names are data.datasets
    "distributed", "coordinator_address", "process_id",  # how the processes find each other
)


def is_training_config(d: Any) -> bool:
    """Whether a parsed config.json is a training configuration (not a model directory's ModelConfig)."""
    return isinstance(d, dict) and "stage" in d and "format_version" not in d


def check_ours(workdir: str | os.PathLike) -> None:
    """Raises CheckpointError unless ``workdir`` is new, empty, or a training workdir of ours."""
    workdir = Path(workdir)
    if not os.path.lexists(workdir):
        return
    if not workdir.is_dir():
        raise ckpt_lib.CheckpointError(f"--workdir {workdir} is a file; give a new folder")
    entries = sorted(os.listdir(workdir))
    if not entries:
        return
    if models.is_model_dir(workdir) or (workdir / models.PARAMS_DIR).is_dir():
        raise ckpt_lib.CheckpointError(
            f"--workdir {workdir} is a model directory; a run would overwrite its {RUN_CONFIG}. Give a new "
            "--workdir (to start from this model, pass it as --config.init_from)")
    config = workdir / RUN_CONFIG
    if config.is_file():
        try:
            if is_training_config(json.loads(config.read_text())):
                return
        except (OSError, ValueError):
            pass
        raise ckpt_lib.CheckpointError(
            f"--workdir {workdir} holds a {RUN_CONFIG} that is not a training configuration; it is not a training "
            "workdir: give a new or empty --workdir")
    foreign = [e for e in entries if e not in RUN_ENTRIES]
    if foreign:
        raise ckpt_lib.CheckpointError(
            f"--workdir {workdir} is not a training workdir (it holds {', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); give a new or empty --workdir")


def check_export(workdir: str | os.PathLike) -> None:
    """The run's export folder, if present, must be a model directory (the run replaces it at the end)."""
    export = Path(workdir) / EXPORT_DIR
    if os.path.lexists(export) and not models.is_model_dir(export):
        raise ckpt_lib.CheckpointError(
            f"{export} is not a model directory, so the run could not write its export there; move it away")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"data.threads": 2, ...}."""
    out = {}
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def is_safe(field: str) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in SAFE_TO_CHANGE)


_ABSENT = "(absent)"


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(safe, run-changing) differences between two JSON configs, as "field: old -> new" strings, sorted."""
    a, b = flatten(saved), flatten(new)
    safe, unsafe = [], []
    for field in sorted(set(a) | set(b)):
        old, now = a.get(field, _ABSENT), b.get(field, _ABSENT)
        if old != now:
            (safe if is_safe(field) else unsafe).append(f"{field}: {old} -> {now}")
    return safe, unsafe


def check_resume(workdir: str | os.PathLike, config: dict[str, Any]) -> tuple[int | None, list[str]]:
    """(latest checkpoint step or None, the allowed changes) for a run of ``config`` in ``workdir``.

    Raises CheckpointError when the config differs from the latest checkpoint's in a field that changes the run.
    """
    steps = ckpt_lib.checkpoint_steps(workdir)
    if not steps:
        return None, []
    step, meta = ckpt_lib.read_meta(workdir, steps[-1])
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ckpt_lib.CheckpointError(f"checkpoint {step} in {workdir} records no training configuration; "
                                       "it was not written by train.py: give a new --workdir")
    safe, unsafe = config_changes(saved, config)
    if unsafe:
        raise ckpt_lib.CheckpointError(
            f"--workdir {workdir} holds a run (step {step}) made with another configuration: {'; '.join(unsafe)}. "
            "Resuming would mix two runs: rerun with the run's settings, or give a new --workdir (only logging, "
            "progress, checkpoint cadence, max_steps, data threads and paths may change on resume)")
    return step, safe


def prepare(workdir: str | os.PathLike, config: dict[str, Any], *, write: bool) -> int | None:
    """Checks ``workdir`` for a run of ``config`` (a JSON dict) and claims it; returns the step it resumes from.

    Every process checks (all see the same files) before any writes, so all refuse together; then the one that
    ``write``s creates the folder, records ``config`` as the run's config.json on a fresh start (before anything
    else is written, so the folder is recognisably ours), and prints the allowed changes on a resume.
    """
    workdir = Path(workdir).absolute()
    check_ours(workdir)
    check_export(workdir)
    step, changes = check_resume(workdir, config)
    _barrier("workdir_checked")
    if not write:
        return step
    workdir.mkdir(parents=True, exist_ok=True)
    if step is None:
        outputs.write_file(workdir / RUN_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    elif changes:
        print(f"resuming {workdir} from step {step} with changes that do not alter the run: {'; '.join(changes)}",
              flush=True)
    return step


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def remove_if_unused(workdir: str | os.PathLike, *, keep_folder: bool = False) -> bool:
    """Removes what a run that failed to start wrote in a workdir that was new (or empty) before it.

    Only when the workdir holds no checkpoint and nothing but what a run writes before its first checkpoint;
    ``keep_folder``: the folder itself existed (empty) before, so only its contents go. Returns whether it did.
    """
    workdir = Path(workdir)
    if not workdir.is_dir() or ckpt_lib.checkpoint_steps(workdir):
        return False
    entries = os.listdir(workdir)
    if any(e not in RUN_ENTRIES - {EXPORT_DIR} for e in entries):
        return False
    if not keep_folder:
        shutil.rmtree(workdir)
        return True
    for e in entries:
        if (workdir / e).is_dir():
            shutil.rmtree(workdir / e)
        else:
            (workdir / e).unlink()
    return True
