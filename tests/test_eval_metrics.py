"""Metrics: hand-derived cases for IoU / Boundary IoU / mBA, identity, empty masks, pysodmetrics agreement."""

import math
import warnings

import numpy as np
import py_sod_metrics as sod
import pytest

from pisam_jax.evaluation.metrics import (DIS_METRICS, METRICS, MetricSuite, boundary_dilation,
                                          boundary_iou, evaluate_pairs, iou, mask_to_boundary, mba,
                                          mba_radii)


def square(shape=(10, 10), rows=(3, 7), cols=(3, 7), value=255):
    m = np.zeros(shape, np.uint8)
    m[rows[0]:rows[1], cols[0]:cols[1]] = value
    return m


GT = square()  # 4x4 square, rows 3..6, cols 3..6, in a 10x10 image
SHIFTED = square(cols=(4, 8))  # the same square one column to the right
EMPTY = np.zeros((10, 10), np.uint8)


# ----------------------------------------------------------------------------- IoU


def test_iou_hand():
    # overlap 4 rows x 3 cols = 12; union 16 + 16 - 12 = 20
    assert iou(SHIFTED, GT) == pytest.approx(12 / 20)
    assert iou(EMPTY, GT) == 0.0
    assert iou(GT, GT) == 1.0
    assert iou(EMPTY, EMPTY) == 1.0  # defined: nothing to find, nothing found


def test_iou_thresholds_at_128():
    gt = GT.copy()
    gt[3, 3] = 128  # a soft GT pixel at 128 is background (> 128 is foreground)
    pred = GT.copy()
    pred[3, 4] = 128  # so is a prediction pixel at 128
    # gt: 15 px, pred: 15 px; they differ at (3,3) (pred fg, gt bg) and (3,4) (gt fg, pred bg)
    # intersection 14, union 16
    assert iou(pred, gt) == pytest.approx(14 / 16)
    assert iou(GT > 0, GT) == 1.0  # bool accepted


# ----------------------------------------------------------------------------- Boundary IoU


def test_boundary_dilation_rounding():
    assert boundary_dilation((15, 20)) == 1  # diag 25: 0.5 rounds (half to even) to 0 -> at least 1
    assert boundary_dilation((30, 40)) == 1  # diag 50: 1.0
    assert boundary_dilation((75, 100)) == 2  # diag 125: 2.5 rounds half to even -> 2 (as Python's round)
    assert boundary_dilation((90, 120)) == 3  # diag 150: 3.0
    assert boundary_dilation((1500, 2000)) == 50  # diag 2500


def test_mask_to_boundary_hand():
    # d = 1 on 10x10: the 4x4 square loses its 2x2 interior -> a 12-pixel ring
    b = mask_to_boundary(GT > 0)
    expected = np.zeros((10, 10), bool)
    expected[3:7, 3:7] = True
    expected[4:6, 4:6] = False
    np.testing.assert_array_equal(b, expected)
    # a full image: the border counts as outside (1-px zero padding) -> the 36-pixel frame
    full = np.ones((10, 10), bool)
    assert mask_to_boundary(full).sum() == 10 * 4 - 4
    # d = 2 on 75x100: a 10x10 square keeps only its 6x6 core -> 100 - 36 = 64 boundary pixels
    m = np.zeros((75, 100), bool)
    m[20:30, 20:30] = True
    assert mask_to_boundary(m).sum() == 64


def test_boundary_iou_hand():
    # GT ring: rows 3 and 6 at cols 3..6, cols 3 and 6 at rows 4..5 (12 px).
    # Shifted ring: rows 3 and 6 at cols 4..7, cols 4 and 7 at rows 4..5 (12 px).
    # Common: rows 3 and 6 at cols 4..6 = 6 px; union 12 + 12 - 6 = 18
    assert boundary_iou(SHIFTED, GT) == pytest.approx(6 / 18)
    assert boundary_iou(EMPTY, GT) == 0.0  # empty prediction boundary: 0 / 12
    assert boundary_iou(GT, GT) == 1.0
    assert boundary_iou(EMPTY, EMPTY) == 1.0  # defined: both boundaries empty
    # full-image GT (frame of 36) vs a prediction one pixel inside the border (its ring of 28): disjoint
    inner = np.zeros((10, 10), np.uint8)
    inner[1:9, 1:9] = 255
    full = np.full((10, 10), 255, np.uint8)
    assert boundary_iou(inner, full) == 0.0
    assert iou(inner, full) == pytest.approx(64 / 100)


# ----------------------------------------------------------------------------- mBA


def test_mba_radii():
    assert mba_radii((10, 10)) == [1, 1, 1, 1, 1]  # max_r = 20/300 < 1: int() truncates toward 0
    # max_r = 1500/300 = 5; steps (5-1)/5 = 0.8: 1+int(0), 1+int(.8), 1+int(1.6), 1+int(2.4), 1+int(3.2)
    assert mba_radii((600, 900)) == [1, 1, 2, 3, 4]


def test_mba_hand():
    # radius 1: the ellipse kernel is the 3x3 cross. Dilating the 4x4 square by it adds 4 pixels
    # on each side (32 px); eroding leaves the 2x2 core (4 px): the band has 32 - 4 = 28 pixels,
    # 12 inside the square (gt 1) and 16 outside (gt 0).
    # Empty prediction: right on the 16 outside, wrong on the 12 inside -> 16/28 = 4/7.
    assert mba(EMPTY, GT) == pytest.approx(4 / 7)
    # Shifted prediction (cols 4..7): inside, wrong only on column 3 (rows 3..6: 4 px) -> 8 right;
    # outside, wrong only on column 7 (rows 3..6: 4 px, now predicted) -> 12 right. (8 + 12)/28 = 5/7.
    assert mba(SHIFTED, GT) == pytest.approx(5 / 7)
    assert mba(GT, GT) == 1.0


