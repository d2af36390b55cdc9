"""Training SAM, HQ-SAM and Pi-SAM: stages, losses, prompts, the trainable-parameter predicate, the train step.

    from pisam_jax.training import losses, stages, trainable, step
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
from pisam_jax.training.trainable import TRAINABLE, param_counts, trainable_filter

__all__ = [
    "TRAINABLE",
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
