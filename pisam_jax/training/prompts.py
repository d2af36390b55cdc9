"""Prompts drawn from the ground truth on the device, for training SAM and HQ-SAM (pure, jit-able).

SAM's prompt encoder embeds a box as its two corners with the corner embeddings ``point_embeddings[2]`` and
``[3]``; here a box is given the same way, as two points labelled 2 and 3 (SAM 2's convention, identical
tokens). Every prompt of a batch is then one array of point slots with labels

    1 foreground, 0 background, 2 / 3 box corners (x0, y0) / (x1, y1), -1 empty ("not a point"),

so that samples prompted by a box, by points or by nothing share one static shape under ``jit``. Coordinates are
(x, y) in the model's input frame in SAM's pixel-index convention (the prompt encoder adds the half pixel).

A point drawn on a grid coarser than the input (an error region of a 256^2 prediction, say) is placed at the
centre of its cell in the input frame, so that the prompt encoder sees it where the cell is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EMPTY, BACKGROUND, FOREGROUND, CORNER0, CORNER1 = -1, 0, 1, 2, 3


def tight_boxes(masks: jax.Array, threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """(x0, y0, x1, y1) pixel indices of ``masks > threshold`` (the last pixel, no +1), and whether any pixel is set.

    masks (B, H, W) -> boxes (B, 4) float32, found (B,) bool; without foreground the box is the whole frame.
    """
    fg = masks > threshold
    _, h, w = fg.shape
    rows, cols = fg.any(axis=2), fg.any(axis=1)

    def first_last(any_, n):
        idx = jnp.arange(n)
        first = jnp.min(jnp.where(any_, idx, n), axis=1)
        last = jnp.max(jnp.where(any_, idx, -1), axis=1)
        return first, last

    y0, y1 = first_last(rows, h)
    x0, x1 = first_last(cols, w)
    found = rows.any(axis=1)
    whole = jnp.array([0, 0, w - 1, h - 1])
    boxes = jnp.where(found[:, None], jnp.stack([x0, y0, x1, y1], axis=1), whole)
    return boxes.astype(jnp.float32), found


def noisy_boxes(key: jax.Array, boxes: jax.Array, size: int, *, std: float = 0.1, max_px: float = 20.0) -> jax.Array:
    """SAM's training boxes: each coordinate moved by N(0, (std * side)^2), the move clipped to +-``max_px``.

    boxes (B, 4) (x0, y0, x1, y1) -> (B, 4), kept inside [0, size - 1] and ordered (x0 <= x1, y0 <= y1).
    """
    side = jnp.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    move = jnp.clip(jax.random.normal(key, boxes.shape) * std * side, -max_px, max_px)
    moved = jnp.clip(boxes + move, 0.0, size - 1.0)
    lo, hi = jnp.minimum(moved[:, :2], moved[:, 2:]), jnp.maximum(moved[:, :2], moved[:, 2:])
    return jnp.concatenate([lo, hi], axis=1)


def draw_pixels(key: jax.Array, region: jax.Array, num: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``num`` pixels drawn uniformly (with replacement) from each bool map.

    region (B, h, w) -> rows (B, num), cols (B, num) int32, found (B,) (False where the region is empty: the
    indices are then meaningless, give the slot label -1).
    """
    b, h, w = region.shape
    # Gumbel-max over the region's pixels: a uniform draw with no normalisation and no data-dependent shape.
    gumbel = jax.random.gumbel(key, (b, num, h * w))
    idx = jnp.argmax(jnp.where(region.reshape(b, 1, h * w), gumbel, -jnp.inf), axis=-1)
    rows, cols = jnp.divmod(idx, w)
    return rows.astype(jnp.int32), cols.astype(jnp.int32), region.any(axis=(1, 2))


def cell_centres(rows: jax.Array, cols: jax.Array, grid: tuple[int, int], size: int) -> jax.Array:
    """Cells (rows, cols) of an h x w grid covering the size x size input -> (..., 2) input-frame points (x, y)
    at the cell centres, in SAM's pixel-index convention (the prompt encoder adds the half pixel)."""
    h, w = grid
    xy = jnp.stack([cols, rows], axis=-1).astype(jnp.float32) + 0.5
    return xy * jnp.array([size / w, size / h], jnp.float32) - 0.5


def correction_points(
    key: jax.Array, low_res_logits: jax.Array, gt_low: jax.Array, size: int, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """SAM's next training click: a pixel drawn uniformly from the error region of the previous mask.

    low_res_logits (B, h, w); gt_low (B, h, w) in [0, 1] (the target on the same grid, > 0.5 is foreground);
    valid (B, h, w) bool, where clicks may land (the unpadded image), or None.
    -> coords (B, 2), labels (B,): 1 on missed foreground, 0 on a false positive, -1 when nothing is wrong.
    """
    gt = gt_low > 0.5
    error = (low_res_logits > 0) != gt
    if valid is not None:
        error = error & valid
    rows, cols, found = draw_pixels(key, error)
    rows, cols = rows[:, 0], cols[:, 0]
    missed = gt[jnp.arange(gt.shape[0]), rows, cols]
    labels = jnp.where(found, jnp.where(missed, FOREGROUND, BACKGROUND), EMPTY)
    return cell_centres(rows, cols, gt.shape[1:], size), labels.astype(jnp.int32)


def box_slots(boxes: jax.Array, use: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Boxes (B, 4) as two corner slots: coords (B, 2, 2), labels (B, 2) = (2, 3) where ``use``, else -1."""
    labels = jnp.where(use[:, None], jnp.array([CORNER0, CORNER1]), EMPTY)
    return boxes.reshape(-1, 2, 2), labels.astype(jnp.int32)


def incoherent_region(masks: jax.Array, factor: int = 8) -> jax.Array:
    """Where a mask differs from itself down- and up-sampled by ``factor`` (HQ-SAM's ``get_incoherent_mask``).

    masks (B, h, w) in [0, 1] -> bool (B, h, w): the pixels near the mask's boundary and thin parts.
    """
    b, h, w = masks.shape
    small = jax.image.resize(masks, (b, h // factor, w // factor), "linear", antialias=False)
    recovered = jax.image.resize(small, (b, h, w), "linear", antialias=False)
    return jnp.abs(masks - recovered) >= 0.01


def noisy_masks(key: jax.Array, masks: jax.Array) -> jax.Array:
    """HQ-SAM's noisy mask prompt (``misc.masks_noise``): the target with unit Gaussian noise added near its
    boundary, thresholded at 0.5. masks (B, h, w) in [0, 1] -> (B, h, w) in {0, 255}, given to the prompt encoder
    as the mask input, as HQ-SAM does."""
    noise = jax.random.normal(key, masks.shape) * incoherent_region(masks)
    return jnp.where(masks + noise > 0.5, 255.0, 0.0)
