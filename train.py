"""Train Pi-SAM's new modules on a frozen SAM: stage 1 (HR Mask Decoder) or stage 2 (Precise Interactor).

    python train.py --config=configs/pisam_vit_b_stage1.py --workdir=workdirs/vit_b_s1 \
        --config.init_from=checkpoints/sam_vit_b --config.data.data_root=data
    python train.py --config=configs/tiny.py:stage1 --workdir=/tmp/tiny1          # CPU, synthetic data

Each recipe's docstring (configs/) has its command. Running again with the same --workdir resumes from the
latest checkpoint (parameters, optimiser, data position), exactly. Writes WORKDIR/metrics.jsonl,
WORKDIR/tensorboard/, WORKDIR/checkpoints/<step>/ and, at the end, WORKDIR/export (load it with
``pisam_jax.load_model``). User errors (missing init_from or data root, bad config field, a --workdir that is not a
training workdir, a resume with a configuration that changes the run) print one line and exit with status 2, and a
new workdir is removed again; a NaN/Inf loss stops the run (status 1) and keeps the last good checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "training recipe, e.g. configs/pisam_vit_b_stage1.py")
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the export go; an existing one resumes")
flags.DEFINE_string("compilation_cache", os.path.expanduser("~/.cache/pisam_jax/xla"),
                    "persistent XLA compilation cache ('' to disable)")


def _parse_flags(argv):
    from pisam_jax.cli import parse_absl_flags

    # config_flags defers a config file that failed to load to its first use: use it inside the guard
    return parse_absl_flags(argv, check=lambda: FLAGS.config is None or FLAGS.config.keys())


def _distributed(config) -> None:
    import jax

    kw = {}
    if config.coordinator_address:
        kw["coordinator_address"] = config.coordinator_address
    if config.num_processes > 0:
        kw["num_processes"] = config.num_processes
    if config.process_id >= 0:
        kw["process_id"] = config.process_id
    # cross-process collectives on the CPU backend (harmless on GPU/TPU); must precede backend start-up
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.config is None:
        print("error: --config is required, e.g. --config=configs/tiny.py:stage1", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.workdir:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)
    import jax
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    config = FLAGS.config
    if config.distributed:
        _distributed(config)

    from pisam_jax.data.datasets import DatasetError
    from pisam_jax.data.images import ImageReadError
    from pisam_jax.models import ModelError
    from pisam_jax.outputs import OutputError
    from pisam_jax.training import workdirs
    from pisam_jax.training.checkpoints import CheckpointError
    from pisam_jax.training.loop import Diverged, UsageError, train

    existed = os.path.lexists(FLAGS.workdir)
    was_empty = not existed or (os.path.isdir(FLAGS.workdir) and not os.listdir(FLAGS.workdir))
    try:
        result = train(config, FLAGS.workdir)
    except (UsageError, DatasetError, ImageReadError, ModelError, CheckpointError, OutputError) as e:
        if was_empty and jax.process_index() == 0:  # a run that could not start leaves nothing behind
            workdirs.remove_if_unused(FLAGS.workdir, keep_folder=existed)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        loss = result.last_metrics.get("loss")
        print(f"done: step {result.step}" + (f", loss {loss:.4f}" if loss is not None else "")
              + (f"; model exported to {result.export}" if result.export else ""), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
