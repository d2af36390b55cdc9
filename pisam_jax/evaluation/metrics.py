"""Segmentation metrics at the original resolution, on uint8 masks (PISAM_SPEC 7.3, JAX_NOTES 5).

Inputs are (H, W) ``uint8`` maps on the 0..255 scale (a saved 0/255 prediction PNG, a
0..255 ground truth) or ``bool`` masks (taken as 0/255). Everything here is host-side
numpy/OpenCV, one image at a time.

Metric keys (``METRICS``):

* through ``py_sod_metrics`` (1.6.2), with its normalisation (``gt > 128``, prediction
  min-max scaled to [0, 1]) and its dataset accumulation (see ``MetricSuite``):
  ``max_f`` (``Fmeasure(beta=0.3)``, beta^2 = 0.3, max of the dataset-mean curve),
  ``mean_f`` (mean of that curve), ``weighted_f`` (``WeightedFmeasure()``, its default
  beta^2 = 1 as in Margolin et al. and the SOD/DIS toolkits), ``mae``, ``s_measure``
  (``Smeasure(alpha=0.5)``), ``mean_e`` / ``max_e`` (mean / max of the dataset-mean
  ``Emeasure`` curve), ``hce`` (``HumanCorrectionEffortMeasure(relax=5, epsilon=2.0)``,
  DIS's HCE_gamma; it binarises the prediction at 0.5 after normalisation);
* implemented here, on ``pred > 128`` and ``gt > 128``:
  ``iou``, ``boundary_iou`` (bowenc0221/boundary-iou-api ``mask_to_boundary``, dilation
  ratio 0.02) and ``mba`` (CascadePSP ``compute_boundary_acc``).

Degenerate cases, defined here because the references divide by zero:

* ``iou``: both masks empty (union 0) -> 1.0 (nothing to find, nothing found).
* ``boundary_iou``: both boundaries empty (only when both masks are empty) -> 1.0.
* ``mba``: a radius whose band is empty (the ground truth is all 0 or all 1: OpenCV's
  morphology ignores the image border, so a uniform mask has no gradient) contributes
  nothing; if every band is empty the image's mBA is NaN, and ``MetricSuite`` averages
  mBA over the images where it is defined (``num_mba_undefined`` counts the others).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import py_sod_metrics as sod

DIS_METRICS = ("max_f", "weighted_f", "mae", "s_measure", "mean_e", "hce")  # paper Table 1 rows
SOD_METRICS = ("s_measure", "max_f", "mean_e", "mae")  # paper Table 3 columns
BIG_METRICS = ("iou", "mba")  # paper Table 4 columns
CLICK_METRICS = ("max_f", "weighted_f", "mae", "s_measure", "mean_e")  # paper Tables 2 and 7
MASK_METRICS = ("iou", "boundary_iou", "mba")
METRICS = ("max_f", "mean_f", "weighted_f", "mae", "s_measure", "mean_e", "max_e", "hce",
           "iou", "boundary_iou", "mba")
LOWER_IS_BETTER = frozenset({"mae", "hce"})

BIoU_DILATION_RATIO = 0.02
MBA_STEPS = 5
_ONES3 = np.ones((3, 3), np.uint8)


# ----------------------------------------------------------------------------- inputs


def as_uint8(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """(H, W) uint8 0..255 from a uint8 or bool array; anything else is a clear error."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) map, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8) * 255
    if mask.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 (0..255) or bool, got {mask.dtype}")
    return mask


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = as_uint8(pred, "prediction"), as_uint8(gt, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape; "
                         "metrics are computed at the ground truth's original resolution")
    return pred, gt


def binarize(mask: np.ndarray) -> np.ndarray:
    """``mask > 128`` for uint8 maps (the pysodmetrics / CascadePSP / HQ-SAM threshold), bool as is."""
    mask = np.asarray(mask)
    return mask if mask.dtype == np.bool_ else mask > 128


# ----------------------------------------------------------------------------- mask metrics


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P & G| / |P | G| on ``> 128``; 1.0 when both are empty."""
    pred, gt = _check_pair(pred, gt)
    p, g = binarize(pred), binarize(gt)
    union = np.count_nonzero(p | g)
    return 1.0 if union == 0 else float(np.count_nonzero(p & g) / union)


def boundary_dilation(shape: tuple[int, int], dilation_ratio: float = BIoU_DILATION_RATIO) -> int:
    """``int(round(ratio * diag))``, at least 1 (Python's round: halves go to even, as the reference)."""
    h, w = shape
    d = int(round(dilation_ratio * math.sqrt(h ** 2 + w ** 2)))
    return max(d, 1)


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = BIoU_DILATION_RATIO) -> np.ndarray:
    """bowenc0221 ``mask_to_boundary``: mask minus its erosion by a 3x3 square ``d`` times.

    The mask is zero-padded by one pixel first, so the image border counts as outside
    and a mask touching it has a boundary there. Returns a bool (H, W) map.
    """
    m = np.asarray(mask, dtype=bool).astype(np.uint8)
    h, w = m.shape
    padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, _ONES3, iterations=boundary_dilation((h, w), dilation_ratio))
    return (m - eroded[1:h + 1, 1:w + 1]) > 0


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = BIoU_DILATION_RATIO) -> float:
    """Boundary IoU |Gd & Pd| / |Gd | Pd| of the ``> 128`` masks; 1.0 when both boundaries are empty."""
    pred, gt = _check_pair(pred, gt)
    pb = mask_to_boundary(binarize(pred), dilation_ratio)
    gb = mask_to_boundary(binarize(gt), dilation_ratio)
    union = np.count_nonzero(pb | gb)
    return 1.0 if union == 0 else float(np.count_nonzero(pb & gb) / union)


