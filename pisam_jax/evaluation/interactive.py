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
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pisam_jax.data import images
from pisam_jax.data.datasets import Dataset
from pisam_jax.evaluation import loop, protocol
from pisam_jax.evaluation.metrics import CLICK_METRICS, MetricSuite
from pisam_jax.evaluation.reports import write_json

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

    # 1. initial predictions (resumed from their PNGs)
    for seg in segs:
        for ds in datasets:
            loop.evaluate_dataset(seg, ds, out_dir, show_progress=show_progress)

    # 2. subset over the pooled datasets
    samples = {f"{ds.name}/{s.name}": (ds, s) for ds in datasets for s in ds.samples}

    def initial(key):
        ds, s = samples[key]
        gt = images.read_mask(s.mask_path)
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

    # 3. clicks
    runs = [(mode, k) for k in clicks for mode in modes if mode == "ALL" or k == modes_clicks]
    suites = {(m, r): MetricSuite(metrics) for m in names for r in [("Ori", 0), *runs]}
    per_image = []

    def load(key):
        key, gt, preds = initial(key)
        ds, s = samples[key]
        return key, gt, protocol.overlap_errors(list(preds.values()), gt), images.read_image(s.image_path)

    for seg in segs:
        for key, gt, overlap, image in loop.progress(loop.prefetch(load, subset), len(subset),
                                                     f"{seg.name} clicks", show_progress):
            seg.set_image(image)
            init = seg.predict_box(seg.gt_box(gt))
            rec = {"model": seg.name, "image": key,
                   "Ori": suites[seg.name, ("Ori", 0)].update(init.mask, gt, key)}
            for mode, k in runs:
                c = protocol.overlap_clicks(init.mask, gt, overlap, k, image_seed(seed, key, k, mode),
                                            which=MODES[mode])
                n = int(c["n"])
                logits = seg.refine(init, c["points"][:n], c["flags"][:n]) if n else init.logits
                score = suites[seg.name, (mode, k)].update(logits > 0, gt, key)
                rec[f"{mode}-{k}"] = dict(score, clicks=c["points"][:n].tolist(), flags=c["flags"][:n].tolist())
            per_image.append(rec)

    # 4. tables
    res = {key: s.results() for key, s in suites.items()}
    table2 = {m: {0: res[m, ("Ori", 0)], **{k: res[m, ("ALL", k)] for k in clicks}} for m in names}
    table7 = {m: {"Ori": res[m, ("Ori", 0)], **{mode: res[m, (mode, modes_clicks)] for mode in modes}}
              for m in names}
    write_json(out_dir / "clicks" / "per_image.json", per_image)
    return ClickResult(subset, table2, table7, per_image)
