"""Box-prompt evaluation of a model on named datasets, resumable, scored at the original resolution.

    seg = BoxSegmenter.load("checkpoints/pisam_vit_h", geometry="stretch")
    ds = open_dataset("DIS5K-TE1", data_root)
    res = evaluate_dataset(seg, ds, out_dir)       # res.results: {"max_f": ..., ..., "num_images": n}

For every image: the GT's tight box in the model frame is the prompt (``BoxSegmenter``),
the prediction is saved as a 0/255 PNG at the original resolution under
``<out>/<model>/<dataset>/<name>.png`` (written to a temporary name, then renamed), and
scored against the original GT by a ``MetricSuite``. An image whose PNG already exists is
not predicted again: its PNG is read back and scored, so an interrupted evaluation resumes
where it stopped and gives the same numbers. ``<out>/<model>/settings.json`` records what
made the predictions (decoder, geometry, ..., and a fingerprint of the model's parameters,
``model_settings``); resuming with other settings, or after the model behind the name
changed (re-converted, re-exported, retrained), is an error naming the change.

``score_folder`` scores any folder of predictions (``<name>.png``) with the same metric path.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path

import cv2
import numpy as np

from pisam_jax import outputs
from pisam_jax.data import images
from pisam_jax.data.datasets import Dataset, Sample
from pisam_jax.evaluation.metrics import BIG_METRICS, DIS_METRICS, SOD_METRICS, MetricSuite
from pisam_jax.evaluation.reports import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
PARAMS_KEY = "params_sha256"  # in a model's settings: which weights made its predictions
GALLERY_METRIC = "iou"  # always tracked: it ranks the worst-case gallery and the click subset


class EvalError(ValueError):
    """An evaluation that cannot go on as asked; the message names the thing and what to do."""


def default_metrics(dataset: str) -> tuple[str, ...]:
    """The paper's metrics for a dataset (Tables 1, 3, 4), plus IoU (and Boundary IoU for DIS5K)."""
    if dataset.startswith("DIS5K"):
        names = DIS_METRICS + ("iou", "boundary_iou")
    elif dataset.startswith(("HRSOD", "UHRSD")):
        names = SOD_METRICS + ("iou",)
    elif dataset.startswith("BIG"):
        names = BIG_METRICS
    else:
        names = ("iou", "boundary_iou", "max_f", "mae", "s_measure")
    return tuple(dict.fromkeys(names + (GALLERY_METRIC,)))


def prediction_path(out_dir: str | os.PathLike, model: str, dataset: str, name: str) -> Path:
    return Path(out_dir) / model / dataset / f"{name}.png"


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """A bool (H, W) mask as a 0/255 8-bit PNG, atomically."""
    ok, png = cv2.imencode(".png", np.asarray(mask, bool).astype(np.uint8) * 255)
    if not ok:
        raise EvalError(f"{path}: PNG encoding failed")
    return atomic_write_bytes(path, png.tobytes())


def read_prediction(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray | None:
    """A saved prediction as a uint8 0/255 map, or None when it is unreadable or of another size."""
    try:
        pred = images.read_mask(path)
    except images.ImageReadError as e:
        log.warning("%s; predicting this image again", e)
        return None
    if pred.shape != tuple(shape):
        log.warning("%s is %s but its image is %s; predicting it again", path, pred.shape, shape)
        return None
    return np.where(pred > 128, 255, 0).astype(np.uint8)


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def params_fingerprint(model) -> str:
    """``models.params_fingerprint``, computed once per loaded model (0.2 s for vit_b, ~1.5 s for vit_h on CPU)."""
    from pisam_jax.models import params_fingerprint as fingerprint

    if model not in _FINGERPRINTS:
        _FINGERPRINTS[model] = fingerprint(model)
    return _FINGERPRINTS[model]


def model_settings(seg) -> dict:
    """What makes a segmenter's predictions: its settings and the fingerprint of its model's parameters."""
    return {**seg.settings, PARAMS_KEY: params_fingerprint(seg.model)}


def settings_change(old: dict, new: dict) -> str:
    """The fields of two settings dicts that differ, as "field: A there, B now" (fingerprints shortened)."""
    def short(k, v):
        return f"{v[:12]}..." if k == PARAMS_KEY and isinstance(v, str) else v

    return ", ".join(f"{k}: {short(k, old.get(k))} there, {short(k, new.get(k))} now"
                     for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k))