def mba_radii(shape: tuple[int, int], steps: int = MBA_STEPS) -> list[int]:
    """CascadePSP radii ``1 + int((max_r - 1) / steps * i)``, ``max_r = (H + W) / 300``, i < steps.

    ``int`` truncates toward zero, so images with H + W < 300 use radius 1 throughout.
    """
    h, w = shape
    max_r = (w + h) / 300
    return [1 + int((max_r - 1) / steps * i) for i in range(steps)]


def boundary_band(gt: np.ndarray, radius: int) -> np.ndarray:
    """``morphologyEx(gt, MORPH_GRADIENT, ellipse(2r+1)) > 0`` on the binary ground truth (bool)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    g = np.asarray(gt, dtype=bool).astype(np.uint8)
    return cv2.morphologyEx(g, cv2.MORPH_GRADIENT, kernel) > 0


def mba(pred: np.ndarray, gt: np.ndarray, steps: int = MBA_STEPS) -> float:
    """Mean boundary accuracy (CascadePSP ``compute_boundary_acc``) of the ``> 128`` masks.

    For each radius, the fraction of pixels in the ground truth's boundary band where the
    prediction agrees with the ground truth; the mean over the radii with a non-empty band
    (the reference divides by zero otherwise); NaN if no band is non-empty.
    """
    pred, gt = _check_pair(pred, gt)
    p, g = binarize(pred), binarize(gt)
    accs = []
    for r in mba_radii(g.shape, steps):
        band = boundary_band(g, r)
        n = np.count_nonzero(band)
        if n:
            accs.append(np.count_nonzero(p[band] == g[band]) / n)
    return float(np.mean(accs)) if accs else math.nan


# ----------------------------------------------------------------------------- accumulation


def _sod_classes() -> dict:
    with warnings.catch_warnings():  # Fmeasure warns that FmeasureV2 will replace it; same numbers
        warnings.simplefilter("ignore")
        fm = sod.Fmeasure(beta=0.3)
    return {
        "fm": fm,
        "wfm": sod.WeightedFmeasure(),
        "mae": sod.MAE(),
        "sm": sod.Smeasure(alpha=0.5),
        "em": sod.Emeasure(),
        "hce": sod.HumanCorrectionEffortMeasure(relax=5, epsilon=2.0),
    }


_NEEDS = {  # metric -> the pysodmetrics accumulator it reads (None: implemented here)
    "max_f": "fm", "mean_f": "fm", "weighted_f": "wfm", "mae": "mae", "s_measure": "sm",
    "mean_e": "em", "max_e": "em", "hce": "hce", "iou": None, "boundary_iou": None, "mba": None,
}


class MetricSuite:
    """Accumulate metrics over a dataset, one image at a time, with pysodmetrics' semantics.

    ``update(pred, gt, name)`` scores one image; ``results()`` gives the dataset scores:

    * ``max_f`` / ``mean_f``: the per-image F-measure-vs-threshold curves (256 thresholds)
      are averaged over images, then the max / mean of that mean curve is taken;
      ``mean_e`` / ``max_e`` likewise for the E-measure curves;
    * every other metric is the mean of its per-image values (``mba`` over the images
      where it is defined).

    ``results()`` also holds ``num_images``. ``per_image`` holds one dict per image
    (``name`` plus each metric's per-image value; for ``max_f`` / ``mean_e`` that is the
    max / mean of the image's own curve) for the worst-cases gallery (``worst``).
    """

    def __init__(self, names: Sequence[str] = DIS_METRICS):
        unknown = [n for n in names if n not in _NEEDS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
        if not names:
            raise ValueError("MetricSuite needs at least one metric name")
        self.names = tuple(dict.fromkeys(names))
        needed = {_NEEDS[n] for n in self.names} - {None}
        self._sod = {k: v for k, v in _sod_classes().items() if k in needed}
        self.per_image: list[dict] = []

    def __len__(self) -> int:
        return len(self.per_image)

    def update(self, pred: np.ndarray, gt: np.ndarray, name: str | None = None) -> dict:
        """Score one image (pred, gt (H, W) uint8 0..255 or bool); returns its per-image record."""
        pred, gt = _check_pair(pred, gt)
        for acc in self._sod.values():
            acc.step(pred, gt)
        rec: dict = {"name": name if name is not None else str(len(self.per_image))}
        s = self._sod
        last = {
            "max_f": lambda: float(s["fm"].changeable_fms[-1].max()),
            "mean_f": lambda: float(s["fm"].changeable_fms[-1].mean()),
            "weighted_f": lambda: float(s["wfm"].weighted_fms[-1]),
            "mae": lambda: float(s["mae"].maes[-1]),
            "s_measure": lambda: float(s["sm"].sms[-1]),
            "mean_e": lambda: float(s["em"].changeable_ems[-1].mean()),
            "max_e": lambda: float(s["em"].changeable_ems[-1].max()),
            "hce": lambda: float(s["hce"].hces[-1]),
            "iou": lambda: iou(pred, gt),
            "boundary_iou": lambda: boundary_iou(pred, gt),
            "mba": lambda: mba(pred, gt),
        }
        for n in self.names:
            rec[n] = last[n]()
        self.per_image.append(rec)
        return rec

    def image_state(self, index: int = -1) -> dict[str, np.ndarray]:
        """What ``update`` accumulated for one image, to be stored and given back to ``add_image``.

        Each pysodmetrics accumulator appends one number or array per image to its lists and
        ``results`` averages them, so these items (with the per-image record) are the image's whole
        contribution: ``{"fm:changeable_fms": array, ...}``.
        """
        state = {}
        for k, items in self._accumulators().items():
            state[k] = np.asarray(items[index])
            if state[k].dtype.kind not in "biuf":
                raise RuntimeError(f"metric accumulator {k} does not hold a number or array per image")
        return state

    def add_image(self, record: dict, state: dict[str, np.ndarray]) -> None:
        """Adds an image scored elsewhere (its ``update`` record and ``image_state``), exactly as ``update`` did."""
        lists = self._accumulators()
        if sorted(lists) != sorted(state):
            raise ValueError(f"stored metric state {sorted(state)} does not fit this suite's {sorted(lists)}")
        for k, items in lists.items():
            items.append(state[k])
        self.per_image.append(record)

    def image_state_keys(self) -> list[str]:
        """The keys of ``image_state``, known before any image is scored."""
        return sorted(self._accumulators())

    def _accumulators(self) -> dict[str, list]:
        """The per-image lists of the pysodmetrics accumulators, keyed ``"<metric>:<attribute>"``."""
        return {f"{name}:{attr}": v for name, acc in self._sod.items() for attr, v in vars(acc).items()
                if isinstance(v, list)}

    def results(self) -> dict[str, float]:
        """Dataset scores as plain floats, plus ``num_images`` (and ``num_mba_undefined``)."""
        if not self.per_image:
            raise ValueError("MetricSuite.results() called before any update(): no images were scored")
        out: dict[str, float] = {}
        sod_res = {k: acc.get_results() for k, acc in self._sod.items()}
        for n in self.names:
            src = _NEEDS[n]
            if n == "max_f":
                v = sod_res["fm"]["fm"]["curve"].max()
            elif n == "mean_f":
                v = sod_res["fm"]["fm"]["curve"].mean()
            elif n == "mean_e":
                v = sod_res["em"]["em"]["curve"].mean()
            elif n == "max_e":
                v = sod_res["em"]["em"]["curve"].max()
            elif src is not None:
                v = sod_res[src][src]
            else:
                vals = np.array([r[n] for r in self.per_image], np.float64)
                if n == "mba":
                    out["num_mba_undefined"] = int(np.isnan(vals).sum())
                    v = np.nanmean(vals) if np.isfinite(vals).any() else math.nan
                else:
                    v = vals.mean()
            out[n] = float(v)
        out["num_images"] = len(self.per_image)
        return out

    def worst(self, metric: str = "iou", k: int = 16) -> list[dict]:
        """The ``k`` per-image records worst on ``metric`` (lowest, or highest for mae/hce); NaNs last."""
        if metric not in self.names:
            raise ValueError(f"metric {metric!r} is not tracked by this suite ({', '.join(self.names)})")
        sign = 1.0 if metric in LOWER_IS_BETTER else -1.0

        def key(r):
            v = r[metric]
            return (math.isnan(v), -sign * v if not math.isnan(v) else 0.0, r["name"])

        return sorted(self.per_image, key=lambda r: key(r))[:k]


def evaluate_pairs(pairs, names: Sequence[str] = DIS_METRICS) -> MetricSuite:
    """Convenience: a ``MetricSuite`` fed with an iterable of (name, pred, gt)."""
    suite = MetricSuite(names)
    for name, pred, gt in pairs:
        suite.update(pred, gt, name)
    return suite
