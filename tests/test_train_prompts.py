"""Training prompts drawn on the device (``training.prompts``) and the SAM / HQ-SAM stage losses' pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pisam_jax.data.pipeline import tight_box
from pisam_jax.training import losses, prompts


def random_masks(n=6, size=48, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.float32)
    for i in range(n - 1):  # the last one stays empty
        y0, x0 = rng.integers(0, size - 10, 2)
        h, w = rng.integers(2, 10, 2)
        masks[i, y0:y0 + h, x0:x0 + w] = rng.uniform(0.6, 1.0)
        masks[i, rng.integers(0, size), rng.integers(0, size)] = 1.0  # a stray pixel widens the box
    return masks


def test_tight_boxes_match_the_pipelines():
    masks = random_masks()
    boxes, found = prompts.tight_boxes(jnp.asarray(masks))
    for m, b, f in zip(masks, np.asarray(boxes), np.asarray(found)):
        want, has = tight_box((m * 255).astype(np.uint8))
        assert f == has
        np.testing.assert_array_equal(b, want)


def test_noisy_boxes_follow_sams_rule():
    box = jnp.tile(jnp.array([[100.0, 200.0, 300.0, 260.0]]), (20000, 1))  # sides 200 x 60
    out = np.asarray(prompts.noisy_boxes(jax.random.key(0), box, 1024, std=0.1, max_px=20.0))
    move = out - np.asarray(box)
    assert np.abs(move).max() <= 20.0 + 1e-4
    # x moves: N(0, 20^2) clipped at 20 px; y moves: N(0, 6^2), rarely clipped
    assert abs(move[:, 1].std() - 6.0) < 0.15 and abs(move[:, 3].std() - 6.0) < 0.15
    clipped = np.mean(np.abs(move[:, 0]) >= 20.0 - 1e-4)
    assert abs(clipped - 0.3173) < 0.02  # P(|N(0, 1)| > 1)
    near_edge = np.asarray(prompts.noisy_boxes(jax.random.key(1), jnp.array([[0.0, 0.0, 5.0, 1023.0]]), 1024))
    assert (near_edge >= 0).all() and (near_edge <= 1023).all()
    assert near_edge[0, 0] <= near_edge[0, 2] and near_edge[0, 1] <= near_edge[0, 3]


def test_draw_pixels_is_uniform_over_the_region():
    region = np.zeros((2, 8, 8), bool)
    region[0, 2, 3] = region[0, 5, 1] = region[0, 7, 7] = True  # three pixels
    rows, cols, found = prompts.draw_pixels(jax.random.key(0), jnp.asarray(region), num=6000)
    rows, cols = np.asarray(rows), np.asarray(cols)
    assert list(np.asarray(found)) == [True, False]
    assert region[0, rows[0], cols[0]].all()
    counts = np.bincount(rows[0] * 8 + cols[0], minlength=64)[[19, 41, 63]]
    assert np.abs(counts - 2000).max() < 150  # 2000 +- 3.4 sigma


def test_cell_centres_land_on_the_cell_in_the_input_frame():
    # a 4 x 4 grid over a 16 px input: cell (row 1, col 2) covers pixels 8..11 x 4..7, centre (10, 6)
    xy = np.asarray(prompts.cell_centres(jnp.array([1]), jnp.array([2]), (4, 4), 16))
    np.testing.assert_allclose(xy, [[9.5, 5.5]])  # the prompt encoder adds 0.5: (10, 6)
    xy = np.asarray(prompts.cell_centres(jnp.array([3]), jnp.array([0]), (16, 16), 16))
    np.testing.assert_allclose(xy, [[0.0, 3.0]])  # the input's own grid: pixel indices


def test_correction_points_click_the_errors():
    gt = np.zeros((3, 8, 8), np.float32)
    gt[:, 2:6, 2:6] = 1.0
    logits = np.where(gt > 0.5, 5.0, -5.0).astype(np.float32)
    logits[0, 2:6, 2:6] = -5.0  # sample 0 misses the object: a foreground click on it
    logits[1, 0, 0] = 5.0  # sample 1: one false positive pixel: a background click there
    valid = np.ones((3, 8, 8), bool)  # sample 2 is right everywhere: no click
    xy, labels = prompts.correction_points(jax.random.key(0), jnp.asarray(logits), jnp.asarray(gt), 32,
                                           jnp.asarray(valid))
    xy, labels = np.asarray(xy), np.asarray(labels)
    assert list(labels) == [prompts.FOREGROUND, prompts.BACKGROUND, prompts.EMPTY]
    col, row = (xy[0] + 0.5) / 4 - 0.5  # back to the 8 x 8 grid's cell
    assert 2 <= row <= 5 and 2 <= col <= 5 and row == int(row) and col == int(col)
    np.testing.assert_allclose(xy[1], [1.5, 1.5])  # cell (0, 0) of a 4 px grid
    # an error outside the valid (unpadded) area is never clicked
    valid[1, 0, 0] = False
    _, labels = prompts.correction_points(jax.random.key(0), jnp.asarray(logits), jnp.asarray(gt), 32,
                                          jnp.asarray(valid))
    assert int(labels[1]) == prompts.EMPTY


def test_box_corners_as_points_embed_as_the_box(tiny_sam):
    """Labels 2 and 3 give exactly the tokens of SAM's box embedding (the slot layout training relies on)."""
    from pisam_jax.models import load_model

    model = load_model(tiny_sam[2])
    pe = model.prompt_encoder
    boxes = jnp.array([[3.0, 7.0, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0]])
    corners, labels = prompts.box_slots(boxes, jnp.array([True, True]))
    pts = jnp.array([[[10.0, 12.0]], [[5.0, 60.0]]])
    want, _ = pe(points=(pts, jnp.array([[1], [0]])), boxes=boxes)
    got, _ = pe(points=(jnp.concatenate([pts, corners], 1), jnp.concatenate([jnp.array([[1], [0]]), labels], 1)),
                boxes=None)
    np.testing.assert_array_equal(np.asarray(got[:, :3]), np.asarray(want))  # + SAM's padding point at the end
    _, empty = prompts.box_slots(boxes, jnp.array([False, True]))
    assert np.asarray(empty).tolist() == [[-1, -1], [2, 3]]


