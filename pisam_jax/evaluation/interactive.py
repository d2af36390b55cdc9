"""The click protocol (paper Tables 2 and 7; PISAM_SPEC section 6, D9) over several models.

    segs = [BoxSegmenter.load(d, geometry="stretch") for d in model_dirs]
    res = evaluate_clicks(segs, [open_dataset(n, root) for n in test_sets], out_dir, clicks=(1, 2, 5))
    res.table2   # {model: {0: {metric: v}, 1: {...}, 2: {...}, 5: {...}}}   (0 = "Ori")
    res.table7   # {model: {"Ori": {...}, "ALL": {...}, "FG": {...}, "BG": {...}}}

1. Initial predictions: ``loop.evaluate_dataset`` for every model and dataset (reused when
   their PNGs exist under ``out_dir``).
2. Subset: every image is scored with ``protocol.subset_entry`` from all models' initial
   predictions at the original resolution; ``protocol.select_subset`` keeps the ``n``
   (200) eligible images with the lowest mean initial IoU. Images from several datasets
   are pooled, keyed ``<dataset>/<name>``; the subset is written to ``clicks/subset.json``.
3. For each model and subset image, the initial prediction is recomputed (the box prompt;
   SAM and HQ-SAM need its low-res logits), then for each k the k clicks come from its
   errors inside the overlapping error area (``protocol.overlap_clicks``, at the original
   resolution: the k largest 1-px-eroded 8-connected components, one random pixel each,
   foreground clicks on missed foreground, background clicks on false positives), and
   all k clicks are given in one pass (``BoxSegmenter.refine``): SAM / HQ-SAM re-prompt with
   box + clicks + the initial low-res logits, Pi-SAM runs its interactor. The clicks'
   random pixels are seeded by (seed, image, k, mode), and with the initial predictions
   the restricted errors are the overlap itself, so every model gets the same clicks.
   When fewer than k components exist, fewer clicks are given; with none (e.g. FG-only and
   no missed foreground) the prediction stays the initial one.
4. Table 2 uses mode ALL for every k; Table 7 compares ALL / FG / BG at ``modes_clicks``
   clicks (default: the largest k; the paper does not say how many).

Resume: step 3 writes each finished (model, image) as ``clicks/<model>/<dataset>/<name>.npz``
(atomically: a temporary file, then a rename): its per-image record (scores, clicks) and
everything ``MetricSuite`` accumulated for it, for every (mode, k), in binary. The dataset
scores are not means of per-image numbers (``max_f`` and ``mean_e`` come from the mean of the
images' 256-threshold curves), so the curves are kept; a rerun adds the stored images to the
suites in subset order without predicting or scoring them again, which gives exactly the
numbers of an uninterrupted run. Only the subset's images are used: with another ``n_subset``,
``rank_by`` or pool of datasets the stored images are reused and the new ones computed. What
makes a record (models and their settings, ``clicks``, ``modes``, ``modes_clicks``, ``seed``,
``metrics``) is kept in ``clicks/settings.json``; a rerun with other values raises
``EvalError`` naming them rather than mixing results or deleting hours of work. A record that
cannot be read, or whose image's overlap changed (the initial predictions were redone), is
computed again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pisam_jax.data import images
from pisam_jax.data.datasets import Dataset
from pisam_jax.evaluation import loop, protocol
from pisam_jax.evaluation.metrics import CLICK_METRICS, MetricSuite
from pisam_jax.evaluation.reports import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

MODES = {"ALL": "both", "FG": "fg", "BG": "bg"}
CLICK_SUITE = tuple(dict.fromkeys(CLICK_METRICS + ("iou",)))


@dataclasses.dataclass
class ClickResult:
    subset: list[str]
    table2: dict  # {model: {k: {metric: value}}}, k = 0 the initial prediction
    table7: dict  # {model: {"Ori" | "ALL" | "FG" | "BG": {metric: value}}}
    per_image: list[dict]  # one record per (model, image): initial and per (mode, k) scores, clicks


def image_seed(seed: int, key: str, k: int, mode: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode()), k, list(MODES).index(mode)])


def evaluate_clicks(segs: Sequence, datasets: Sequence[Dataset], out_dir: str | os.PathLike, *,
                    clicks: Sequence[int] = (1, 2, 5), modes: Sequence[str] = ("ALL", "FG", "BG"),
                    modes_clicks: int | None = None, n_subset: int = protocol.NUM_SUBSET,
                    rank_by: str = "mean", seed: int = 0, metrics: Sequence[str] = CLICK_SUITE,
                    show_progress: bool = True) -> ClickResult:
    """Run the click protocol for the models ``segs`` (``BoxSegmenter``s) on the pooled ``datasets``."""
    clicks = sorted({int(k) for k in clicks})
    if not clicks or clicks[0] < 1:
        raise loop.EvalError(f"click counts must be positive integers, got {clicks}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise loop.EvalError(f"unknown click mode(s) {unknown}; use {', '.join(MODES)}")
    modes = ["ALL"] + [m for m in dict.fromkeys(modes) if m != "ALL"]
    modes_clicks = clicks[-1] if modes_clicks is None else int(modes_clicks)
    out_dir = Path(out_dir)
    names = [s.name for s in segs]
    metrics = tuple(dict.fromkeys(metrics))
    runs = [(mode, k) for k in clicks for mode in modes if mode == "ALL" or k == modes_clicks]
    labels = ["Ori"] + [f"{mode}-{k}" for mode, k in runs]
    check_click_settings(out_dir / "clicks", dict(models={s.name: loop.model_settings(s) for s in segs}, clicks=clicks,
                                            modes=modes, modes_clicks=modes_clicks, seed=seed,
                                            metrics=list(metrics)))

    # 1. initial predictions (resumed from their PNGs)
    for seg in segs:
        for ds in datasets:
            loop.evaluate_dataset(seg, ds, out_dir, show_progress=show_progress)

    # 2. subset over the pooled datasets
    samples = {f"{ds.name}/{s.name}": (ds, s) for ds in datasets for s in ds.samples}

    def initial(key):
        ds, s = samples[key]
        gt = s.read_mask()
        preds = {m: images.read_mask(loop.prediction_path(out_dir, m, ds.name, s.name)) for m in names}
        return key, gt, preds

    entries = []
    for key, gt, preds in loop.progress(loop.prefetch(initial, samples), len(samples), "click subset", show_progress):
        entries.append(protocol.subset_entry(key, preds, gt))
    subset = protocol.select_subset(entries, n_subset, rank_by)
    protocol.write_subset(out_dir / "clicks" / "subset.json", subset, entries, models=names, rank_by=rank_by,
                          n=n_subset, seed=seed)
    if not subset:
        raise loop.EvalError("no image has an overlapping error area that can take a click; "
                             "the click protocol has nothing to evaluate")

    # 3. clicks: each finished (model, image) is stored; a rerun reads it back instead
    overlap_area = {e.name: e.overlap_area for e in entries}
    state_keys = MetricSuite(metrics).image_state_keys()
    records = {}  # (model, image) -> (per-image record, {label: accumulated state})
    for m in names:
        for key in subset:
            path = record_path(out_dir, m, key)
            if path.is_file():
                records[m, key] = _read_record(path, m, key, labels, state_keys, overlap_area[key])
    records = {k: v for k, v in records.items() if v is not None}

    def load(key):
        key, gt, preds = initial(key)
        ds, s = samples[key]
        return key, gt, protocol.overlap_errors(list(preds.values()), gt), s.read_image()

    for seg in segs:
        todo = [key for key in subset if (seg.name, key) not in records]
        if len(todo) < len(subset):
            log.info("%s clicks: %d of %d images read back from %s", seg.name, len(subset) - len(todo),
                     len(subset), out_dir / "clicks" / seg.name)
        for key, gt, overlap, image in loop.progress(loop.prefetch(load, todo), len(subset), f"{seg.name} clicks",
                                                     show_progress, initial=len(subset) - len(todo)):
            seg.set_image(image)
            init = seg.predict_box(seg.gt_box(gt))
            rec = {"model": seg.name, "image": key}
            states = {}
            rec["Ori"], states["Ori"] = _score(metrics, init.mask, gt, key)
            for (mode, k), label in zip(runs, labels[1:]):
                c = protocol.overlap_clicks(init.mask, gt, overlap, k, image_seed(seed, key, k, mode),
                                            which=MODES[mode])
                n = int(c["n"])
                logits = seg.refine(init, c["points"][:n], c["flags"][:n]) if n else init.logits
                score, states[label] = _score(metrics, logits > 0, gt, key)
                rec[label] = dict(score, clicks=c["points"][:n].tolist(), flags=c["flags"][:n].tolist())
            _write_record(record_path(out_dir, seg.name, key), rec, states, overlap_area[key])
            records[seg.name, key] = rec, states

    suites = {(m, label): MetricSuite(metrics) for m in names for label in labels}
    per_image = []
    for m in names:  # in subset order, as an uninterrupted run
        for key in subset:
            rec, states = records[m, key]
            for label in labels:
                suites[m, label].add_image({k: v for k, v in rec[label].items() if k not in ("clicks", "flags")},
                                           states[label])
            per_image.append(rec)

    # 4. tables
    res = {key: s.results() for key, s in suites.items()}
    table2 = {m: {0: res[m, "Ori"], **{k: res[m, f"ALL-{k}"] for k in clicks}} for m in names}
    table7 = {m: {"Ori": res[m, "Ori"], **{mode: res[m, f"{mode}-{modes_clicks}"] for mode in modes}}
              for m in names}
    write_json(out_dir / "clicks" / "per_image.json", per_image)
    return ClickResult(subset, table2, table7, per_image)


# ----------------------------------------------------------------------------- resume


def record_path(out_dir: str | os.PathLike, model: str, key: str) -> Path:
    """Where the click stage stores a finished (model, ``<dataset>/<name>``) pair."""
    return Path(out_dir) / "clicks" / model / f"{key}.npz"


def check_click_settings(clicks_dir: Path, settings: dict) -> None:
    """Record ``settings`` in ``clicks_dir``, or check they are those its stored records were made with."""
    loop.check_stored_settings(clicks_dir, settings, "*/*/*.npz", "click", _click_settings_change)


def _click_settings_change(old: dict, new: dict) -> str:
    """What differs, models named one by one (a changed model says which of its settings or weights)."""
    parts = []
    old_models, new_models = old.get("models") or {}, new.get("models") or {}
    if set(old_models) != set(new_models):
        parts.append(f"models: {', '.join(old_models)} there, {', '.join(new_models)} now")
    for m in new_models:
        if m in old_models and old_models[m] != new_models[m]:
            parts.append(f"model {m}: {loop.settings_change(old_models[m], new_models[m])}")
    rest = loop.settings_change({k: v for k, v in old.items() if k != "models"},
                                {k: v for k, v in new.items() if k != "models"})
    return "; ".join(parts + ([rest] if rest else []))


def _score(metrics: Sequence[str], mask: np.ndarray, gt: np.ndarray, key: str) -> tuple[dict, dict]:
    """One image's per-image scores and what a ``MetricSuite`` accumulates for it (``MetricSuite.add_image``)."""
    suite = MetricSuite(metrics)
    return suite.update(mask, gt, key), suite.image_state()


