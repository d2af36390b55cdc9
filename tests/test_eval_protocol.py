"""Click protocol: overlapping errors, subset selection, clicks from the overlap (hand-made masks)."""

import numpy as np
import pytest

from pisam_jax.evaluation.protocol import (clicks_to_pixels, overlap_clicks, overlap_errors, read_subset,
                                           select_subset, subset_entry, write_subset)


def gt_square():
    gt = np.zeros((12, 12), np.uint8)
    gt[2:10, 2:10] = 255  # 8x8 object
    return gt


def test_overlap_errors_hand():
    gt = gt_square()
    a = gt.copy()
    a[2:5, 2:10] = 0  # misses rows 2..4
    b = gt.copy()
    b[2:6, 2:6] = 0  # misses rows 2..5, cols 2..5
    b[0, 0] = 255  # and a false positive only b makes
    ov = overlap_errors([a, b > 0], gt)
    expected = np.zeros((12, 12), bool)
    expected[2:5, 2:6] = True  # rows 2..4 x cols 2..5: both wrong
    np.testing.assert_array_equal(ov, expected)


def test_subset_selection():
    gt = gt_square()
    perfect = gt.copy()
    missing = gt.copy()
    missing[2:6, 2:6] = 0  # a 4x4 miss -> erodes to 2x2: clickable
    tiny = gt.copy()
    tiny[2, 2] = 0  # a 1-px miss: erodes to nothing
    worse = gt.copy()
    worse[2:10, 2:6] = 0  # a 8x4 miss
    entries = [
        subset_entry("all_wrong_big", {"m1": worse, "m2": worse}, gt),     # IoU .5 and .5
        subset_entry("one_right", {"m1": perfect, "m2": missing}, gt),    # no overlap
        subset_entry("tiny_overlap", {"m1": tiny, "m2": tiny}, gt),       # overlap not clickable
        subset_entry("all_wrong", {"m1": missing, "m2": worse}, gt),      # IoU .75 and .5
    ]
    assert [e.eligible for e in entries] == [True, False, False, True]
    assert entries[1].overlap_area == 0 and entries[2].overlap_area == 1
    assert entries[3].overlap_area == 16 and entries[3].ious == pytest.approx({"m1": 48 / 64, "m2": 32 / 64})
    assert select_subset(entries, n=200) == ["all_wrong_big", "all_wrong"]  # worst mean IoU first
    assert select_subset(entries, n=1) == ["all_wrong_big"]
    # ranked by one model: m1's IoU .5 < .75
    assert select_subset(entries, rank_by="m1") == ["all_wrong_big", "all_wrong"]
    with pytest.raises(ValueError, match="rank_by"):
        select_subset(entries, rank_by="m3")


def test_subset_file_round_trip(tmp_path):
    gt = gt_square()
    e = subset_entry("x", {"m": np.zeros_like(gt)}, gt)
    write_subset(tmp_path / "subset.json", ["x"], [e], dataset="DIS5K-TE1")
    assert read_subset(tmp_path / "subset.json") == ["x"]


def two_blobs():
    """GT with two objects; predictions miss both (the large one a 5x5 area, the small one 3x3)."""
    gt = np.zeros((20, 20), np.uint8)
    gt[2:9, 2:9] = 255
    gt[12:17, 12:17] = 255
    return gt


def test_overlap_clicks_only_in_overlap_and_largest_first():
    gt = two_blobs()
    a = gt.copy()
    a[3:8, 3:8] = 0  # misses the 5x5 core of the big object
    a[13:16, 13:16] = 0  # and the 3x3 core of the small one
    a[18, 0:6] = 255  # a false positive only model a makes (1 row: would erode away anyway)
    b = a.copy()
    b[0:4, 14:19] = 255  # b adds a 4x5 false positive
    ov = overlap_errors([a, b], gt)
    rng = np.random.default_rng(0)
    c = overlap_clicks(b, gt, ov, 2, rng)
    # b's own false-positive block is outside the overlap, so only the two missed cores are
    # candidates: the 5x5 erodes to 3x3 (9 px, kept); the 3x3 erodes to 1 pixel (< 2: dropped)
    assert int(c["n"]) == 1  # only one clickable component: no click is invented
    pts, flags = clicks_to_pixels(c, gt.shape)
    x, y = pts[0]
    assert flags[0] == 1 and 4 <= x - 0.5 <= 6 and 4 <= y - 0.5 <= 6  # inside the eroded 3x3 core
    # the same clicks whatever model's initial prediction is used (errors restricted to the overlap)
    c2 = overlap_clicks(a, gt, ov, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(c["points"], c2["points"])


def test_overlap_clicks_fg_bg_and_k():
    gt = two_blobs()
    pred = gt.copy()
    pred[3:8, 3:8] = 0  # missed fg: 5x5 -> erodes to 3x3 (9 px)
    pred[12:17, 0:10] = 255  # false positive rows 12..16, cols 0..9 (5x10) -> erodes to 3x8... border!
    # cols 0..9 touch the image border at col 0 (counts as outside) -> erodes to rows 13..15, cols 1..8 (24 px)
    ov = overlap_errors([pred], gt)
    rng = np.random.default_rng(1)
    both = overlap_clicks(pred, gt, ov, 5, rng)
    assert int(both["n"]) == 2 and list(both["flags"][:2]) == [0, 1]  # bg component (24 px) is larger
    fg = overlap_clicks(pred, gt, ov, 5, rng, which="fg")
    assert int(fg["n"]) == 1 and fg["flags"][0] == 1
    bg = overlap_clicks(pred, gt, ov, 1, rng, which="bg")
    pts, flags = clicks_to_pixels(bg, gt.shape)
    assert flags[0] == 0 and 13 <= pts[0, 1] - 0.5 <= 15 and 1 <= pts[0, 0] - 0.5 <= 8
    assert bool(both["pad"][2:].all())


def test_overlap_clicks_other_resolution():
    # overlap computed at the original resolution (40x40), clicks asked at 20x20: the overlap is
    # resized nearest-neighbour; normalised points land in the same place at both scales
    gt40 = np.zeros((40, 40), np.uint8)
    gt40[4:36, 4:36] = 255
    pred40 = gt40.copy()
    pred40[8:20, 8:20] = 0
    ov = overlap_errors([pred40], gt40)
    gt20, pred20 = gt40[::2, ::2], pred40[::2, ::2]
    c = overlap_clicks(pred20, gt20, ov, 1, np.random.default_rng(0))
    assert int(c["n"]) == 1 and c["flags"][0] == 1
    x, y = c["points"][0] * 40  # back to 40x40 pixels
    assert 8 <= x <= 20 and 8 <= y <= 20