def test_noisy_masks_change_only_the_boundary():
    m = np.zeros((1, 64, 64), np.float32)
    m[0, 16:48, 16:48] = 1.0
    region = np.asarray(prompts.incoherent_region(jnp.asarray(m), 8))
    assert region[0, 16, 30] and not region[0, 32, 32] and not region[0, 2, 2]
    noisy = np.asarray(prompts.noisy_masks(jax.random.key(0), jnp.asarray(m)))
    assert set(np.unique(noisy)) <= {0.0, 255.0}
    np.testing.assert_array_equal(noisy[~region], 255.0 * m[~region])
    assert (noisy[region] != 255.0 * m[region]).mean() > 0.1  # N(0, 1) moves about 31% across 0.5


def test_focal_loss_matches_torchvision():
    import torch
    from torchvision.ops import sigmoid_focal_loss

    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(4, 50)).astype(np.float32)
    t = rng.uniform(size=(4, 50)).astype(np.float32)  # soft targets, as the resized masks
    want = sigmoid_focal_loss(torch.from_numpy(x), torch.from_numpy(t), alpha=0.25, gamma=2.0, reduction="none")
    got = losses.focal_per_mask(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got), want.mean(dim=1).numpy(), rtol=2e-6)


def test_mask_iou():
    logits = np.full((1, 2, 4, 4), -1.0, np.float32)
    logits[0, 0, :2, :2] = 1.0  # 4 pixels
    gt = np.zeros((1, 4, 4), np.float32)
    gt[0, :2, :3] = 1.0  # 6 pixels, 4 shared
    iou = np.asarray(losses.mask_iou(jnp.asarray(logits), jnp.asarray(gt)))
    np.testing.assert_allclose(iou, [[4 / 6, 0.0]])
    assert float(losses.mask_iou(jnp.full((1, 1, 2, 2), -1.0), jnp.zeros((1, 2, 2)))[0, 0]) == 1.0


@pytest.mark.parametrize("multimask", [True, False])
def test_sam_round_keeps_the_smallest_loss_of_ambiguous_masks(multimask):
    from configs import miniature
    from pisam_jax.training.stages.sam import SamStage

    stage = SamStage(miniature.get_config("sam"))
    gt = np.zeros((1, 16, 16), np.float32)
    gt[0, 4:12, 4:12] = 1.0
    good = np.where(gt[0] > 0.5, 8.0, -8.0)
    masks = np.stack([-good, -good, good, np.zeros_like(good)])[None].astype(np.float32)  # mask 2 is right
    iou_pred = np.array([[0.9, 0.1, 0.2, 0.8]], np.float32)  # the IoU head prefers mask 3
    targets = jnp.asarray(np.kron(gt, np.ones((4, 4), np.float32)))  # (1, 64, 64)
    loss, parts, logits, true_iou = stage._terms(jax.random.key(0), jnp.asarray(masks), jnp.asarray(iou_pred),
                                                 targets, jnp.asarray(gt), jnp.array([multimask]))
    per_mask = losses.sam_mask_terms(jax.random.key(0), jnp.asarray(masks), targets, num_points=stage.num_points)
    mask_loss = 20 * per_mask["focal"] + per_mask["dice"]
    iou_true = np.array([0.0, 0.0, 1.0, 0.0])
    if multimask:  # the smallest loss among masks 1-3 (mask 2), the IoU head on all three, continue from mask 3
        want = float(mask_loss[0, 2]) + float(np.mean((iou_pred[0, 1:] - iou_true[1:]) ** 2))
        np.testing.assert_array_equal(np.asarray(logits), masks[:, 3])
        assert float(true_iou[0]) == 0.0
    else:  # the single mask: token 0
        want = float(mask_loss[0, 0]) + float((iou_pred[0, 0] - iou_true[0]) ** 2)
        np.testing.assert_array_equal(np.asarray(logits), masks[:, 0])
    np.testing.assert_allclose(float(loss[0]), want, rtol=1e-6)
