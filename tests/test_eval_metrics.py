"""Metrics against their published definitions, on worked examples whose answers are derived by hand here.

* IoU, Boundary IoU and mBA: exact fractions for small masks, and the same numbers from independent
  implementations written in this file from the definitions, built differently from ``metrics.py``:
  Boundary IoU (Cheng et al. 2021; boundary-iou-api ``mask_to_boundary``, dilation ratio 0.02) as "mask pixels
  within Chebyshev distance d of a pixel outside the mask, the outside of the image counting as outside"
  (separable window minima instead of iterated erosion); mBA (CascadePSP ``compute_boundary_acc``) with the
  morphological gradient of OpenCV's ellipse of radius r built from its row half-widths round(sqrt(r^2 - dy^2))
  (shifted copies instead of ``cv2.morphologyEx``; the image border is ignored, as OpenCV's morphology does).
* The pysodmetrics-backed metrics of ``MetricSuite``: values derived by hand from the F-measure (beta^2 = 0.3),
  MAE, S-measure (alpha = 0.5) and E-measure definitions and the toolkit's 256-threshold curves, including the
  dataset accumulation (max F = the max of the mean curve, not the mean of the per-image maxima).
"""

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from pisam_jax.evaluation.metrics import (DIS_METRICS, METRICS, MetricSuite, boundary_dilation,
                                          boundary_iou, iou, mask_to_boundary, mba, mba_radii)


def square(shape=(10, 10), rows=(3, 7), cols=(3, 7), value=255):
    m = np.zeros(shape, np.uint8)
    m[rows[0]:rows[1], cols[0]:cols[1]] = value
    return m


GT = square()  # 4x4 square, rows 3..6, cols 3..6, in a 10x10 image
SHIFTED = square(cols=(4, 8))  # the same square one column to the right
EMPTY = np.zeros((10, 10), np.uint8)


# ----------------------------------------------------------------------------- independent implementations


def ref_boundary(mask: np.ndarray, ratio: float = 0.02) -> np.ndarray:
    """Boundary IoU's G_d: pixels of the mask within Chebyshev distance d of a pixel outside it (the outside of
    the image counts as outside), d = max(1, round(ratio * diagonal)) (Python's round, as boundary-iou-api)."""
    m = np.asarray(mask) > 128 if np.asarray(mask).dtype == np.uint8 else np.asarray(mask, bool)
    h, w = m.shape
    d = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
    padded = np.pad(m, d, constant_values=False)
    # "the whole (2d+1)^2 square around p is inside": one window minimum along rows, then along columns
    inside = sliding_window_view(padded, 2 * d + 1, axis=0).all(axis=-1)
    inside = sliding_window_view(inside, 2 * d + 1, axis=1).all(axis=-1)
    return m & ~inside


def ref_boundary_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = ref_boundary(pred), ref_boundary(gt)
    return np.count_nonzero(p & g) / np.count_nonzero(p | g)


def ellipse_offsets(r: int) -> list[tuple[int, int]]:
    """OpenCV's MORPH_ELLIPSE of size 2r+1 as (dy, dx) offsets: row dy spans |dx| <= round(sqrt(r^2 - dy^2))."""
    return [(dy, dx) for dy in range(-r, r + 1)
            for dx in range(-round(math.sqrt(r * r - dy * dy)), round(math.sqrt(r * r - dy * dy)) + 1)]


def shifted(m: np.ndarray, dy: int, dx: int, outside: bool) -> np.ndarray:
    """out[y, x] = m[y + dy, x + dx], ``outside`` where that falls outside the image."""
    h, w = m.shape
    big = np.full((h + 2 * abs(dy), w + 2 * abs(dx)), outside)
    big[abs(dy):abs(dy) + h, abs(dx):abs(dx) + w] = m
    return big[abs(dy) + dy:abs(dy) + dy + h, abs(dx) + dx:abs(dx) + dx + w]