def read_settings(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise EvalError(f"{path} is corrupt ({e}); remove the folder {path.parent} to predict again") from None


def check_settings(model_dir: Path, settings: dict) -> None:
    """Record ``settings`` in ``model_dir``, or check they match the ones its predictions were made with.

    Predictions are never reused for another model or other settings: the error names what changed.
    """
    path = model_dir / SETTINGS_FILE
    if path.is_file():
        old = read_settings(path)
        if old == settings:
            return
        if old.get(PARAMS_KEY) != settings.get(PARAMS_KEY):
            raise EvalError(
                f"{model_dir} holds predictions of other weights: the model named {model_dir.name} changed since "
                f"(re-converted, re-exported or retrained; parameters {settings_change(old, settings)}); they are "
                "not reused: use another --out, or remove that folder to predict again")
        raise EvalError(f"{model_dir} holds predictions made with other settings ({settings_change(old, settings)}); "
                        "use another --out or remove that folder")
    write_json(path, settings)


def check_stored_settings(folder: Path, settings: dict, records: str, what: str, describe=settings_change) -> None:
    """Record ``settings`` in ``folder``, or check they are those its stored records (glob ``records``) were made
    with; ``what`` names the results in the error, ``describe(old, new)`` says what differs."""
    path = folder / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # as read back: lists, string keys
    has_records = any(folder.glob(records))
    if path.is_file() and has_records:
        old = read_settings(path)
        if old != settings:
            raise EvalError(f"{folder} holds {what} results made with other settings ({describe(old, settings)}); "
                            "use another --out or delete that folder")
        return
    if has_records:
        raise EvalError(f"{folder} holds {what} results but not their {SETTINGS_FILE}; "
                        "use another --out or delete that folder")
    write_json(path, settings)


def is_eval_output(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds what an evaluation writes (a model's settings.json, or the tables)."""
    out_dir = Path(out_dir)
    return (out_dir / "all.json").is_file() or any(out_dir.glob(f"*/{SETTINGS_FILE}"))


def prefetch(fn: Callable, items: Iterable, ahead: int = 2):
    """``map(fn, items)`` computed ``ahead`` items early in a background thread (image decoding)."""
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queue = collections.deque(pool.submit(fn, x) for x in islice(items, ahead))
        while queue:
            result = queue.popleft().result()
            for x in islice(items, 1):
                queue.append(pool.submit(fn, x))
            yield result


def progress(iterable, total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar over ``iterable``; ``initial``: items already done before it (a resumed run)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                initial=initial)


@dataclasses.dataclass
class DatasetResult:
    """One model on one dataset: dataset scores, per-image scores, and what was (re)computed."""

    model: str
    dataset: str
    results: dict
    per_image: list[dict]
    computed: list[str]
    reused: list[str]
    skipped: list[tuple[str, str]]
    pred_dir: Path
    suite: MetricSuite = dataclasses.field(repr=False, default=None)


def evaluate_dataset(seg, dataset: Dataset, out_dir: str | os.PathLike, *,
                     metrics: Sequence[str] | None = None, skip_bad: bool = False,
                     show_progress: bool = True) -> DatasetResult:
    """Predict (or reuse) and score every image of ``dataset`` with ``seg`` (a ``BoxSegmenter``).

    Writes ``<out>/<model>/<dataset>/<name>.png`` and ``<out>/<model>/<dataset>.json``
    (results, per-image scores, settings). A corrupt image raises ``ImageReadError``
    unless ``skip_bad`` (then it is left out and listed in ``skipped``).
    """
    metrics = tuple(metrics) if metrics else default_metrics(dataset.name)
    if GALLERY_METRIC not in metrics:
        metrics += (GALLERY_METRIC,)
    model_dir = Path(out_dir) / seg.name
    pred_dir = model_dir / dataset.name
    settings = model_settings(seg)
    check_settings(model_dir, settings)
    pred_dir.mkdir(parents=True, exist_ok=True)
    outputs.clean_stale(pred_dir)  # temporaries of a killed run
    suite = MetricSuite(metrics)
    done = {s.name for s in dataset.samples if prediction_path(out_dir, seg.name, dataset.name, s.name).is_file()}
    computed, reused, skipped = [], [], []

    def read(sample: Sample):
        try:
            gt = sample.read_mask()
            if sample.name in done:
                pred = read_prediction(pred_dir / f"{sample.name}.png", gt.shape)
                if pred is not None:
                    return sample, gt, None, pred, None
            return sample, gt, sample.read_image(), None, None
        except images.ImageReadError as e:
            return sample, None, None, None, e

    desc = f"{seg.name} {dataset.name}"
    for sample, gt, image, pred, err in progress(prefetch(read, dataset.samples), len(dataset), desc, show_progress):
        if err is not None:
            if not skip_bad:
                raise images.ImageReadError(f"{err} (or leave bad images out: eval.py --skip_bad)")
            skipped.append((sample.name, str(err)))
            continue
        if pred is None:
            if image.shape[:2] != gt.shape:
                raise images.ImageReadError(
                    f"{sample.image_path}: image is {image.shape[:2]} but its mask is {gt.shape}")
            seg.set_image(image)
            mask = seg.predict_box(seg.gt_box(gt)).mask
            write_mask_png(pred_dir / f"{sample.name}.png", mask)
            pred = mask.astype(np.uint8) * 255
            computed.append(sample.name)
        else:
            reused.append(sample.name)
        suite.update(pred, gt, sample.name)
    if not len(suite):
        raise EvalError(f"dataset {dataset.name}: no image could be evaluated")
    result = DatasetResult(seg.name, dataset.name, suite.results(), suite.per_image, computed, reused,
                           skipped, pred_dir, suite)
    write_json(model_dir / f"{dataset.name}.json",
               dict(results=result.results, settings=settings, per_image=result.per_image,
                    skipped=[list(s) for s in skipped]))
    return result


def score_folder(pred_dir: str | os.PathLike, dataset: Dataset, metrics: Sequence[str] | None = None,
                 show_progress: bool = False) -> MetricSuite:
    """Score the predictions ``<pred_dir>/<name>.png`` of ``dataset`` against its GT (same metric path).

    Any 0..255 map is accepted (scored as saved, not re-thresholded); a missing prediction is an error.
    """
    metrics = tuple(metrics) if metrics else default_metrics(dataset.name)
    suite = MetricSuite(metrics)
    for s in progress(dataset.samples, len(dataset), f"scoring {pred_dir}", show_progress):
        path = Path(pred_dir) / f"{s.name}.png"
        if not path.is_file():
            raise EvalError(f"{path}: prediction for {dataset.name}/{s.name} not found")
        suite.update(images.read_mask(path), s.read_mask(), s.name)
    return suite


def worst_cases(result: DatasetResult, dataset: Dataset, k: int = 8, metric: str = GALLERY_METRIC) -> list[tuple]:
    """The gallery cases (name, image, gt, pred path, score) of the ``k`` worst images (image, gt: a path or a
    file object, ``Sample.image_file``)."""
    by_name = {s.name: s for s in dataset.samples}
    return [(r["name"], by_name[r["name"]].image_file(), by_name[r["name"]].mask_file(),
             str(result.pred_dir / f"{r['name']}.png"), r[metric])
            for r in result.suite.worst(metric, k)]
