"""Training of the new Pi-SAM modules on a frozen SAM: losses, the trainable-parameter predicate, the train step.

    from pisam_jax.training import losses, trainable, step
"""

from pisam_jax.training.losses import mask_losses, stage1_loss, stage2_loss
from pisam_jax.training.step import (
    check_finite,
    cosine_epoch_schedule,
    make_data_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)
from pisam_jax.training.trainable import STAGE_MODULES, param_counts, trainable_filter

__all__ = [
    "STAGE_MODULES",
    "check_finite",
    "cosine_epoch_schedule",
    "make_data_mesh",
    "make_optimizer",
    "make_train_step",
    "mask_losses",
    "param_counts",
    "replicate",
    "shard_batch",
    "stage1_loss",
    "stage2_loss",
    "trainable_filter",
]