def ref_mba(pred: np.ndarray, gt: np.ndarray) -> float:
    """CascadePSP's mBA: for r_i = 1 + int((max_r - 1) / 5 * i), max_r = (H + W) / 300, the accuracy of the
    prediction in the band dilate(G, ellipse r) minus erode(G, ellipse r), averaged over i = 0..4."""
    p, g = pred > 128, gt > 128
    h, w = g.shape
    max_r = (h + w) / 300
    accs = []
    for i in range(5):
        r = 1 + int((max_r - 1) / 5 * i)
        offsets = ellipse_offsets(r)
        dilated = np.any([shifted(g, dy, dx, False) for dy, dx in offsets], axis=0)
        eroded = np.all([shifted(g, dy, dx, True) for dy, dx in offsets], axis=0)
        band = dilated & ~eroded
        accs.append(np.count_nonzero(p[band] == g[band]) / np.count_nonzero(band))
    return float(np.mean(accs))


def test_ellipse_offsets_are_opencvs_kernel():
    """The test's own kernel is the one CascadePSP uses (so the worked examples below use the right band)."""
    import cv2

    for r in range(1, 8):
        k = np.zeros((2 * r + 1, 2 * r + 1), np.uint8)
        for dy, dx in ellipse_offsets(r):
            k[dy + r, dx + r] = 1
        np.testing.assert_array_equal(k, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))


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
    assert boundary_dilation((600, 900)) == 22  # diag 1081.67: 21.63
    assert boundary_dilation((1500, 2000)) == 50  # diag 2500


def test_mask_to_boundary_hand():
    # d = 1 on 10x10: the 4x4 square loses its 2x2 interior -> a 12-pixel ring
    b = mask_to_boundary(GT > 0)
    expected = np.zeros((10, 10), bool)
    expected[3:7, 3:7] = True
    expected[4:6, 4:6] = False
    np.testing.assert_array_equal(b, expected)
    np.testing.assert_array_equal(ref_boundary(GT), expected)
    # a full image: the border counts as outside (1-px zero padding) -> the 36-pixel frame
    full = np.ones((10, 10), bool)
    assert mask_to_boundary(full).sum() == ref_boundary(full).sum() == 10 * 4 - 4
    # d = 2 on 75x100: a 10x10 square keeps only its 6x6 core -> 100 - 36 = 64 boundary pixels
    m = np.zeros((75, 100), bool)
    m[20:30, 20:30] = True
    assert mask_to_boundary(m).sum() == ref_boundary(m).sum() == 64


def test_boundary_iou_hand():
    # GT ring: rows 3 and 6 at cols 3..6, cols 3 and 6 at rows 4..5 (12 px).
    # Shifted ring: rows 3 and 6 at cols 4..7, cols 4 and 7 at rows 4..5 (12 px).
    # Common: rows 3 and 6 at cols 4..6 = 6 px; union 12 + 12 - 6 = 18
    assert boundary_iou(SHIFTED, GT) == pytest.approx(6 / 18)
    assert ref_boundary_iou(SHIFTED, GT) == pytest.approx(6 / 18)
    assert boundary_iou(EMPTY, GT) == 0.0  # empty prediction boundary: 0 / 12
    assert boundary_iou(GT, GT) == 1.0
    assert boundary_iou(EMPTY, EMPTY) == 1.0  # defined: both boundaries empty
    # full-image GT (frame of 36) vs a prediction one pixel inside the border (its ring of 28): disjoint
    inner = np.zeros((10, 10), np.uint8)
    inner[1:9, 1:9] = 255
    full = np.full((10, 10), 255, np.uint8)
    assert boundary_iou(inner, full) == ref_boundary_iou(inner, full) == 0.0
    assert iou(inner, full) == pytest.approx(64 / 100)


def _rect(shape, rows, cols):
    return square(shape, rows, cols)


@pytest.mark.parametrize("gt_rc,pred_rc,expected", [
    # 600x900: d = 22. A 200x300 rectangle's ring is 60000 - 156*256 = 20064 px. Shifted 10 columns right,
    # ring & ring' = |R&R'| - |R&I'| - |I&R'| + |I&I'| = 200*290 - 156*256 - 156*256 + 156*246 = 16504;
    # union = 2*20064 - 16504 = 23624.
    (((200, 400), (300, 600)), ((200, 400), (310, 610)), 16504 / 23624),
    # The same rectangle in the top-left corner, touching the border: the border counts as outside, so the
    # ring is still 20064 px (inner rows 22..177, cols 22..277). Shifted 10 rows down:
    # 190*300 - 156*256 - 156*256 + 146*256 = 14504; union 2*20064 - 14504 = 25624.
    (((0, 200), (0, 300)), ((10, 210), (0, 300)), 14504 / 25624),
])
def test_boundary_iou_worked_examples(gt_rc, pred_rc, expected):
    gt, pred = _rect((600, 900), *gt_rc), _rect((600, 900), *pred_rc)
    assert mask_to_boundary(gt > 128).sum() == ref_boundary(gt).sum() == 20064
    assert boundary_iou(pred, gt) == pytest.approx(expected, rel=1e-12)
    assert ref_boundary_iou(pred, gt) == pytest.approx(expected, rel=1e-12)


