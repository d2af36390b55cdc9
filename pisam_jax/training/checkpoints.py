"""Training checkpoints (orbax ``CheckpointManager``) and the export to our model format.

One checkpoint per saved step, ``WORKDIR/checkpoints/<step>/``::

    train/    the trainable parameters (nnx.State as a pure dict)
    frozen/   every other model variable (so a checkpoint alone rebuilds the whole model)
    opt/      the optimiser state
    data/     the grain iterator state, one file per process
    meta/     JSON: step, stage, the ModelConfig, the training config

Saving is asynchronous (``async_save``) and keeps the latest ``keep`` steps; every host calls ``save`` (orbax
coordinates multi-host writes). A checkpoint appears under its final name only once complete, so a run killed at
any moment restarts from the last complete one.

``export(model, path)`` writes the model with ``pisam_jax.models.save_model``: ``pisam_jax.load_model(path)``
then loads it for prediction and evaluation. From the command line (a multi-host run, or another step):
``python -m pisam_jax.training.checkpoints WORKDIR OUT [STEP] [--overwrite]``; OUT is never the workdir or in it
(but WORKDIR/export), and an existing OUT is replaced only with --overwrite and only when it is a model directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pisam_jax import models

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint or workdir that cannot be used; the message says what to do."""


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of a workdir's complete checkpoints, ascending (orbax renames a checkpoint to its step when done)."""
    d = Path(workdir) / CHECKPOINT_DIR
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training workdir with at least one complete checkpoint."""
    return bool(checkpoint_steps(path))


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _pure(state):
    """Model state on disk: nested dicts of arrays (no nnx wrappers), as in our model format."""
    return state.to_pure_dict() if isinstance(state, nnx.State) else state


def _fill(template, restored):
    """The restored pure dict back into a copy of ``template``'s nnx.State structure."""
    if not isinstance(template, nnx.State):
        return restored
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, restored)
    return state


class Checkpoints:
    """A thin wrapper of ``ocp.CheckpointManager`` for the pieces of a training run."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, train_state, frozen_state, opt_state, data_iter, meta: dict[str, Any]) -> None:
        args = dict(
            train=ocp.args.StandardSave(_pure(train_state)),
            frozen=ocp.args.StandardSave(_pure(frozen_state)),
            opt=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, *, train_state, frozen_state, opt_state, data_iter) -> dict[str, Any]:
        """Restores into the given (possibly abstract) trees; returns the restored pieces and ``meta``.

        ``data_iter`` (if not None) is updated in place to continue after ``step``.
        """
        args = dict(
            train=ocp.args.StandardRestore(_abstract(_pure(train_state))),
            frozen=ocp.args.StandardRestore(_abstract(_pure(frozen_state))),
            opt=ocp.args.StandardRestore(_abstract(opt_state)),
            meta=ocp.args.JsonRestore(),
        )
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            with models.quiet_if_restore_fails():
                out = dict(self.manager.restore(step, args=ocp.args.Composite(**args)))
            out["train"] = _fill(train_state, out["train"])
            out["frozen"] = _fill(frozen_state, out["frozen"])
            return out
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"cannot restore checkpoint {self.directory / str(step)}: {e}; it was written by a different "
                "model or stage, or is damaged: use a new --workdir or remove it"
            ) from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_meta(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta) of the latest (or given) complete checkpoint of a workdir, without loading arrays."""
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    steps = checkpoint_steps(workdir)
    if not steps:
        raise CheckpointError(f"{workdir} has no checkpoints; train stage 1 there first or give a model directory")
    if step is not None and step not in steps:
        raise CheckpointError(f"{workdir} has no checkpoint of step {step}; its steps: {', '.join(map(str, steps))}")
    step = steps[-1] if step is None else step
    meta_dir = directory / str(step) / "meta"
    files = [p for p in meta_dir.iterdir() if p.is_file()] if meta_dir.is_dir() else []
    if not files:
        raise CheckpointError(f"checkpoint {directory / str(step)} has no meta; it is damaged")
    try:
        return step, json.loads(files[0].read_text())
    except ValueError as e:
        raise CheckpointError(f"{files[0]} is corrupt ({e}); checkpoint {step} is damaged") from None


def trainable_filter_of(meta: dict[str, Any]):
    """The trainable-parameter filter a checkpoint was split by (its ``meta["trainable"]`` module paths)."""
    from pisam_jax.training.trainable import trainable_filter

    return trainable_filter(meta["trainable"])


