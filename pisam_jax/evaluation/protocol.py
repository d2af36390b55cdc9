"""The click protocol's model-independent parts (paper Tables 2 and 7; PISAM_SPEC section 6, D9).

The paper keeps the DIS5K test images where SAM, HQ-SAM and Pi-SAM "have overlapping
wrongly-predicted areas", takes the 200 with the poorest initial predictions, and samples
clicks "from the overlapping wrongly-predicted areas". Its supplement is not available;
this module makes those steps precise:

* **error map** of a model: ``pred XOR (gt > 128)``;
* **overlap** of an image: the intersection of all models' error maps (where every
  model is wrong);
* an image is **eligible** when the click simulator can place at least one click in the
  overlap: after ``pisam_jax.data.clicks``'s 1-px erosion there is an 8-connected
  component of at least ``min_area`` (2) pixels whose ground truth is exactly 0 or 255
  (soft ground-truth pixels never take a click);
* the eligible images are ranked by their **initial score**, by default the mean IoU over
  the models (``rank_by="min"``: the worst model's IoU; or a model name), lowest first,
  ties by name; the first ``n`` (200) form the subset;
* **clicks** for a model's current prediction come from the errors of that prediction
  restricted to the overlap (``overlap_clicks``): ``simulate_clicks(..., mode="eval",
  num_clicks=k, which=...)`` gives the k largest components, one random pixel each,
  foreground clicks on missed foreground and background clicks on false positives,
  (x, y) normalised with pixel centres, so the same clicks serve any resolution. With
  the initial predictions the restricted errors are the overlap itself, so every model
  receives the same clicks for an image and seed. When the overlap has fewer than k
  components, fewer clicks are returned (``n`` says how many); none are invented.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from pisam_jax.data.clicks import MIN_AREA, components, erode, simulate_clicks
from pisam_jax.evaluation.metrics import binarize, iou

NUM_SUBSET = 200  # paper section 4.2.2


def error_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Where a prediction is wrong: ``binarize(pred) XOR (gt > 128)`` (bool, same shape)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return binarize(pred) ^ binarize(gt)


def overlap_errors(preds: Sequence[np.ndarray], gt: np.ndarray) -> np.ndarray:
    """Intersection of the models' error maps: pixels every prediction gets wrong (bool)."""
    if len(preds) == 0:
        raise ValueError("overlap_errors needs at least one prediction")
    out = error_map(preds[0], gt)
    for p in preds[1:]:
        out &= error_map(p, gt)
    return out


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``shape`` (H, W); unchanged if it already fits."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    h, w = shape
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _as_click_gt(gt: np.ndarray) -> np.ndarray:
    gt = np.asarray(gt)
    return gt.astype(np.uint8) * 255 if gt.dtype == np.bool_ else gt


def restricted_prediction(pred: np.ndarray, gt: np.ndarray, region: np.ndarray) -> np.ndarray:
    """A prediction whose errors are ``pred``'s errors inside ``region`` and none outside it.

    Outside ``region`` it equals ``gt > 128``, so ``simulate_clicks`` on it only sees the
    errors of ``pred`` that lie in ``region``.
    """
    g = binarize(np.asarray(gt))
    return np.where(region, binarize(np.asarray(pred)), g)


def clickable_components(region: np.ndarray, gt: np.ndarray, min_area: int = MIN_AREA) -> int:
    """How many components of the error ``region`` ``simulate_clicks`` could click (see module doc)."""
    gt = _as_click_gt(gt)
    fg = region & (gt == 255)
    bg = region & (gt == 0)
    return sum(len(components(erode(m), min_area)[0]) for m in (fg, bg))


