"""Click simulation from the errors of a prediction (PISAM_SPEC section 6, decision D3).

Host-side numpy/scipy, one sample at a time (``simulate_clicks``) or a batch
(``simulate_clicks_batch``):

1. error maps: missed foreground ``gt == 255 & ~pred`` and false positives
   ``gt == 0 & pred`` (``gt`` on the 0..255 scale; soft values never qualify;
   a bool ``gt`` is taken as the exact foreground);
2. each map is eroded by one pixel (3x3 minimum, zero padding: the image border
   counts as outside);
3. 8-connected components with area >= ``min_area`` (2), foreground first;
4. the ``n`` largest components (ties: foreground before background, then raster
   order of the component's first pixel), one uniformly random pixel in each.

Outputs, padded to ``max_points`` (10): ``points`` (P, 2) float32 (x, y) normalised
with pixel centres ``((col + 0.5) / W, (row + 0.5) / H)``; ``flags`` (P,) int32
(1 = foreground click on missed foreground, 0 = background click on a false
positive); ``pad`` (P,) bool, True for padded slots; ``valid`` bool, False when there
is no component at all (then every slot is padded: drop the sample's loss); ``n``.

``mode="train"`` draws n uniformly in [1, min(max_points, k)] (k = number of
components); ``mode="eval"`` asks for exactly ``num_clicks`` and returns
min(num_clicks, k) when there are fewer components (``n`` tells how many).
``which`` = "both" | "fg" | "bg" restricts the candidates (paper Table 7).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

MAX_POINTS = 10
MIN_AREA = 2
_EIGHT = np.ones((3, 3), dtype=bool)
_EIGHT_U8 = np.ones((3, 3), dtype=np.uint8)


def error_maps(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(missed foreground, false positive) bool maps of a bool prediction against ``gt``."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if gt.dtype == np.bool_:
        fg, bg = gt, ~gt
    else:
        fg, bg = gt == 255, gt == 0
    return fg & ~pred, bg & pred


def erode(region: np.ndarray) -> np.ndarray:
    """3x3 erosion with zero padding: a pixel stays if it and its 8 neighbours are set."""
    u8 = np.ascontiguousarray(region, dtype=np.uint8)
    return cv2.erode(u8, _EIGHT_U8, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def components(region: np.ndarray, min_area: int = MIN_AREA):
    """8-connected components of ``region`` with area >= min_area.

    Labels are numbered in raster order of each component's first pixel. Returns
    (kept label ids (K,), their areas (K,), flat pixel indices of all labelled pixels,
    the label of each of those pixels).
    """
    labels, num = ndimage.label(region, structure=_EIGHT)
    flat = np.flatnonzero(labels)  # only the labelled pixels: cheap for sparse error maps
    values = labels.ravel()[flat]
    areas = np.bincount(values, minlength=num + 1)[1:]
    keep = np.flatnonzero(areas >= min_area)
    return keep + 1, areas[keep], flat, values


def _candidates(pred, gt, which, min_area):
    """All candidate components as a list of (area, flag, label id, flat, values), sorted."""
    if which not in ("both", "fg", "bg"):
        raise ValueError(f"which must be 'both', 'fg' or 'bg', not {which!r}")
    fg_err, bg_err = error_maps(pred, gt)
    cands = []
    for flag, err, use in ((1, fg_err, which != "bg"), (0, bg_err, which != "fg")):
        if not use:
            continue
        ids, areas, flat, values = components(erode(err), min_area)
        cands.extend((int(a), flag, int(i), flat, values) for a, i in zip(areas, ids))
    # Largest first; ties keep foreground first, then label order (stable sort).
    order = sorted(range(len(cands)), key=lambda j: -cands[j][0])
    return [cands[j] for j in order]


def simulate_clicks(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator, *,
                    mode: str = "train", num_clicks: int = 1, which: str = "both",
                    max_points: int = MAX_POINTS, min_area: int = MIN_AREA) -> dict:
    """Clicks for one sample; ``pred`` bool (H, W) (e.g. logits > 0), ``gt`` (H, W) 0..255.

    See the module docstring for the outputs. Deterministic given ``rng``'s state.
    """
    pred = np.asarray(pred)
    h, w = pred.shape
    cands = _candidates(pred, gt, which, min_area)
    k = len(cands)
    points = np.zeros((max_points, 2), np.float32)
    flags = np.zeros((max_points,), np.int32)
    pad = np.ones((max_points,), bool)
    if k == 0:
        return dict(points=points, flags=flags, pad=pad, valid=np.bool_(False), n=np.int32(0))
    if mode == "train":
        n = int(rng.integers(1, min(max_points, k) + 1))
    elif mode == "eval":
        if not 1 <= num_clicks <= max_points:
            raise ValueError(f"num_clicks must be in [1, {max_points}], not {num_clicks}")
        n = min(num_clicks, k)
    else:
        raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
    for slot, (area, flag, lid, flat, values) in enumerate(cands[:n]):
        pixels = flat[values == lid]  # the component's pixels in raster order
        r, c = divmod(int(pixels[int(rng.integers(area))]), w)
        points[slot] = ((c + 0.5) / w, (r + 0.5) / h)
        flags[slot] = flag
        pad[slot] = False
    return dict(points=points, flags=flags, pad=pad, valid=np.bool_(True), n=np.int32(n))


def simulate_clicks_batch(preds: np.ndarray, gts: np.ndarray, rng: np.random.Generator,
                          **kw) -> dict:
    """``simulate_clicks`` over a batch (B, H, W); returns the outputs stacked on axis 0."""
    outs = [simulate_clicks(p, g, rng, **kw) for p, g in zip(preds, gts)]
    return {k: np.stack([o[k] for o in outs]) for k in outs[0]}