def test_mba_image_border_is_not_boundary_and_empty_band_is_nan():
    full = np.full((10, 10), 255, np.uint8)
    assert math.isnan(mba(full, full))  # uniform GT: no gradient anywhere (border ignored)
    assert math.isnan(mba(EMPTY, EMPTY))
    # GT = left half (cols 0..4) of a 10x10 image: the band is cols 4 and 5 only (cross kernel,
    # border ignored) = 20 px. A prediction of cols 0..3 is wrong on column 4 -> 10/20.
    half = np.zeros((10, 10), np.uint8)
    half[:, :5] = 255
    pred = np.zeros((10, 10), np.uint8)
    pred[:, :4] = 255
    assert mba(pred, half) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- suite


def test_identity():
    gt = square((64, 64), (10, 40), (20, 50))
    suite = MetricSuite(METRICS)
    suite.update(gt, gt, "a")
    r = suite.results()
    assert r["iou"] == 1.0 and r["boundary_iou"] == 1.0 and r["mba"] == 1.0
    assert r["mae"] == 0.0 and r["hce"] == 0.0
    assert r["max_f"] == pytest.approx(1.0) and r["weighted_f"] == pytest.approx(1.0)
    assert r["s_measure"] == pytest.approx(1.0)
    # pysodmetrics divides the E-measure's aligned sum by (N - 1) (MATLAB compatibility):
    # a perfect prediction scores N / (N - 1) at every threshold where it equals the GT.
    n = 64 * 64
    assert r["max_e"] == pytest.approx(n / (n - 1))
    assert r["num_images"] == 1


def test_empty_masks_in_suite():
    suite = MetricSuite(("iou", "boundary_iou", "mba", "mae"))
    suite.update(EMPTY, EMPTY, "empty")
    suite.update(EMPTY, GT, "missed")
    r = suite.results()
    assert r["iou"] == pytest.approx((1.0 + 0.0) / 2)
    assert r["boundary_iou"] == pytest.approx((1.0 + 0.0) / 2)
    assert r["mba"] == pytest.approx(4 / 7)  # the empty image's mBA is undefined and skipped
    assert r["num_mba_undefined"] == 1
    assert r["mae"] == pytest.approx((0 + 16 / 100) / 2)


def _random_pairs(seed=0, n=3, shape=(48, 64)):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        gt = np.zeros(shape, np.uint8)
        r0, c0 = rng.integers(2, 15, 2)
        gt[r0:r0 + 25, c0:c0 + 30] = 255
        gt[rng.random(shape) < 0.02] = 255
        soft = np.clip(gt.astype(np.float64) + rng.normal(0, 60, shape), 0, 255).astype(np.uint8)
        binary = np.where(soft > 128, 255, 0).astype(np.uint8)
        pairs.append((f"im{i}", soft if i % 2 else binary, gt))
    return pairs


def test_agrees_with_pysodmetrics():
    pairs = _random_pairs()
    suite = evaluate_pairs(pairs, METRICS)
    r = suite.results()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = sod.Fmeasure()
    wfm, mae, sm, em, hce = (sod.WeightedFmeasure(), sod.MAE(), sod.Smeasure(), sod.Emeasure(),
                             sod.HumanCorrectionEffortMeasure(relax=5, epsilon=2.0))
    for _, p, g in pairs:
        for m in (fm, wfm, mae, sm, em, hce):
            m.step(pred=p, gt=g)
    assert r["max_f"] == pytest.approx(fm.get_results()["fm"]["curve"].max(), abs=1e-12)
    assert r["mean_f"] == pytest.approx(fm.get_results()["fm"]["curve"].mean(), abs=1e-12)
    assert r["weighted_f"] == pytest.approx(wfm.get_results()["wfm"], abs=1e-12)
    assert r["mae"] == pytest.approx(mae.get_results()["mae"], abs=1e-12)
    assert r["s_measure"] == pytest.approx(sm.get_results()["sm"], abs=1e-12)
    assert r["mean_e"] == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=1e-12)
    assert r["max_e"] == pytest.approx(em.get_results()["em"]["curve"].max(), abs=1e-12)
    assert r["hce"] == pytest.approx(hce.get_results()["hce"], abs=1e-12)
    # max F is the max of the mean curve, not the mean of per-image maxima
    curves = np.array(fm.changeable_fms)
    assert r["max_f"] == pytest.approx(curves.mean(0).max())
    assert r["max_f"] <= np.mean(curves.max(1)) + 1e-12
    # per-image records: the image's own curve max and mean IoU
    assert [x["name"] for x in suite.per_image] == ["im0", "im1", "im2"]
    assert suite.per_image[1]["max_f"] == pytest.approx(curves[1].max())
    assert r["iou"] == pytest.approx(np.mean([iou(p, g) for _, p, g in pairs]))


def test_worst_and_errors():
    suite = MetricSuite(("iou", "mae"))
    suite.update(GT, GT, "perfect")
    suite.update(SHIFTED, GT, "shifted")
    suite.update(EMPTY, GT, "empty")
    assert [r["name"] for r in suite.worst("iou", 2)] == ["empty", "shifted"]
    assert [r["name"] for r in suite.worst("mae", 1)] == ["empty"]  # lower is better: highest first
    with pytest.raises(ValueError, match="shape"):
        suite.update(GT, np.zeros((5, 5), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        suite.update(GT.astype(np.float32), GT)
    with pytest.raises(ValueError, match="unknown metric"):
        MetricSuite(("iou", "dice"))
    with pytest.raises(ValueError, match="before any update"):
        MetricSuite(DIS_METRICS).results()