def overlap_clicks(pred: np.ndarray, gt: np.ndarray, overlap: np.ndarray, k: int,
                   rng: np.random.Generator, *, which: str = "both", min_area: int = MIN_AREA) -> dict:
    """Exactly-k-largest clicks (or fewer, see ``n``) from ``pred``'s errors inside ``overlap``.

    ``pred`` (H, W) bool or uint8 (> 128) is the current prediction at any resolution, e.g.
    the 256x256 low-resolution mask or the full-resolution one; ``gt`` the ground truth at
    the same resolution (0..255, or bool); ``overlap`` the overlapping-error mask of the
    image (resized nearest-neighbour to ``pred``'s shape if it differs). ``which``:
    "both" (Table 2, Table 7 "ALL"), "fg" or "bg" (Table 7). Returns ``simulate_clicks``'s
    dict: ``points`` (10, 2) (x, y) normalised with pixel centres, ``flags`` 1 fg / 0 bg,
    ``pad``, ``valid``, ``n``.
    """
    pred = np.asarray(pred)
    gt = _as_click_gt(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    region = resize_mask(overlap, pred.shape)
    eff = restricted_prediction(pred, gt, region)
    return simulate_clicks(eff, gt, rng, mode="eval", num_clicks=k, which=which, min_area=min_area)


def clicks_to_pixels(clicks: dict, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` clicks as (x, y) pixel coordinates in an image of ``shape`` (H, W), and their labels."""
    n = int(clicks["n"])
    h, w = shape
    pts = clicks["points"][:n].astype(np.float64) * np.array([w, h])
    return pts, clicks["flags"][:n].copy()


@dataclass
class SubsetEntry:
    """One image's record for subset selection (JSON-serialisable)."""

    name: str
    ious: dict  # model -> initial IoU
    overlap_area: int  # pixels in the overlap
    num_components: int  # clickable components in the overlap
    eligible: bool


def subset_entry(name: str, preds: Mapping[str, np.ndarray], gt: np.ndarray,
                 min_area: int = MIN_AREA) -> SubsetEntry:
    """Score one image for ``select_subset`` from every model's initial prediction and the GT.

    Stream over the dataset with this (one image's masks in memory at a time), keep the
    small entries, then call ``select_subset``.
    """
    if not preds:
        raise ValueError("subset_entry needs the predictions of at least one model")
    gt = _as_click_gt(gt)
    pr = {m: (p.astype(np.uint8) * 255 if np.asarray(p).dtype == np.bool_ else np.asarray(p))
          for m, p in preds.items()}
    ov = overlap_errors(list(pr.values()), gt)
    ncomp = clickable_components(ov, gt, min_area)
    return SubsetEntry(name=name, ious={m: iou(p, gt) for m, p in pr.items()},
                       overlap_area=int(np.count_nonzero(ov)), num_components=ncomp, eligible=ncomp > 0)


def initial_score(entry: SubsetEntry, rank_by: str = "mean") -> float:
    """``mean`` / ``min`` of the models' initial IoUs, or one model's IoU."""
    if rank_by == "mean":
        return float(np.mean(list(entry.ious.values())))
    if rank_by == "min":
        return float(min(entry.ious.values()))
    if rank_by not in entry.ious:
        raise ValueError(f"rank_by must be 'mean', 'min' or a model name ({', '.join(entry.ious)}), not {rank_by!r}")
    return float(entry.ious[rank_by])


def select_subset(entries: Sequence[SubsetEntry], n: int = NUM_SUBSET, rank_by: str = "mean") -> list[str]:
    """Names of the ``n`` eligible images with the lowest initial score (ties by name), worst first."""
    ranked = sorted((e for e in entries if e.eligible), key=lambda e: (initial_score(e, rank_by), e.name))
    return [e.name for e in ranked[:n]]


def write_subset(path: str | os.PathLike, names: Sequence[str], entries: Sequence[SubsetEntry] = (),
                 **meta) -> None:
    """Atomic JSON ``{"names": [...], "entries": [...], **meta}`` (what the click evaluation reads)."""
    from pisam_jax.evaluation.reports import write_json

    write_json(path, {"names": list(names), **meta, "entries": [asdict(e) for e in entries]})


def read_subset(path: str | os.PathLike) -> list[str]:
    """The subset's image names, in ranked order."""
    with open(path) as f:
        data = json.load(f)
    names = data.get("names") if isinstance(data, dict) else None
    if not isinstance(names, list):
        raise ValueError(f"{path}: not a subset file (expected a JSON object with a 'names' list)")
    return names


__all__ = ["NUM_SUBSET", "SubsetEntry", "clickable_components", "clicks_to_pixels", "error_map",
           "initial_score", "overlap_clicks", "overlap_errors", "read_subset", "resize_mask",
           "restricted_prediction", "select_subset", "subset_entry", "write_subset"]
