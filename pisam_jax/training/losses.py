"""Mask losses of Pi-SAM training (PISAM_SPEC.md 5.1; the reference's ``modeling/loss.py``, from Mask2Former/HQ-SAM).

Each loss compares a mask prediction with the soft 1024^2 target at N = 112^2 points per mask, chosen by
PointRend-style importance sampling on the prediction:

  1. draw ``oversample_ratio * N`` uniform points in [0, 1]^2 (x, y);
  2. sample the prediction's logits there (bilinear, ``grid_sample`` with align_corners=False, zero padding);
  3. keep the ``importance_sample_ratio * N`` most uncertain points (uncertainty = -|logit|);
  4. add ``N - importance_sample_ratio * N`` fresh uniform points.

The selection is not differentiated (``stop_gradient``); the losses are differentiable with respect to the logits
at the chosen points. Point coordinates are normalised, so a 256^2 prediction is compared with the 1024^2 target
directly: nothing is upsampled.

Losses per mask, reduced over the batch as the reference does:

  * BCE:  mean over points of BCE-with-logits; summed over the batch and divided by ``num_masks``;
  * Dice: 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) with p = sigmoid(logits); same reduction.

With per-sample weights w (the ``valid_mask`` of stage 2) each per-mask loss is multiplied by w, summed, and divided
by sum(w) instead (by 1 where sum(w) = 0, so an all-invalid batch gives loss 0 and zero gradients).

Everything here is a pure function of arrays and an explicit PRNG key, and jit-able. Computation is in float32.
Under a data-parallel ``jit`` the batch axis is the global batch: ``num_masks`` defaults to the global B and the
weighted form divides by the global sum(w).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_POINTS = 112 * 112
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75


def _as_bhw(x: jax.Array, name: str) -> jax.Array:
    """(B, H, W) or (B, 1, H, W) -> (B, H, W) float32."""
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got shape {x.shape}")
    return x.astype(jnp.float32)


def point_sample(inputs: jax.Array, coords: jax.Array) -> jax.Array:
    """Bilinear samples of ``inputs`` at normalised points: Mask2Former's ``point_sample``.

    That is ``F.grid_sample(inputs[:, None], 2 * coords[:, :, None] - 1, align_corners=False)`` with zero padding:
    a point (x, y) in [0, 1]^2 lies at pixel (x * W - 0.5, y * H - 0.5) in pixel-centre coordinates, and neighbours
    outside the image count as 0.

    inputs (B, H, W); coords (B, P, 2) as (x, y) in [0, 1] -> (B, P).
    """
    b, h, w = inputs.shape
    g = 2.0 * coords - 1.0  # grid_sample's [-1, 1] grid, computed as the reference does
    ix = ((g[..., 0] + 1.0) * w - 1.0) / 2.0
    iy = ((g[..., 1] + 1.0) * h - 1.0) / 2.0
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    wx1 = ix - x0
    wy1 = iy - y0
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    flat = inputs.reshape(b, h * w)

    def corner(yc, xc):
        inside = (xc >= 0) & (xc <= w - 1) & (yc >= 0) & (yc <= h - 1)
        idx = jnp.clip(yc, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xc, 0, w - 1).astype(jnp.int32)
        return jnp.where(inside, jnp.take_along_axis(flat, idx, axis=1), 0.0)

    return (
        corner(y0, x0) * (wy0 * wx0)
        + corner(y0, x0 + 1) * (wy0 * wx1)
        + corner(y0 + 1, x0) * (wy1 * wx0)
        + corner(y0 + 1, x0 + 1) * (wy1 * wx1)
    )


def calculate_uncertainty(logits: jax.Array) -> jax.Array:
    """Uncertainty of a point: -|logit| (highest at the decision boundary)."""
    return -jnp.abs(logits)


def select_uncertain_points(
    logits: jax.Array, candidate_coords: jax.Array, random_coords: jax.Array, num_uncertain: int
) -> jax.Array:
    """The deterministic part of importance sampling, given the random draws.

    logits (B, H, W); candidate_coords (B, kN, 2) and random_coords (B, R, 2), (x, y) in [0, 1]
    -> (B, num_uncertain + R, 2): the ``num_uncertain`` most uncertain candidates (most uncertain first),
    then the random points. Not differentiated.
    """
    logits = jax.lax.stop_gradient(logits)
    uncertainty = calculate_uncertainty(point_sample(logits, candidate_coords))
    _, idx = jax.lax.top_k(uncertainty, num_uncertain)
    chosen = jnp.take_along_axis(candidate_coords, idx[..., None], axis=1)
    return jax.lax.stop_gradient(jnp.concatenate([chosen, random_coords], axis=1))


def draw_points(
    key: jax.Array,
    batch: int,
    *,
    num_points: int = NUM_POINTS,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
) -> tuple[jax.Array, jax.Array, int]:
    """The random draws of importance sampling: (candidates (B, kN, 2), fresh (B, N - nU, 2), nU).

    Counts follow the reference: kN = int(N * oversample_ratio), nU = int(importance_sample_ratio * N).
    """
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    k_cand, k_rand = jax.random.split(key)
    candidates = jax.random.uniform(k_cand, (batch, num_sampled, 2), jnp.float32)
    fresh = jax.random.uniform(k_rand, (batch, num_points - num_uncertain, 2), jnp.float32)
    return candidates, fresh, num_uncertain


def uncertain_point_coords(
    key: jax.Array,
    logits: jax.Array,
    *,
    num_points: int = NUM_POINTS,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
) -> jax.Array:
    """Mask2Former's ``get_uncertain_point_coords_with_randomness`` with ``calculate_uncertainty``.

    logits (B, H, W) -> coords (B, num_points, 2), (x, y) in [0, 1]; no gradient flows through the choice.
    """
    logits = _as_bhw(logits, "logits")
    candidates, fresh, num_uncertain = draw_points(
        key,
        logits.shape[0],
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
    )
    return select_uncertain_points(logits, candidates, fresh, num_uncertain)


def reduce_masks(per_mask: jax.Array, num_masks, weights) -> jax.Array:
    """Sum over the batch / num_masks, or the w-weighted sum / sum(w) (1 where sum(w) = 0)."""
    if weights is None:
        return per_mask.sum() / num_masks
    w = weights.astype(jnp.float32).reshape(per_mask.shape)
    total = w.sum()
    return (per_mask * w).sum() / jnp.where(total == 0, 1.0, total)


def bce_per_mask(point_logits: jax.Array, point_labels: jax.Array) -> jax.Array:
    """BCE-with-logits averaged over points: (..., P) -> (...)."""
    x, t = point_logits, point_labels
    # torch's binary_cross_entropy_with_logits: max(x, 0) - x t + log(1 + exp(-|x|))
    return (jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))).mean(axis=-1)


def dice_per_mask(point_logits: jax.Array, point_labels: jax.Array) -> jax.Array:
    """1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) over points, p = sigmoid: (..., P) -> (...)."""
    p, t = jax.nn.sigmoid(point_logits), point_labels
    return 1.0 - (2.0 * (p * t).sum(axis=-1) + 1.0) / (p.sum(axis=-1) + t.sum(axis=-1) + 1.0)


def focal_per_mask(point_logits: jax.Array, point_labels: jax.Array, alpha: float = 0.25, gamma: float = 2.0):
    """Sigmoid focal loss (Lin et al.; detectron2's ``sigmoid_focal_loss``, which SAM trains with) averaged over
    points: alpha_t (1 - p_t)^gamma BCE, p_t = p t + (1 - p)(1 - t), alpha_t = alpha t + (1 - alpha)(1 - t).
    (..., P) -> (...)."""
    x, t = point_logits, point_labels
    p = jax.nn.sigmoid(x)
    ce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    p_t = p * t + (1.0 - p) * (1.0 - t)
    alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    return (alpha_t * (1.0 - p_t) ** gamma * ce).mean(axis=-1)


def sigmoid_ce_loss(
    point_logits: jax.Array, point_labels: jax.Array, num_masks=None, weights: jax.Array | None = None
) -> jax.Array:
    """BCE-with-logits averaged over points, reduced over masks (see the module docstring).

    point_logits, point_labels (B, P); num_masks defaults to B; weights (B,) or None -> scalar.
    """
    num_masks = point_logits.shape[0] if num_masks is None else num_masks
    return reduce_masks(bce_per_mask(point_logits, point_labels), num_masks, weights)


def dice_loss(
    point_logits: jax.Array, point_labels: jax.Array, num_masks=None, weights: jax.Array | None = None
) -> jax.Array:
    """Dice loss 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid, reduced over masks.

    point_logits, point_labels (B, P); num_masks defaults to B; weights (B,) or None -> scalar.
    """
    num_masks = point_logits.shape[0] if num_masks is None else num_masks
    return reduce_masks(dice_per_mask(point_logits, point_labels), num_masks, weights)


def mask_losses_at(
    pred_logits: jax.Array,
    targets: jax.Array,
    coords: jax.Array,
    *,
    num_masks=None,
    weights: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """BCE and Dice at given points (the reference's ``loss_masks`` after point selection).

    pred_logits (B, h, w) logits; targets (B, H, W) in [0, 1]; coords (B, P, 2) -> {"bce", "dice"} scalars.
    """
    pred_logits = _as_bhw(pred_logits, "pred_logits")
    targets = _as_bhw(targets, "targets")
    coords = jax.lax.stop_gradient(coords)
    point_labels = jax.lax.stop_gradient(point_sample(targets, coords))
    point_logits = point_sample(pred_logits, coords)
    return {
        "bce": sigmoid_ce_loss(point_logits, point_labels, num_masks, weights),
        "dice": dice_loss(point_logits, point_labels, num_masks, weights),
    }


def mask_losses(
    key: jax.Array,
    pred_logits: jax.Array,
    targets: jax.Array,
    *,
    num_masks=None,
    weights: jax.Array | None = None,
    num_points: int = NUM_POINTS,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
) -> dict[str, jax.Array]:
    """The reference's ``loss_masks``: importance-sampled points, then BCE and Dice.

    key: PRNG key; pred_logits (B, h, w) or (B, 1, h, w) logits at any resolution (256^2 or 1024^2);
    targets (B, 1024, 1024) or (B, 1, 1024, 1024) in [0, 1]; num_masks defaults to B; weights (B,) or None.
    -> {"bce", "dice"} scalars.
    """
    coords = uncertain_point_coords(
        key,
        pred_logits,
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
    )
    return mask_losses_at(pred_logits, targets, coords, num_masks=num_masks, weights=weights)


def stage1_loss(
    key: jax.Array, pred_low: jax.Array, pred_high: jax.Array, targets: jax.Array, **kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 1 (HR Mask Decoder): BCE + Dice of the 256^2 and of the 1024^2 prediction, all weights 1.

    key: PRNG key (each prediction gets its own points); pred_low (B, 256, 256) HQ-token logits, pred_high
    (B, 1024, 1024) HR logits (a channel axis of 1 is accepted); targets (B, 1024, 1024) in [0, 1].
    ``kwargs`` go to ``mask_losses`` (num_masks, point counts).
    -> (total, {"bce_256", "dice_256", "bce_1024", "dice_1024"}).
    """
    k_low, k_high = jax.random.split(key)
    low = mask_losses(k_low, pred_low, targets, **kwargs)
    high = mask_losses(k_high, pred_high, targets, **kwargs)
    terms = {"bce_256": low["bce"], "dice_256": low["dice"], "bce_1024": high["bce"], "dice_1024": high["dice"]}
    return sum(terms.values()), terms


def stage2_loss(
    key: jax.Array, pred_high: jax.Array, targets: jax.Array, valid: jax.Array, **kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 2 (Precise Interactor): BCE + Dice of the 1024^2 prediction, weighted by ``valid``.

    pred_high (B, 1024, 1024) logits; targets (B, 1024, 1024) in [0, 1]; valid (B,): 1 where a click could be
    simulated, 0 elsewhere (weight 0 removes the sample). -> (total, {"bce_1024", "dice_1024"}).
    """
    high = mask_losses(key, pred_high, targets, weights=valid, **kwargs)
    terms = {"bce_1024": high["bce"], "dice_1024": high["dice"]}
    return terms["bce_1024"] + terms["dice_1024"], terms


# -- SAM's own training (the SAM paper, appendix A): focal + dice at 20:1 and an MSE on the predicted IoU ----------


def sam_mask_terms(
    key: jax.Array, logits: jax.Array, targets: jax.Array, *, num_points: int = NUM_POINTS
) -> dict[str, jax.Array]:
    """Per-mask focal and Dice losses of M candidate masks per sample, at importance-sampled points.

    logits (B, M, h, w); targets (B, H, W) in [0, 1] -> {"focal", "dice"}, each (B, M), not reduced: SAM keeps
    the smallest loss over its ambiguous outputs. Each mask gets its own points (chosen on its own logits).
    """
    b, m, h, w = logits.shape
    flat = logits.reshape(b * m, h, w).astype(jnp.float32)
    coords = uncertain_point_coords(key, flat, num_points=num_points)  # (B M, P, 2)
    point_logits = point_sample(flat, coords)
    p = coords.shape[1]
    point_labels = jax.lax.stop_gradient(point_sample(_as_bhw(targets, "targets"), coords.reshape(b, m * p, 2)))
    point_labels = point_labels.reshape(b * m, p)
    return {
        "focal": focal_per_mask(point_logits, point_labels).reshape(b, m),
        "dice": dice_per_mask(point_logits, point_labels).reshape(b, m),
    }


def mask_iou(logits: jax.Array, gt: jax.Array) -> jax.Array:
    """IoU of ``logits > 0`` with ``gt > 0.5`` on the same grid: logits (B, M, h, w), gt (B, h, w) -> (B, M).

    An empty union counts as IoU 1 (both masks empty agree). Not differentiable (a target for the IoU head).
    """
    pred = logits > 0
    true = (gt > 0.5)[:, None]
    inter = (pred & true).sum(axis=(-2, -1))
    union = (pred | true).sum(axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)
