"""Pi-SAM's two training stages on a frozen SAM (PISAM_SPEC.md 5, 6; D2, D4).

* Stage 1 (HR Mask Decoder): the RGB embedding (trainable, D2), ``pi_base`` on the tight box, ``pi_refine``
  without clicks; ``losses.stage1_loss`` on the 256^2 and the 1024^2 logits against mask / 255, weighted by
  ``has_object``.
* Stage 2 (Precise Interactor): the frozen base forward (RGB embedding, ``pi_base``) runs jitted on its own; its
  256^2 logits go to the host, where clicks are simulated from their errors (``data.clicks``, spec 6); then the
  train step runs the interactor and the HR head, ``losses.stage2_loss`` weighted by valid * has_object.

The clicks of a sample depend only on (seed, step, the sample's row in the global batch), not on how the batch
is split over processes, so a run on N hosts draws the clicks of a run on one.

Decision (the click grid): the reference simulates clicks on its 256^2 grid, where ``pred_masks_s`` lives at
1024 input and where it resizes the ground truth (``labels_256``). We keep that grid whatever the model's size
(``config.click_grid``, 256): the low-resolution logits are resized to it bilinearly (the identity at 1024 input,
so the paper's recipes are unchanged) and the ground truth is resized to it as the reference does. Smaller
models would otherwise click on their own coarser grid, where the rule's exact ``GT == 255``, its 1-px erosion
and its 2-px minimum area remove most errors (a 128 px model's grid is 32^2: 8x coarser than the paper's).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pisam_jax.data import clicks as clicks_lib
from pisam_jax.modeling.pi_decoder import PiBase
from pisam_jax.models import ImageFeatures
from pisam_jax.training import losses
from pisam_jax.training import step as step_lib
from pisam_jax.training.stages.base import Stage, image_features, normalise, resize_to, targets_of


def pi_features(model, batch) -> ImageFeatures:
    """Encoder outputs plus the decoder's RGB embedding of the batch's images."""
    rgb = model.mask_decoder.rgb_embedding(normalise(batch["image"]))
    return dataclasses.replace(image_features(model, batch), rgb=rgb)


class PiStage(Stage):
    decoder = "pi"

    def preview(self, model, batch, clicks):
        features = pi_features(model, batch)
        base = model.pi_base(features, batch["box"][:, None])
        high = model.pi_refine(features, base, clicks)
        return high[:, 0] > 0, base.low_res[:, 0]


class Stage1(PiStage):
    """The HR Mask Decoder (and the RGB embedding) on the frozen SAM."""

    name = "stage1"

    def loss(self, model, batch, key):
        features = pi_features(model, batch)
        base = model.pi_base(features, batch["box"][:, None])
        high = model.pi_refine(features, base, for_gradient=True)
        return losses.stage1_loss(key, base.low_res, high, targets_of(batch), weights=batch["has_object"],
                                  num_points=self.config.num_points)


def simulate_clicks(logits: np.ndarray, gt: np.ndarray, *, seed: int, step: int, first_row: int) -> dict:
    """Training clicks (spec 6) for rows ``first_row, first_row + 1, ...`` of the global batch at ``step``.

    logits (B, g, g) the low-resolution prediction, gt (B, g, g) the target (0..255), on the click grid. Each row
    draws from its own generator, seeded by (seed, step, global row). -> {"points" (B, 10, 2), "labels" (B, 10)
    1 / 0 / -1 padding, "valid" (B,)}.
    """
    rows = [clicks_lib.simulate_clicks(p > 0, g, np.random.default_rng((seed, step, first_row + i)), mode="train")
            for i, (p, g) in enumerate(zip(logits, gt))]
    sim = {k: np.stack([r[k] for r in rows]) for k in ("points", "flags", "pad", "valid")}
    labels = np.where(sim["pad"], -1, sim["flags"]).astype(np.int32)
    return {"points": sim["points"], "labels": labels, "valid": sim["valid"]}


class Stage2(PiStage):
    """The Precise Interactor on the frozen stage-1 model, with simulated clicks."""

    name = "stage2"
    interactor = True
    uses_clicks = True

    def setup(self, graphdef, mesh) -> None:
        from flax import nnx

        def base_fn(train_state, frozen_state, batch):
            """The frozen base forward: -> (RGB embedding, PiBase, click inputs: logits and target on the grid)."""
            model = nnx.merge(graphdef, train_state, frozen_state)
            features = pi_features(model, batch)
            base = model.pi_base(features, batch["box"][:, None])
            return jax.lax.stop_gradient((features.rgb, base, self.click_inputs(base.low_res[:, 0], batch["mask"])))

        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self._base = jax.jit(base_fn, in_shardings=(rep, rep, data), out_shardings=data)
        self._mesh = mesh

    def click_inputs(self, low_res: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What clicks are simulated from: (low-res logits (B, h, w), masks (B, S, S) 0..255) -> the logits and the
        ground truth (0..255) on the click grid (module docstring), each (B, g, g)."""
        grid = (int(self.config.click_grid),) * 2
        logits = low_res if low_res.shape[-2:] == grid else resize_to(low_res, grid)
        return logits, resize_to(masks.astype(jnp.float32), grid)

    def prepare(self, train_state, frozen_state, batch, step):
        rgb, base, (logits, gt) = self._base(train_state, frozen_state, batch)
        local_logits = step_lib.local_rows(logits)
        first_row = jax.process_index() * local_logits.shape[0]  # shard_batch: each process's rows, in order
        clicks = simulate_clicks(local_logits, step_lib.local_rows(gt), seed=self.config.seed, step=step,
                                 first_row=first_row)
        out = {k: batch[k] for k in ("mask", "has_object") + (("poison",) if "poison" in batch else ())}
        out.update(step_lib.shard_batch(clicks, self._mesh),
                   rgb=rgb, embedding=base.embedding, hyper_in=base.hyper_in, low_res=base.low_res)
        return out, {}

    def loss(self, model, batch, key):
        features = ImageFeatures(None, (), batch["rgb"])
        base = PiBase(batch["embedding"], batch["hyper_in"], batch["low_res"])
        high = model.pi_refine(features, base, (batch["points"], batch["labels"]), for_gradient=True)
        weights = batch["valid"].astype(jnp.float32) * batch["has_object"].astype(jnp.float32)
        total, terms = losses.stage2_loss(key, high, targets_of(batch), weights, num_points=self.config.num_points)
        return total, dict(terms, valid_fraction=batch["valid"].astype(jnp.float32).mean())
