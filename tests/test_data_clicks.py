"""Click simulation on hand-made cases: error maps, erosion, area filter, order, coordinates."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pisam_jax.data import clicks


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_error_maps_soft_gt_never_qualifies():
    gt = np.array([[255, 254, 0, 1, 255, 0]], np.float32)
    pred = np.array([[0, 0, 1, 1, 1, 0]], bool)
    fg, bg = clicks.error_maps(pred, gt)
    np.testing.assert_array_equal(fg, [[1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(bg, [[0, 0, 1, 0, 0, 0]])
    fg, bg = clicks.error_maps(pred, gt > 128)  # a bool GT is exact
    np.testing.assert_array_equal(fg, [[1, 1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="shape"):
        clicks.error_maps(pred, gt[:, :3])


def test_erode_equals_minpool_with_zero_padding():
    x = np.random.default_rng(0).random((40, 50)) > 0.2
    ours = clicks.erode(x)
    t = torch.from_numpy(x.astype(np.float32))[None, None]
    ref = -F.max_pool2d(-F.pad(t, (1, 1, 1, 1), value=0.0), 3, stride=1)  # spec section 6 step 3
    np.testing.assert_array_equal(ours, ref[0, 0].numpy() > 0.5)
    full = np.ones((5, 5), bool)
    np.testing.assert_array_equal(clicks.erode(full), np.pad(np.ones((3, 3), bool), 1))  # border = outside


def test_components_8_connectivity_and_area_filter():
    r = np.zeros((8, 8), bool)
    r[0, 0] = r[1, 1] = True  # diagonal: one 8-connected component of area 2
    r[5, 5] = True  # area 1: dropped
    r[3:5, 0:3] = True  # area 6
    ids, areas, flat, values = clicks.components(r)
    assert areas.tolist() == [2, 6] and ids.tolist() == [1, 2]  # raster order of first pixel
    assert sorted(flat[values == 1].tolist()) == [0, 9]  # (0, 0) and (1, 1)
    assert clicks.components(r, min_area=3)[1].tolist() == [6]


def _blocks():
    """GT 0/255 with FG errors (pred misses them) and BG errors (pred extra) of known sizes."""
    gt = np.zeros((32, 32), np.uint8)
    pred = np.zeros((32, 32), bool)
    gt[2:9, 2:9] = 255  # 7x7 missed -> eroded 5x5 = 25
    gt[20:25, 2:7] = 255  # 5x5 missed -> 3x3 = 9
    pred[12:18, 20:26] = True  # 6x6 false positive -> 4x4 = 16
    pred[26:29, 26:29] = True  # 3x3 -> 1x1 = 1 (< 2, dropped)
    gt[12:14, 2:4] = 255  # 2x2 missed -> erodes away
    return pred, gt


def test_order_coordinates_flags_and_padding():
    pred, gt = _blocks()
    out = clicks.simulate_clicks(pred, gt, _rng(), mode="eval", num_clicks=10)
    assert out["valid"] and out["n"] == 3
    np.testing.assert_array_equal(out["flags"][:3], [1, 0, 1])  # by area: 25 (FG), 16 (BG), 9 (FG)
    np.testing.assert_array_equal(out["pad"], [False] * 3 + [True] * 7)
    assert out["points"].shape == (10, 2) and out["points"].dtype == np.float32
    np.testing.assert_array_equal(out["points"][3:], 0)
    np.testing.assert_array_equal(out["flags"][3:], 0)
    # (x, y) = ((col + 0.5) / W, (row + 0.5) / H) inside the eroded components.
    cols = out["points"][:3, 0] * 32 - 0.5
    rows = out["points"][:3, 1] * 32 - 0.5
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-5)
    boxes = [(3, 8, 3, 8), (13, 17, 21, 25), (21, 24, 3, 6)]  # row0, row1, col0, col1 (exclusive)
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        assert r0 <= rows[i] < r1 and c0 <= cols[i] < c1, (i, rows[i], cols[i])


def test_pixel_centre_convention_single_pixel_component():
    gt = np.zeros((4, 8), np.uint8)
    pred = np.zeros((4, 8), bool)
    pred[0:4, 4:7] = True  # 4x3 false positive -> erodes to rows 1..2 at col 5 (border is outside)
    out = clicks.simulate_clicks(pred, gt, _rng(), mode="eval", num_clicks=1)
    x, y = out["points"][0]
    assert x == pytest.approx(5.5 / 8)
    assert y in (pytest.approx(1.5 / 4), pytest.approx(2.5 / 4))
    assert out["flags"][0] == 0


def test_eval_exact_k_and_fewer():
    pred, gt = _blocks()
    for k in (1, 2):
        out = clicks.simulate_clicks(pred, gt, _rng(), mode="eval", num_clicks=k)
        assert out["n"] == k and out["pad"].sum() == 10 - k
    assert clicks.simulate_clicks(pred, gt, _rng(), mode="eval", num_clicks=5)["n"] == 3
    with pytest.raises(ValueError):
        clicks.simulate_clicks(pred, gt, _rng(), mode="eval", num_clicks=0)


def test_train_draws_n_uniformly():
    pred, gt = _blocks()
    ns = [int(clicks.simulate_clicks(pred, gt, _rng(s))["n"]) for s in range(300)]
    assert set(ns) == {1, 2, 3}
    assert min(np.bincount(ns)[1:]) > 60


def test_fg_only_and_bg_only():
    pred, gt = _blocks()
    fg = clicks.simulate_clicks(pred, gt, _rng(), mode="eval", num_clicks=10, which="fg")
    bg = clicks.simulate_clicks(pred, gt, _rng(), mode="eval", num_clicks=10, which="bg")
    assert fg["n"] == 2 and (fg["flags"][:2] == 1).all()
    assert bg["n"] == 1 and bg["flags"][0] == 0
    with pytest.raises(ValueError):
        clicks.simulate_clicks(pred, gt, _rng(), which="nope")


def test_no_component_is_invalid():
    gt = np.zeros((16, 16), np.uint8)
    gt[4:10, 4:10] = 255
    out = clicks.simulate_clicks(gt > 128, gt, _rng())  # perfect prediction
    assert not out["valid"] and out["n"] == 0 and out["pad"].all()
    assert (out["points"] == 0).all() and (out["flags"] == 0).all()


def test_max_points_cap_and_determinism():
    gt = np.zeros((64, 64), np.uint8)
    pred = np.zeros((64, 64), bool)
    for i in range(4):
        for j in range(4):  # 16 separate 4x4 false positives -> 2x2 after erosion
            pred[i * 16 + 2:i * 16 + 6, j * 16 + 2:j * 16 + 6] = True
    a = clicks.simulate_clicks(pred, gt, _rng(7), mode="eval", num_clicks=10)
    assert a["n"] == 10 and not a["pad"].any()
    b = clicks.simulate_clicks(pred, gt, _rng(7), mode="eval", num_clicks=10)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ns = {int(clicks.simulate_clicks(pred, gt, _rng(s))["n"]) for s in range(100)}
    assert max(ns) == 10 and min(ns) == 1


def test_random_pixel_covers_component():
    gt = np.zeros((10, 10), np.uint8)
    pred = np.zeros((10, 10), bool)
    pred[1:6, 1:4] = True  # eroded: rows 2..4, col 2 -> 3 pixels
    seen = set()
    rng = _rng(0)
    for _ in range(60):
        p = clicks.simulate_clicks(pred, gt, rng, mode="eval")["points"][0]
        seen.add((round(p[1] * 10 - 0.5), round(p[0] * 10 - 0.5)))
    assert seen == {(2, 2), (3, 2), (4, 2)}


def test_batch():
    pred, gt = _blocks()
    out = clicks.simulate_clicks_batch(np.stack([pred, gt > 128]), np.stack([gt, gt]), _rng(), mode="eval")
    assert out["points"].shape == (2, 10, 2) and out["valid"].tolist() == [True, False]