def test_boundary_iou_agrees_with_the_definition_on_random_shapes():
    rng = np.random.default_rng(0)
    for shape in [(64, 48), (120, 200), (333, 250)]:
        for _ in range(3):
            masks = []
            for _ in range(2):
                m = np.zeros(shape, np.uint8)
                for _ in range(4):  # rectangles, some touching the border, some thin
                    r0, c0 = rng.integers(-5, shape[0] - 3), rng.integers(-5, shape[1] - 3)
                    m[max(r0, 0):r0 + rng.integers(1, shape[0] // 2), max(c0, 0):c0 + rng.integers(1, shape[1] // 2)] = 255
                masks.append(m)
            np.testing.assert_array_equal(mask_to_boundary(masks[0] > 128), ref_boundary(masks[0]))
            assert boundary_iou(*masks) == pytest.approx(ref_boundary_iou(*masks), rel=1e-12)


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
    assert mba(EMPTY, GT) == pytest.approx(4 / 7) and ref_mba(EMPTY, GT) == pytest.approx(4 / 7)
    # Shifted prediction (cols 4..7): inside, wrong only on column 3 (rows 3..6: 4 px) -> 8 right;
    # outside, wrong only on column 7 (rows 3..6: 4 px, now predicted) -> 12 right. (8 + 12)/28 = 5/7.
    assert mba(SHIFTED, GT) == pytest.approx(5 / 7) and ref_mba(SHIFTED, GT) == pytest.approx(5 / 7)
    assert mba(GT, GT) == 1.0


# A b x a = 200 x 300 rectangle (rows 200..399, cols 300..599) in a 600 x 900 image: radii 1, 1, 2, 3, 4. With
# the ellipse's row half-widths w(k) (r=1: 1,0; r=2: 2,2,0; r=3: 3,3,2,0; r=4: 4,4,3,3,0), the dilation has
# b(a + 2r) + 2 * sum_{k=1..r} (a + 2 w(k)) pixels and the erosion (a - 2r)(b - 2r):
#   r=1: 61000 - 59004 = 1996 band pixels, 1000 outside the rectangle, 996 inside;
#   r=2: 62008 - 58016 = 3992 (2008 outside); r=3: 63020 - 57036 = 5984 (3020); r=4: 64040 - 56064 = 7976 (4040).
BANDS = {1: (1996, 1000), 2: (3992, 2008), 3: (5984, 3020), 4: (7976, 4040)}
RADII = [1, 1, 2, 3, 4]
RECT = _rect((600, 900), (200, 400), (300, 600))


@pytest.mark.parametrize("pred,expected", [
    # empty prediction: right exactly on the band's outside part
    (np.zeros((600, 900), np.uint8), np.mean([BANDS[r][1] / BANDS[r][0] for r in RADII])),
    # the rectangle less its 1-px rim (60000 - 198 * 298 = 996 px, inside every band): wrong there only
    (_rect((600, 900), (201, 399), (301, 599)), np.mean([1 - 996 / BANDS[r][0] for r in RADII])),
    (RECT, 1.0),
])
def test_mba_worked_examples(pred, expected):
    assert mba(pred, RECT) == pytest.approx(expected, rel=1e-12)
    assert ref_mba(pred, RECT) == pytest.approx(expected, rel=1e-12)


def test_mba_ignores_the_image_border():
    """GT = the left half (cols 0..449) of a 600 x 900 image: the band is only along its right edge (the image
    border is not boundary), 600 r px on each side; a prediction one column short is wrong on 600 of them:
    accuracy 1 - 1/(2r), mBA = mean(1/2, 1/2, 3/4, 5/6, 7/8) = 83/120."""
    gt, pred = _rect((600, 900), (0, 600), (0, 450)), _rect((600, 900), (0, 600), (0, 449))
    assert mba(pred, gt) == pytest.approx(83 / 120, rel=1e-12)
    assert ref_mba(pred, gt) == pytest.approx(83 / 120, rel=1e-12)


def test_mba_agrees_with_the_definition_on_random_shapes():
    rng = np.random.default_rng(1)
    for shape in [(300, 420), (700, 500)]:  # radii [1, 1, 1, 1, 1] and [1, 1, 2, 3, 3]
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        for _ in range(2):
            masks = []
            for _ in range(2):  # blobs: unions of discs, some cut by the border
                m = np.zeros(shape, bool)
                for _ in range(3):
                    cy, cx, rad = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(10, 120)
                    m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2
                masks.append(m.astype(np.uint8) * 255)
            assert mba(*masks) == pytest.approx(ref_mba(*masks), rel=1e-12)


def test_mba_image_border_is_not_boundary_and_empty_band_is_nan():
    full = np.full((10, 10), 255, np.uint8)
    assert math.isnan(mba(full, full))  # uniform GT: no gradient anywhere (border ignored)
    assert math.isnan(mba(EMPTY, EMPTY))


# ----------------------------------------------------------------------------- the suite (pysodmetrics)


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


def enhanced(a: float, b: float) -> float:
    """E-measure's enhanced alignment of one pixel (Fan et al. 2018): a, b the prediction's and the GT's
    deviations from their image means; ((2ab / (a^2 + b^2)) + 1)^2 / 4."""
    return (2 * a * b / (a * a + b * b) + 1) ** 2 / 4


def test_binary_prediction_worked_example():
    """GT: the 16-px square; prediction: its left 3 columns (12 px, all inside). Each metric's curve has 256
    thresholds: 255 of them see the binary mask, the lowest (0) sees every pixel as foreground."""
    pred = square(cols=(3, 6))
    suite = MetricSuite(("max_f", "mean_f", "mae", "mean_e", "max_e", "iou"))
    suite.update(pred, GT, "a")
    r = suite.results()
    # F_beta with beta^2 = 0.3: (1.3 P R) / (0.3 P + R). Binary: P = 1, R = 3/4 -> 0.975 / 1.05 = 13/14.
    # All-foreground threshold: P = 16/100, R = 1 -> 0.208 / 1.048 = 26/131.
    assert r["max_f"] == pytest.approx(13 / 14, rel=1e-12)
    assert r["mean_f"] == pytest.approx((255 * 13 / 14 + 26 / 131) / 256, rel=1e-12)
    assert r["mae"] == pytest.approx(4 / 100, rel=1e-12)  # 4 missed pixels of 100
    # E-measure, binary: means 0.12 (prediction) and 0.16 (GT); 12 hits (0.88, 0.84), 4 misses (-0.12, 0.84),
    # 84 true negatives (-0.12, -0.16), summed and divided by N - 1 = 99 (the toolkit's MATLAB convention).
    # All-foreground threshold: the prediction's deviation is 0 everywhere -> 1/4 a pixel -> 25/99.
    e_binary = (12 * enhanced(0.88, 0.84) + 4 * enhanced(-0.12, 0.84) + 84 * enhanced(-0.12, -0.16)) / 99
    assert r["max_e"] == pytest.approx(e_binary, rel=1e-9)
    assert r["mean_e"] == pytest.approx((255 * e_binary + 25 / 99) / 256, rel=1e-9)
    assert r["iou"] == pytest.approx(12 / 16)
    assert suite.per_image[0]["max_f"] == pytest.approx(13 / 14, rel=1e-12)


def test_s_measure_worked_examples():
    # GT without foreground: S = 1 - mean(prediction); 20 of 100 pixels predicted -> 0.8.
    # GT all foreground: S = mean(prediction); 30 of 100 -> 0.3.
    # GT = the square (u = 16/100), empty prediction, alpha = 0.5: the object term is u * 0 (no foreground
    # predicted) + (1 - u) * 2 * 1 / (1 + 1 + 0) (background perfectly predicted) = 0.84; the region term splits
    # at the GT's centroid (4.5, 4.5 -> row/col 4 + 1) into four quadrants, each holding part of the square,
    # where a constant-0 prediction has SSIM 0; S = 0.5 * 0.84 + 0.5 * 0 = 0.42.
    suite = MetricSuite(("s_measure",))
    twenty = np.zeros((10, 10), np.uint8)
    twenty[:2] = 255
    thirty = np.zeros((10, 10), np.uint8)
    thirty[:3] = 255
    assert suite.update(twenty, EMPTY)["s_measure"] == pytest.approx(0.8, rel=1e-12)
    assert suite.update(thirty, np.full((10, 10), 255, np.uint8))["s_measure"] == pytest.approx(0.3, rel=1e-12)
    assert suite.update(EMPTY, GT)["s_measure"] == pytest.approx(0.42, rel=1e-12)
    assert suite.results()["s_measure"] == pytest.approx((0.8 + 0.3 + 0.42) / 3, rel=1e-12)


def test_dataset_max_f_is_the_max_of_the_mean_curve():
    """Two soft predictions (values 0, 51 and 255) on the 16-px square, each best at another threshold.

    X: 255 on 8 GT px; 51 on the other 8 GT px and on 16 background px. Above 51: P = 1, R = 1/2 -> F = 13/16;
       at 51 and below: P = 1/2, R = 1 -> 0.65 / 1.15 = 13/23.
    Y: 255 on 8 GT px and 8 background px; 51 on the other 8 GT px. Above 51: P = R = 1/2 -> 1/2;
       at 51 and below: P = 2/3, R = 1 -> 13/18.
    The toolkit's curve: 204 thresholds above 51, 51 at or below it (down to 1), and 0, where every pixel is
    foreground (P = 16/100, R = 1 -> 26/131 for both). The mean curve's max is (13/16 + 1/2) / 2 = 21/32; the mean
    of the per-image maxima, (13/16 + 13/18) / 2, would be larger.
    """
    fg_rows_top, fg_rows_bottom = (slice(3, 5), slice(3, 7)), (slice(5, 7), slice(3, 7))
    x = np.zeros((10, 10), np.uint8)
    x[fg_rows_top] = 255
    x[fg_rows_bottom] = 51
    x[0:2, 0:8] = 51  # 16 background pixels
    y = np.zeros((10, 10), np.uint8)
    y[fg_rows_top] = 255
    y[fg_rows_bottom] = 51
    y[0, 0:8] = 255  # 8 background pixels
    suite = MetricSuite(("max_f", "mean_f", "mae"))
    suite.update(x, GT, "x")
    suite.update(y, GT, "y")
    r = suite.results()
    assert r["max_f"] == pytest.approx(21 / 32, rel=1e-12)
    low = (13 / 23 + 13 / 18) / 2
    assert r["mean_f"] == pytest.approx((204 * 21 / 32 + 51 * low + 26 / 131) / 256, rel=1e-12)
    assert [p["max_f"] for p in suite.per_image] == pytest.approx([13 / 16, 13 / 18], rel=1e-12)
    # MAE on the 0..1 prediction: X: 8 * 0.8 + 16 * 0.2 = 9.6; Y: 8 * 1 + 8 * 0.8 = 14.4 (of 100 pixels)
    assert r["mae"] == pytest.approx((0.096 + 0.144) / 2, rel=1e-12)


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


def test_stored_image_state_rebuilds_the_same_results():
    """What a resumed evaluation does: per-image state from one suite added to another gives the same scores."""
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(0, 256, (40, 50)).astype(np.uint8), square((40, 50), (5, 30), (10, 40)))
             for _ in range(3)]
    names = ("max_f", "mean_f", "weighted_f", "mae", "s_measure", "mean_e", "max_e", "hce", "iou")
    whole, rebuilt = MetricSuite(names), MetricSuite(names)
    for i, (p, g) in enumerate(pairs):
        rec = whole.update(p, g, str(i))
        if i < 2:
            one = MetricSuite(names)
            one.update(p, g, str(i))
            rebuilt.add_image(dict(rec), one.image_state())
        else:
            rebuilt.update(p, g, str(i))
    assert rebuilt.results() == whole.results()
    with pytest.raises(ValueError, match="does not fit"):
        MetricSuite(("mae",)).add_image({}, whole.image_state())


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