def load_workdir_model(workdir: str | os.PathLike, step: int | None = None) -> tuple[models.Sam, int]:
    """The whole model saved in a workdir's latest (or given) checkpoint, and its step (for stage 1 -> 2)."""
    step, meta = read_meta(workdir, step)
    config = models.ModelConfig.from_json(meta["model_config"])
    model = models.abstract_model(config)
    graphdef, train_state, frozen_state = nnx.split(model, trainable_filter_of(meta), ...)
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    # onto this process's first device, whatever topology wrote the checkpoint
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = lambda s: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), s.to_pure_dict()
    )
    try:
        with ocp.CheckpointManager(directory) as mngr, models.quiet_if_restore_fails():
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    train=ocp.args.StandardRestore(target(train_state)),
                    frozen=ocp.args.StandardRestore(target(frozen_state)),
                ),
            )
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"cannot read checkpoint {directory / str(step)} "
                              f"({models.first_line(e)}); it is damaged: give another STEP") from None
    nnx.replace_by_pure_dict(train_state, restored["train"])
    nnx.replace_by_pure_dict(frozen_state, restored["frozen"])
    return nnx.merge(graphdef, train_state, frozen_state), step


def _host_value(x):
    """A replicated (possibly multi-host) array -> numpy, from this process's first shard."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0)) if not x.is_fully_addressable else np.asarray(jax.device_get(x))
    return x


def export(model: models.Sam, path: str | os.PathLike, *, provenance: dict[str, Any] | None = None,
           overwrite: bool = False) -> Path:
    """Writes ``model`` in our model format (atomically); ``pisam_jax.load_model(path)`` loads it.

    An existing ``path`` is replaced only with ``overwrite`` and only when it is a model directory
    (``models.save_model``). Single process only (``save_model`` writes with one process); for a multi-host run
    export its workdir afterwards: ``python -m pisam_jax.training.checkpoints WORKDIR OUT``.
    """
    import dataclasses

    config = model.config
    if provenance:
        config = dataclasses.replace(config, provenance={**config.provenance, **provenance})
    target = models.abstract_model(config)
    state = jax.tree.map(_host_value, nnx.state(model, nnx.Variable))
    nnx.update(target, state)
    target.config = config
    return models.save_model(target, path, overwrite=overwrite)


def check_export_target(workdir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool) -> None:
    """Raises CheckpointError / ModelError unless ``out`` may receive an export of ``workdir`` (before loading).

    ``out`` must not be the workdir, a folder above it or one inside its checkpoints; the rest is
    ``models.check_output_dir``: absent, or with ``overwrite`` a model directory.
    """
    workdir, out = Path(workdir).absolute().resolve(), Path(out).absolute().resolve()
    if out == workdir or out in workdir.parents or (workdir / CHECKPOINT_DIR) in (out, *out.parents):
        raise CheckpointError(f"OUT {out} is the workdir being exported, holds it, or lies in its checkpoints; "
                              f"give a new folder, e.g. {workdir / 'export'}")
    models.check_output_dir(out, overwrite=overwrite, flag="OUT")


def main(argv=None) -> int:
    """``python -m pisam_jax.training.checkpoints WORKDIR OUT [STEP] [--overwrite]``: export a workdir's checkpoint."""
    import sys

    from pisam_jax.cli import ArgumentParser
    from pisam_jax.outputs import OutputError

    p = ArgumentParser(prog="python -m pisam_jax.training.checkpoints",
                                description="Export a training workdir's checkpoint as a model directory.")
    p.add_argument("workdir", metavar="WORKDIR", help="a training workdir (train.py --workdir)")
    p.add_argument("out", metavar="OUT", help="the model directory to write (must not exist, unless --overwrite)")
    p.add_argument("step", metavar="STEP", type=int, nargs="?", help="the checkpoint's step (default: the latest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a model directory (new one written beside it, swapped in, old removed)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not is_workdir(args.workdir):
            raise CheckpointError(f"WORKDIR {args.workdir} is not a training workdir with a checkpoint "
                                  f"({CHECKPOINT_DIR}/<step>/); give the --workdir of a train.py run")
        check_export_target(args.workdir, args.out, overwrite=args.overwrite)
        model, step = load_workdir_model(args.workdir, args.step)
        out = export(model, args.out, provenance={"trained_in": str(Path(args.workdir).absolute()), "step": step},
                     overwrite=args.overwrite)
    except (CheckpointError, models.ModelError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