def _write_record(path: Path, rec: dict, states: dict, overlap_area: int) -> None:
    """One (model, image): its record as JSON and its metric states in binary, in one atomic ``.npz``."""
    arrays = {f"{label}:{k}": v for label, state in states.items() for k, v in state.items()}
    buf = io.BytesIO()
    np.savez(buf, record=np.array(json.dumps(rec)), overlap_area=np.array(overlap_area, np.int64), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _read_record(path: Path, model: str, key: str, labels: Sequence[str], state_keys: Sequence[str],
                 overlap_area: int) -> tuple[dict, dict] | None:
    """A stored (model, image) as (record, states), or None (with a warning) when it cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            rec = json.loads(str(z["record"]))
            states = {label: {k: z[f"{label}:{k}"] for k in state_keys} for label in labels}
            stored_area = int(z["overlap_area"])
        if rec.get("model") != model or rec.get("image") != key or any(label not in rec for label in labels):
            raise ValueError(f"it is not a record of {model} on {key} with {', '.join(labels)}")
    except Exception as e:  # any unreadable record is simply computed again
        log.warning("%s: unreadable click record (%s: %s); computing it again", path, type(e).__name__, e)
        return None
    if stored_area != overlap_area:
        log.warning("%s: the overlapping error area changed (%d -> %d pixels: initial predictions redone); "
                    "computing it again", path, stored_area, overlap_area)
        return None
    return rec, states
