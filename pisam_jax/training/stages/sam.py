"""Training SAM itself, as the SAM paper trains it (Kirillov et al. 2023, appendix A "Training algorithm").

Kept from the paper:

  * the first prompt is, with equal probability, a box (the ground truth's tight box with noise of standard
    deviation 10% of its side, at most 20 px, per coordinate) or one foreground point drawn uniformly from the
    mask;
  * then ``click_rounds`` rounds each add a point drawn uniformly from the error region of the previous mask
    (foreground where it missed the object, background on a false positive), and ``mask_rounds`` rounds add
    nothing: one at the end, the others at random places among the clicks (the paper: 8 and 2, 11 rounds);
  * every round after the first also gets the previous round's mask logits as the mask prompt (unthresholded,
    not differentiated);
  * an ambiguous prompt (one point alone) gets SAM's three masks and only the smallest loss trains; every other
    prompt gets the single mask; the next round continues from the mask with the highest predicted IoU;
  * loss: 20 x focal + 1 x Dice on the masks, plus the mean squared error between each supervised mask's
    predicted IoU and its IoU with the ground truth, with weight 1.

Simplified:

  * the mask losses are taken at importance-sampled points (the Mask2Former/HQ-SAM sampling Pi-SAM uses,
    ``config.num_points``), not on every pixel; the IoU target and the error regions are on the low-resolution
    grid of the masks (256^2 at 1024 input), clicks at the centre of the chosen cell;
  * a box and points share one static layout of point slots (``training.prompts``): a sample prompted by a
    point carries two empty corner slots, and slots not yet clicked are empty ("not a point" tokens);
  * the loss is the mean over rounds; one sample of the batch is one mask (no several masks per image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pisam_jax.training import losses, prompts
from pisam_jax.training.stages.base import Stage, image_features, resize_to, targets_of


def decode_all(model, features, coords, labels, mask_input):
    """SAM's decoder with every mask token: -> masks (B, 4, h, w) logits, predicted IoU (B, 4).

    coords (B, N, 2), labels (B, N) point slots (``training.prompts``); mask_input (B, h, w) logits or None.
    """
    masks = None if mask_input is None else mask_input[..., None]
    sparse, dense = model.prompt_encoder(points=(coords, labels), masks=masks)
    return model.mask_decoder.predict_masks(
        features.embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense
    )[:2]


def valid_cells(input_size: jax.Array, grid: tuple[int, int], size: int) -> jax.Array:
    """(B, h, w) bool: the cells of the low-res grid whose centre lies in the unpadded image (B, 2) = (h, w) px."""
    h, w = grid
    rows = (jnp.arange(h) + 0.5) * (size / h)
    cols = (jnp.arange(w) + 0.5) * (size / w)
    return (rows[None, :, None] < input_size[:, 0, None, None]) & (cols[None, None, :] < input_size[:, 1, None, None])


class SamStage(Stage):
    """SAM's prompt encoder and mask decoder (and its image encoder, from scratch) on sampled prompts."""

    name = "sam"
    decoder = "sam"

    def __init__(self, config):
        super().__init__(config)
        c = config.sam
        if c.click_rounds < 0 or c.mask_rounds < 0:
            raise ValueError(f"config.sam.click_rounds and mask_rounds must be >= 0, got {c.click_rounds}, "
                             f"{c.mask_rounds}")
        self.click_rounds, self.mask_rounds = int(c.click_rounds), int(c.mask_rounds)
        self.box_prob, self.box_noise, self.box_noise_max = float(c.box_prob), float(c.box_noise), c.box_noise_max
        self.weights = (float(c.focal_weight), float(c.dice_weight), float(c.iou_weight))
        self.num_points = int(config.num_points)

    def _round_schedule(self, key) -> jax.Array:
        """(R,) bool, True for the rounds after the first that add a click (SAM's placement of the others)."""
        middle = jnp.array([True] * self.click_rounds + [False] * max(self.mask_rounds - 1, 0))
        middle = jax.random.permutation(key, middle) if middle.size else middle
        return jnp.concatenate([middle, jnp.array([False] * min(self.mask_rounds, 1), bool)])

    def _terms(self, key, masks, iou_pred, targets, gt_low, multimask):
        """One round's per-sample loss and the mask to continue from.

        masks (B, M, h, w), iou_pred (B, M) for the M masks computed (4, or 1 = mask 0 only); multimask (B,) bool
        (only with M = 4). -> (loss (B,), its parts, chosen logits (B, h, w), the chosen mask's true IoU (B,)).
        """
        fw, dw, iw = self.weights
        t = losses.sam_mask_terms(key, masks, targets, num_points=self.num_points)
        true_iou = losses.mask_iou(jax.lax.stop_gradient(masks), gt_low)
        mask_loss = fw * t["focal"] + dw * t["dice"]
        iou_err = (iou_pred - true_iou) ** 2
        single = (mask_loss[:, 0], t["focal"][:, 0], t["dice"][:, 0], iou_err[:, 0])
        chosen = jnp.zeros(masks.shape[0], jnp.int32)
        if masks.shape[1] > 1:  # the three ambiguity masks: the smallest loss, the best predicted IoU
            best = jnp.argmin(mask_loss[:, 1:], axis=1)[:, None] + 1
            pick = lambda x: jnp.take_along_axis(x, best, axis=1)[:, 0]  # noqa: E731
            multi = (pick(mask_loss), pick(t["focal"]), pick(t["dice"]), iou_err[:, 1:].mean(axis=1))
            single = tuple(jnp.where(multimask, m, s) for m, s in zip(multi, single))
            chosen = jnp.where(multimask, jnp.argmax(iou_pred[:, 1:], axis=1) + 1, 0)
        loss = single[0] + iw * single[3]
        logits = jnp.take_along_axis(masks, chosen[:, None, None, None], axis=1)[:, 0]
        iou = jnp.take_along_axis(true_iou, chosen[:, None], axis=1)[:, 0]
        return loss, dict(focal=single[1], dice=single[2], iou_mse=single[3]), jax.lax.stop_gradient(logits), iou

    def loss(self, model, batch, key):
        features = image_features(model, batch)
        targets = targets_of(batch)
        b, size = targets.shape[0], targets.shape[-1]
        grid = model.prompt_encoder.mask_input_size
        gt_low = resize_to(targets, grid)
        valid = valid_cells(batch["input_size"], grid, size)
        k_box, k_noise, k_point, k_sched, k_first, k_rounds = jax.random.split(key, 6)

        # The first prompt: a noisy box or one foreground point.
        use_box = jax.random.bernoulli(k_box, self.box_prob, (b,))
        boxes = prompts.noisy_boxes(k_noise, batch["box"], size, std=self.box_noise, max_px=self.box_noise_max)
        rows, cols, found = prompts.draw_pixels(k_point, targets > 0.5)
        n = 1 + self.click_rounds
        first = prompts.cell_centres(rows[:, 0], cols[:, 0], (size, size), size)
        coords = jnp.zeros((b, n, 2), jnp.float32).at[:, 0].set(first)
        labels = jnp.full((b, n), prompts.EMPTY, jnp.int32).at[:, 0].set(
            jnp.where(use_box | ~found, prompts.EMPTY, prompts.FOREGROUND))
        corners, corner_labels = prompts.box_slots(boxes, use_box)
        coords = jnp.concatenate([coords, corners], axis=1)
        labels = jnp.concatenate([labels, corner_labels], axis=1)

        masks, iou_pred = decode_all(model, features, coords, labels, None)
        loss0, parts0, logits, iou0 = self._terms(k_first, masks, iou_pred, targets, gt_low, ~use_box)

        def round_(carry, inputs):
            coords, labels, logits, slot = carry
            key, adds_click = inputs
            k_click, k_loss = jax.random.split(key)
            xy, lab = prompts.correction_points(k_click, logits, gt_low, size, valid)
            # a round without a click leaves the slot as it is (empty, or the last click once all are given)
            xy = jnp.where(adds_click, xy, jax.lax.dynamic_index_in_dim(coords, slot, axis=1, keepdims=False))
            lab = jnp.where(adds_click, lab, jax.lax.dynamic_index_in_dim(labels, slot, axis=1, keepdims=False))
            coords = jax.lax.dynamic_update_slice_in_dim(coords, xy[:, None], slot, axis=1)
            labels = jax.lax.dynamic_update_slice_in_dim(labels, lab[:, None], slot, axis=1)
            masks, iou_pred = decode_all(model, features, coords, labels, logits)
            loss, parts, logits, iou = self._terms(k_loss, masks[:, :1], iou_pred[:, :1], targets, gt_low, None)
            slot = jnp.minimum(slot + adds_click.astype(jnp.int32), n - 1)
            return (coords, labels, logits, slot), (loss, parts, iou)

        schedule = self._round_schedule(k_sched)
        round_losses, parts, last_iou = loss0[None], {k: v[None] for k, v in parts0.items()}, iou0
        if schedule.shape[0]:
            keys = jax.random.split(k_rounds, schedule.shape[0])
            carry = (coords, labels, logits, jnp.int32(1))
            _, (loss_r, parts_r, iou_r) = jax.lax.scan(round_, carry, (keys, schedule))
            round_losses = jnp.concatenate([round_losses, loss_r])
            parts = {k: jnp.concatenate([parts[k], parts_r[k]]) for k in parts}
            last_iou = iou_r[-1]
        # the mean over rounds, then over the batch weighted by has_object
        weights = batch["has_object"].astype(jnp.float32)
        reduce = lambda x: losses.reduce_masks(x, b, weights)  # noqa: E731
        terms = {k: reduce(v.mean(axis=0)) for k, v in parts.items()}
        terms.update(iou_first=reduce(iou0), iou_last=reduce(last_iou))
        return reduce(round_losses.mean(axis=0)), terms
