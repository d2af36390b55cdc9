"""A training stage as data: which model it trains, what trains, the loss, what the host adds to a batch.

The loop (``training/loop.py``) runs any stage the same way:

    stage = stages.get(config)                       # e.g. SamStage(config)
    model = stage.initial_model(...)                 # decoder kind from ``stage.decoder``
    graphdef, train_state, frozen_state = nnx.split(model, stage.trainable(), ...)
    stage.setup(graphdef, mesh)                      # jitted helpers, if any
    for each step:
        batch = data + (frozen encoder outputs, when the encoder does not train)
        batch = stage.prepare(train_state, frozen_state, batch, step)   # host work (stage 2: clicks)
        train_step(...)                               # differentiates stage.loss on the trainable state

A batch is a dict of global arrays with a leading batch axis: from the data, ``image`` (B, S, S, 3) (0..255),
``mask`` (B, S, S) (0..255), ``box`` (B, 4) (x0, y0, x1, y1, the tight box of mask > 128), ``has_object`` (B,),
``input_size`` (B, 2) (the unpadded part); when the image encoder is frozen also ``embeddings`` (B, g, g, 256)
and ``interm0`` (B, g, g, C_vit), computed outside the gradient (and cached, ``config.cache_embeddings``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pisam_jax.models import ImageFeatures
from pisam_jax.training import trainable

PIXEL_MEAN = np.asarray([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.asarray([58.395, 57.12, 57.375], np.float32)


def normalise(images: jax.Array) -> jax.Array:
    """(B, S, S, 3) in 0..255 -> SAM-normalised float32 (the loader pads with raw 128 before this, as the reference)."""
    return (images.astype(jnp.float32) - PIXEL_MEAN) / PIXEL_STD


def image_features(model, batch: dict[str, jax.Array]) -> ImageFeatures:
    """The encoder's outputs: from the batch when the encoder is frozen, else computed here (under the gradient).

    Only the first global block's output is kept (``interm0``): the HQ and Pi-SAM decoders read no other.
    """
    if "embeddings" in batch:
        return ImageFeatures(batch["embeddings"], (batch["interm0"],))
    embeddings, interm = model.image_encoder(normalise(batch["image"]))
    return ImageFeatures(embeddings, (interm[0],))


def targets_of(batch: dict[str, jax.Array]) -> jax.Array:
    """The soft training target, mask / 255: (B, S, S) float32 in [0, 1]."""
    return batch["mask"].astype(jnp.float32) / 255.0


def resize_to(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, H, W) -> (B, h, w) bilinear without antialias (``F.interpolate(..., 'bilinear')``, the reference's
    ``labels_256``)."""
    return jax.image.resize(x, (x.shape[0],) + tuple(hw), "linear", antialias=False)


class Stage:
    """One training stage. Subclasses set the class attributes and implement ``loss`` and ``preview``."""

    name: ClassVar[str]
    decoder: ClassVar[str]  # the model's decoder: "sam", "hq" or "pi"
    interactor: ClassVar[bool] = False  # Pi-SAM: whether the decoder has the Precise Interactor
    uses_clicks: ClassVar[bool] = False  # sample panels show (and feed) simulated clicks

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def trainable_modules(self) -> tuple[str, ...]:
        """The dotted module paths that train: ``config.train_modules`` (comma-separated) or the stage's default."""
        given = self.config.get("train_modules", "")
        if given:
            return tuple(m.strip() for m in given.split(",") if m.strip())
        return trainable.TRAINABLE[self.name]

    def trainable(self):
        return trainable.trainable_filter(self.trainable_modules())

    def setup(self, graphdef, mesh) -> None:
        """Builds the stage's jitted helpers for this model and mesh (none by default)."""

    def prepare(self, train_state, frozen_state, batch: dict[str, jax.Array], step: int) -> tuple[dict, dict]:
        """Host-side work between the data and the train step: -> (batch for the step, host metrics)."""
        return batch, {}

    def loss(self, model, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def preview(self, model, batch: dict[str, jax.Array], clicks) -> tuple[jax.Array, jax.Array]:
        """The sample panels' prediction from the tight box (and ``clicks``, stage 2):
        -> (mask (B, S, S) bool, the low-resolution logits (B, h, w)).

        SAM and HQ-SAM: the single mask of the box (HQ-SAM: SAM's mask corrected by the HQ token's), upsampled.
        """
        features = image_features(model, batch)
        low, _ = model.decode(features, boxes=batch["box"][:, None], multimask_output=False)
        low = low[:, 0, 0]
        size = batch["image"].shape[1]
        return resize_to(low, (size, size)) > 0, low

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, "decoder": self.decoder, "trains": list(self.trainable_modules())}
