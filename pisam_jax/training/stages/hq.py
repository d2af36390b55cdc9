"""Training HQ-SAM on a frozen SAM, as HQ-SAM's ``train/train.py`` does (Ke et al. 2023).

Trains the HQ output token, its MLP and the feature-fusion layers (``compress_vit_feat``, ``embedding_encoder``,
``embedding_maskfeature``); SAM is frozen, and the gradient flows through SAM's transformer and upscaling to the
HQ token. Each sample gets one prompt, chosen uniformly: its tight box (no noise), 10 foreground points drawn
uniformly from the mask, or the mask itself with noise near its boundary as the mask prompt. The loss is BCE +
Dice of the HQ token's mask alone (``hq_token_only``) against mask / 255, at importance-sampled points (the same
``losses.mask_losses`` as Pi-SAM), weighted by ``has_object``.

As in ``training.prompts``, boxes and points share one static layout of point slots (12: 10 points, 2 corners),
so a box-prompted sample carries 10 empty slots where HQ-SAM's has none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pisam_jax.training import losses, prompts
from pisam_jax.training.stages.base import Stage, image_features, resize_to, targets_of

NUM_POINTS_PROMPT = 10  # HQ-SAM's misc.masks_sample_points(k=10)
BOX, POINTS, NOISY_MASK = 0, 1, 2


class HqStage(Stage):
    """HQ-SAM's new modules on a frozen SAM."""

    name = "hq"
    decoder = "hq"

    def loss(self, model, batch, key):
        features = image_features(model, batch)
        targets = targets_of(batch)
        b, size = targets.shape[0], targets.shape[-1]
        grid = model.prompt_encoder.mask_input_size
        k_kind, k_points, k_noise, k_loss = jax.random.split(key, 4)

        kind = jax.random.randint(k_kind, (b,), 0, 3)
        rows, cols, found = prompts.draw_pixels(k_points, targets > 0.5, NUM_POINTS_PROMPT)
        points = prompts.cell_centres(rows, cols, (size, size), size)
        point_labels = jnp.where(((kind == POINTS) & found)[:, None], prompts.FOREGROUND, prompts.EMPTY)
        corners, corner_labels = prompts.box_slots(batch["box"], kind == BOX)
        coords = jnp.concatenate([points, corners], axis=1)
        labels = jnp.concatenate([jnp.broadcast_to(point_labels, rows.shape), corner_labels], axis=1)

        noisy = prompts.noisy_masks(k_noise, resize_to(targets, grid))[..., None]
        sparse, dense_mask = model.prompt_encoder(points=(coords, labels), masks=noisy)
        _, dense_none = model.prompt_encoder(points=(coords, labels))
        dense = jnp.where((kind == NOISY_MASK)[:, None, None, None], dense_mask, dense_none)

        decoder = model.mask_decoder
        hq = decoder.hq_features(features.embeddings, features.interm[0])
        masks, _ = decoder.predict_masks(features.embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense, hq)
        terms = losses.mask_losses(k_loss, masks[:, -1], targets, weights=batch["has_object"],
                                   num_points=self.config.num_points)
        return terms["bce"] + terms["dice"], terms
