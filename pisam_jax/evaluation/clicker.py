"""The interactive-segmentation field's click robot and its scores (RITM's published rules), model-free.

    clicker = Clicker(fg, ignore)           # fg (H, W) bool: the object; ignore: pixels scored nowhere (or None)
    click = clicker.click(pred)             # pred (H, W) bool -> Click(row, col, positive), or None
    ious = [...]                            # IoU after 0, 1, ..., 20 clicks (NaN where there was no mask yet)
    noc(ious, 0.90), failed(ious, 0.90)

The next click (RITM ``isegm/inference/clicker.py``, followed by FocalClick, SimpleClick, SegNext):

1. error regions: false negatives ``fg & ~pred`` and false positives ``~fg & pred``, both outside ``ignore``;
2. each region's Euclidean distance transform with a 1-px zero border around the image (the image
   border counts as outside the region, so a click is never glued to it);
3. pixels already clicked get distance 0;
4. the click goes to the deeper region: positive when the false negatives' largest distance is strictly
   larger than the false positives' (a tie gives a negative click), at the first pixel in raster order
   (row, then column) holding that region's largest distance. Nothing is random.

With no clickable error left (the mask is right everywhere, or only on pixels already clicked) there is no
next click (``None``; RITM would click at the top-left pixel); the protocol keeps the last mask.

On an empty prediction the first click is the object's deepest pixel, the point farthest from its boundary:
the "centre" of RITM's and SAM's first click, which lies on the object even where its centre of mass does not.

Scores (RITM ``compute_noc_metric``): NoC@t is the number of clicks after which the IoU first reaches ``t``,
``max_clicks`` when it never does; an image whose first mask (before any click, e.g. from a box) already
reaches ``t`` needs 0 clicks. NoF@t counts the images that never reach ``t`` within ``max_clicks`` (RITM's
``>=20`` column also counts those reaching it at exactly the last click).

Distances: OpenCV's exact Euclidean transform (``DIST_MASK_PRECISE``, Felzenszwalb) in float32, 10x faster
than scipy's; it equals float32(sqrt(n)) of the exact squared distance n, and float32 keeps every such value
distinct (so maxima and ties are exact) while n < 4197200, i.e. a depth below 2048 px. Deeper regions (only in
very large images) are measured again in float64 with scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np
from scipy import ndimage

MAX_CLICKS = 20
THRESHOLDS = (0.85, 0.90, 0.95)
EXACT_FLOAT32_DEPTH = 2048.0  # below it, float32 distances of distinct squared distances never tie


class Click(NamedTuple):
    row: int
    col: int
    positive: bool


def depth(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``region`` (H, W) bool to the nearest pixel outside it, the image
    border counting as outside; 0 off the region. float32, or float64 where the region is 2048 px deep or more."""
    padded = np.pad(np.asarray(region, np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if dist.max(initial=0.0) >= EXACT_FLOAT32_DEPTH:
        dist = ndimage.distance_transform_edt(padded)
    return dist[1:-1, 1:-1]


def next_click(pred: np.ndarray, fg: np.ndarray, ignore: np.ndarray | None = None,
               clicked: np.ndarray | None = None) -> Click | None:
    """The next click on the prediction ``pred`` of the object ``fg`` (see the module docstring), or None.

    pred, fg, ignore, clicked: (H, W) bool; ``clicked`` marks the pixels already clicked.
    """
    pred, fg = np.asarray(pred, bool), np.asarray(fg, bool)
    if pred.shape != fg.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {fg.shape} differ in shape")
    fn, fp = fg & ~pred, ~fg & pred
    if ignore is not None:
        fn, fp = fn & ~ignore, fp & ~ignore
    fn_depth, fp_depth = depth(fn), depth(fp)
    if clicked is not None:
        fn_depth[clicked] = 0
        fp_depth[clicked] = 0
    fn_max, fp_max = fn_depth.max(), fp_depth.max()
    if fn_max == 0 and fp_max == 0:
        return None
    positive = bool(fn_max > fp_max)
    chosen = fn_depth if positive else fp_depth
    row, col = divmod(int(np.argmax(chosen)), chosen.shape[1])  # argmax: the first maximum in raster order
    return Click(row, col, positive)


class Clicker:
    """The clicks on one object so far: each ``click(pred)`` adds the next one (never on a clicked pixel)."""

    def __init__(self, fg: np.ndarray, ignore: np.ndarray | None = None):
        self.fg = np.asarray(fg, bool)
        self.ignore = None if ignore is None else np.asarray(ignore, bool)
        self.clicked = np.zeros(self.fg.shape, bool)
        self.clicks: list[Click] = []

    def click(self, pred: np.ndarray) -> Click | None:
        c = next_click(pred, self.fg, self.ignore, self.clicked)
        if c is not None:
            self.clicked[c.row, c.col] = True
            self.clicks.append(c)
        return c

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """The clicks as model prompts: (N, 2) float32 (x, y) normalised with pixel centres, labels (N,) 1/0."""
        h, w = self.fg.shape
        pts = np.array([((c.col + 0.5) / w, (c.row + 0.5) / h) for c in self.clicks], np.float32).reshape(-1, 2)
        return pts, np.array([int(c.positive) for c in self.clicks], np.int32)


def iou(pred: np.ndarray, fg: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """|P & G| / |P | G| over the pixels not ignored; 1.0 when both are empty."""
    pred, fg = np.asarray(pred, bool), np.asarray(fg, bool)
    inter, union = pred & fg, pred | fg
    if ignore is not None:
        inter, union = inter & ~ignore, union & ~ignore
    n = np.count_nonzero(union)
    return 1.0 if n == 0 else np.count_nonzero(inter) / n


def noc(ious: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """Clicks needed to reach IoU ``threshold``: the first k with ``ious[k] >= threshold`` (``ious[k]`` after
    k clicks; NaN, no mask yet, never reaches), else ``max_clicks``."""
    reached = np.flatnonzero(np.asarray(ious[: max_clicks + 1], np.float64) >= threshold)
    return int(reached[0]) if len(reached) else max_clicks


def failed(ious: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS) -> bool:
    """Whether the IoU never reaches ``threshold`` within ``max_clicks`` clicks (counted by NoF)."""
    return not (np.asarray(ious[: max_clicks + 1], np.float64) >= threshold).any()


def threshold_label(threshold: float) -> str:
    """0.9 -> "90" (the field writes NoC@90)."""
    return f"{threshold * 100:g}"
