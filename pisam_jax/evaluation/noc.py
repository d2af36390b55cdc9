"""The interactive-segmentation field's protocol: clicks one at a time, NoC@85/90/95, NoF, mean IoU after k clicks.

    segs = [BoxSegmenter.load(d, geometry="stretch") for d in model_dirs]
    res = evaluate_noc(segs, [open_dataset(n, root) for n in names], out_dir)
    res.summary[model][start][dataset]   # {"NoC@90": 4.1, "NoF@90": 2, "mIoU": [21 values], "num_images": n, ...}
    write_reports(res, out_dir, datasets)  # noc.md|csv|json, noc_iou.csv, noc.png, galleries/noc_*.png

For every model and image the encoder runs once; then each start runs up to ``max_clicks`` (20) clicks, each
placed by the RITM clicker (``clicker``) on the current mask at the original resolution and answered by the model
from the cached image features, re-running only the prompt path (SAM, HQ-SAM) or the interactor and the HR head
(Pi-SAM). Each family answers as it is meant to be used:

* start "box" (every family): click 0 is the mask of the object's tight box (the box evaluation's prompt).
  Pi-SAM then refines with *all* clicks so far (``Predictor.refine``: the interactor restarts from the box's
  features each time, PISAM_SPEC 6); SAM and HQ-SAM are prompted with the box, all clicks so far as points and
  their previous answer's low-res logits as the mask input.
* start "clicks" (SAM and HQ-SAM; SAM's paper evaluates so): no box. Click 1 is the object's deepest pixel
  (the clicker's click on an empty mask); SAM answers it with its three masks and the best-scored one is kept;
  later clicks come with all clicks so far and the previous low-res logits, one mask each.

IoU after k clicks (``ious[k]``; ``ious[0]`` is the box's mask, NaN for the clicks start) is computed at the
original resolution over the pixels the dataset does not mark as ignored (``datasets.MaskLabels``; GrabCut's
unlabelled band). When no error is left to click the mask stays as it is for the remaining steps. NoC and NoF
follow RITM (``clicker.noc``); the dataset's NoC@t is the mean over its images.

Seconds: the encoder per image, and per click the model's answer (prompt to mask at the original resolution)
and the clicker, each reported as the median over all measurements (robust to the first calls, which compile
one decoder per number of points for SAM and HQ-SAM, and to other jobs on the machine).

Resume: each finished (model, start, image) is ``noc/<model>/<start>/<dataset>/<name>.npz`` (written atomically):
its IoUs, clicks, seconds and small masks for the gallery. A rerun reads them back instead of running the model
(an image whose starts are all stored is not even encoded), so the reports equal an uninterrupted run's. A
record that cannot be read, or whose ground truth changed size or area, is computed again. What makes the
records is kept beside them (``noc/settings.json``: the protocol; ``noc/<model>/settings.json``: the model's
settings and the fingerprint of its parameters); other values stop the run with an error naming them rather
than mixing results.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from pisam_jax import outputs
from pisam_jax.data import images
from pisam_jax.data.datasets import Dataset, Sample, read_labels
from pisam_jax.evaluation import clicker, loop, reports
from pisam_jax.evaluation.clicker import MAX_CLICKS, THRESHOLDS, Clicker
from pisam_jax.evaluation.reports import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

STARTS = ("box", "clicks")
GALLERY_STEPS = (0, 1, 3, 5, 10, 20)  # masks kept for the gallery (those within max_clicks and the start)
GALLERY_TILE = 160  # gallery panel height in pixels
PROTOCOL = "ritm-clicker-1"  # changes when the clicker or the answers change (old records are then refused)


@dataclasses.dataclass
class NocResult:
    models: list[str]
    datasets: list[str]
    thresholds: tuple[float, ...]
    max_clicks: int
    summary: dict  # {model: {start: {dataset: {"NoC@85": .., "NoF@85": .., "mIoU": [..], "num_images": n, ...}}}}
    timing: dict  # {model: {start: {"s_encoder": .., "s_per_click": .., "s_clicker": .., "clicks": n}}}
    records: dict = dataclasses.field(repr=False)  # (model, start, dataset, name) -> record (gallery masks on disk)
    out_dir: Path | None = None
    computed: int = 0  # (model, start, image) runs computed in this call; the others were read back
    skipped: list = dataclasses.field(default_factory=list)  # (dataset, image, reason) left out (skip_bad)


def starts_for(seg, starts: Sequence[str]) -> tuple[str, ...]:
    """The starts a model answers: Pi-SAM refines a box's mask, so only "box"."""
    return tuple(s for s in starts if s == "box" or not seg.is_pi)


def evaluate_noc(segs: Sequence, datasets: Sequence[Dataset], out_dir: str | os.PathLike, *,
                 starts: Sequence[str] = STARTS, max_clicks: int = MAX_CLICKS,
                 thresholds: Sequence[float] = THRESHOLDS, skip_bad: bool = False,
                 show_progress: bool = True) -> NocResult:
    """Run the protocol for the models ``segs`` (``BoxSegmenter``s) on ``datasets``; resumes from ``out_dir``.

    A corrupt image raises ``ImageReadError`` unless ``skip_bad`` (then it is left out and listed in ``skipped``).
    """
    starts = tuple(dict.fromkeys(starts))
    if unknown := [s for s in starts if s not in STARTS]:
        raise loop.EvalError(f"unknown start(s) {unknown}; use {', '.join(STARTS)}")
    if max_clicks < 1:
        raise loop.EvalError(f"the number of clicks must be positive, got {max_clicks}")
    thresholds = tuple(sorted({float(t) for t in thresholds}))
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise loop.EvalError(f"IoU thresholds must lie in (0, 1], got {list(thresholds)}")
    for seg in segs:
        if seg.is_pi and not seg.model.config.interactor:
            raise loop.EvalError(f"model {seg.name} is a Pi-SAM without its interactor (a stage-1 checkpoint): "
                                 "it cannot take clicks; give a stage-2 checkpoint")
        if not starts_for(seg, starts):
            raise loop.EvalError(f"model {seg.name} (Pi-SAM) starts from a box only; add box to the starts")
    out_dir = Path(out_dir)
    noc_dir = out_dir / "noc"
    loop.check_stored_settings(noc_dir, dict(protocol=PROTOCOL, max_clicks=max_clicks, gallery_tile=GALLERY_TILE),
                               "*/*/*/*.npz", "NoC")
    for seg in segs:
        loop.check_settings(noc_dir / seg.name, loop.model_settings(seg))

    records: dict = {}
    computed, skipped = 0, {}
    for seg in segs:
        runs = starts_for(seg, starts)
        for ds in datasets:
            computed += _evaluate(seg, runs, ds, noc_dir, max_clicks, records, skipped, skip_bad, show_progress)

    def of(m, st, ds):  # in the dataset's order; images left out (skip_bad) are in no model's scores
        return [records[m, st, ds.name, s.name] for s in ds.samples if (ds.name, s.name) not in skipped]

    names = [s.name for s in segs]
    if empty := [ds.name for ds in datasets if not of(names[0], starts_for(segs[0], starts)[0], ds)]:
        raise loop.EvalError(f"dataset {empty[0]}: no image could be evaluated")
    summary = {m: {st: {ds.name: summarize(of(m, st, ds), thresholds, max_clicks) for ds in datasets}
                   for st in starts_for(seg, starts)} for m, seg in zip(names, segs)}
    timing = {m: {st: timing_of([r for ds in datasets for r in of(m, st, ds)]) for st in starts_for(seg, starts)}
              for m, seg in zip(names, segs)}
    return NocResult(names, [d.name for d in datasets], thresholds, max_clicks, summary, timing, records, out_dir,
                     computed, [(d, n, why) for (d, n), why in skipped.items()])


# ----------------------------------------------------------------------------- one model on one dataset


def _evaluate(seg, runs, ds: Dataset, noc_dir: Path, max_clicks: int, records: dict, skipped: dict, skip_bad: bool,
              show_progress: bool) -> int:
    """Every image of ``ds`` for the starts ``runs`` of ``seg``: read back or computed; returns how many computed.

    Fills ``records`` {(model, start, dataset, name): record} and ``skipped`` {(dataset, name): reason}."""
    for st in runs:
        (noc_dir / seg.name / st / ds.name).mkdir(parents=True, exist_ok=True)
        outputs.clean_stale(noc_dir / seg.name / st / ds.name)  # temporaries of a killed run

    def load(sample: Sample):
        try:
            fg, ignore = read_labels(sample, ds.labels)
            stored = {st: _read_record(record_path(noc_dir, seg.name, st, ds.name, sample.name), seg.name, st,
                                       sample.name, fg, ignore, max_clicks) for st in runs}
            image = None if all(r is not None for r in stored.values()) else sample.read_image()
            if image is not None and image.shape[:2] != fg.shape:
                raise images.ImageReadError(f"{sample.image_path}: image is {image.shape[:2]} but its mask is "
                                            f"{fg.shape}")
        except images.ImageReadError as e:
            return sample, None, None, None, None, e
        return sample, fg, ignore, stored, image, None

    computed = 0
    bar = loop.progress(loop.prefetch(load, ds.samples), len(ds), f"{seg.name} NoC {ds.name}", show_progress)
    for sample, fg, ignore, stored, image, err in bar:
        if err is not None:
            if not skip_bad:
                raise images.ImageReadError(f"{err} (or leave bad images out: eval.py --skip_bad)")
            skipped[ds.name, sample.name] = str(err)
            continue
        encoder_s = None
        if image is not None:
            t0 = time.perf_counter()
            seg.set_image(image)
            jax.block_until_ready(seg.predictor.features)
            encoder_s = time.perf_counter() - t0
        for st in runs:
            rec = stored[st]
            if rec is None:
                rec = run_image(seg, st, fg, ignore, max_clicks)
                rec.update(model=seg.name, start=st, image=sample.name, seconds_encoder=encoder_s)
                _write_record(record_path(noc_dir, seg.name, st, ds.name, sample.name), rec)
                del rec["thumbs"]  # on disk, read back for the few images of the gallery
                computed += 1
            records[seg.name, st, ds.name, sample.name] = rec
    return computed


def run_image(seg, start: str, fg: np.ndarray, ignore: np.ndarray | None, max_clicks: int) -> dict:
    """One start of one model on the image ``seg`` holds (encoded): up to ``max_clicks`` clicks.

    Returns the record: ``ious`` (max_clicks + 1; [0] the box's mask, NaN for the clicks start), ``clicks``
    [[row, col, positive], ...] at the original resolution, the seconds of the start and of each click (model
    answer, clicker), the object's size and area, and ``thumbs`` {step: small bool mask} for the gallery.
    """
    h, w = fg.shape
    clicks = Clicker(fg, ignore)
    thumb = reports.thumbnail_size(h, w, GALLERY_TILE)
    ious = [float("nan")] * (max_clicks + 1)
    thumbs = {}
    rec = dict(shape=[h, w], object_area=int(np.count_nonzero(fg)),
               ignored_area=0 if ignore is None else int(np.count_nonzero(ignore)))
    t0 = time.perf_counter()
    if start == "box":
        answer = seg.predict_box(seg.gt_box(fg.astype(np.uint8) * 255))
        box_answer = answer
        pred = answer.mask
        ious[0] = clicker.iou(pred, fg, ignore)
        thumbs[0] = reports.thumbnail(pred, thumb)
    else:
        answer = box_answer = None
        pred = np.zeros_like(fg)
    rec["seconds_start"] = time.perf_counter() - t0
    model_s, clicker_s = [], []
    for k in range(1, max_clicks + 1):
        t0 = time.perf_counter()
        c = clicks.click(pred)
        clicker_s.append(time.perf_counter() - t0)
        if c is None:  # nothing left to correct: the mask stays
            ious[k] = ious[k - 1]
            if k in GALLERY_STEPS:
                thumbs[k] = reports.thumbnail(pred, thumb)
            continue
        points, labels = clicks.points()
        t0 = time.perf_counter()
        if seg.is_pi:  # all clicks, from the box's cached features
            logits = seg.refine(box_answer, points, labels)
        else:  # all clicks, the box if any, the previous answer's low-res logits
            answer = seg.predict_points(points, labels, box=None if answer is None else answer.box,
                                        mask_input=None if answer is None else answer.low_res)
            logits = answer.logits
        pred = logits > 0
        model_s.append(time.perf_counter() - t0)
        ious[k] = clicker.iou(pred, fg, ignore)
        if k in GALLERY_STEPS:
            thumbs[k] = reports.thumbnail(pred, thumb)
    rec.update(ious=ious, clicks=[[c.row, c.col, bool(c.positive)] for c in clicks.clicks],
               seconds_clicks=model_s, seconds_clicker=clicker_s, thumbs=thumbs)
    return rec


# ----------------------------------------------------------------------------- scores


def summarize(recs: Sequence[dict], thresholds: Sequence[float], max_clicks: int) -> dict:
    """A dataset's scores from its images' records: NoC@t (mean), NoF@t (count), mIoU after 0..max_clicks."""
    ious = np.array([r["ious"] for r in recs], np.float64)  # (images, max_clicks + 1)
    out: dict = {"num_images": len(recs)}
    for t in thresholds:
        label = clicker.threshold_label(t)
        out[f"NoC@{label}"] = float(np.mean([clicker.noc(i, t, max_clicks) for i in ious]))
        out[f"NoF@{label}"] = int(sum(clicker.failed(i, t, max_clicks) for i in ious))
    out["mIoU"] = [None if np.isnan(ious[:, k]).all() else float(np.nanmean(ious[:, k]))
                   for k in range(max_clicks + 1)]
    return out


def timing_of(recs: Sequence[dict]) -> dict:
    """Medians over the records' measurements: encoder per image, model answer per click, clicker per click."""
    def median(values):
        return statistics.median(values) if values else None

    return dict(s_encoder=median([r["seconds_encoder"] for r in recs]),
                s_per_click=median([s for r in recs for s in r["seconds_clicks"]]),
                s_clicker=median([s for r in recs for s in r["seconds_clicker"]]),
                clicks=sum(len(r["seconds_clicks"]) for r in recs), images=len(recs))


def hardest(result: NocResult, model: str, start: str, dataset: str, k: int) -> list[tuple[str, dict]]:
    """The ``k`` images needing the most clicks to the middle threshold (ties: lower IoU after the last click)."""
    t = result.thresholds[len(result.thresholds) // 2]
    recs = [(key[3], r) for key, r in result.records.items() if key[:3] == (model, start, dataset)]
    recs.sort(key=lambda nr: (-clicker.noc(nr[1]["ious"], t, result.max_clicks), nr[1]["ious"][-1], nr[0]))
    return recs[:k]


# ----------------------------------------------------------------------------- reports


def write_reports(result: NocResult, out_dir: str | os.PathLike, datasets: Sequence[Dataset] = (),
                  gallery: int = 8) -> dict:
    """noc.md|csv|json, noc_iou.csv, noc.png and (``gallery`` > 0, ``datasets`` given) the galleries of the
    hardest images ``galleries/noc_<model>_<start>_<dataset>.png``. Returns {"tables": [...], "files": [...]}."""
    out_dir = Path(out_dir)
    noc = reports.noc_table(result.summary, result.thresholds, result.datasets, result.timing, result.max_clicks)
    curve = reports.noc_iou_table(result.summary, result.datasets, result.max_clicks)
    timing = reports.noc_timing_table(result.timing)
    tables = [noc, reports.noc_iou_table(result.summary, result.datasets, result.max_clicks, brief=True), timing]
    files = [
        reports.atomic_write_text(out_dir / "noc.md", "\n".join(reports.to_markdown(t) for t in tables)),
        reports.atomic_write_text(out_dir / "noc.csv", reports.to_csv(noc)),
        reports.atomic_write_text(out_dir / "noc_iou.csv", reports.to_csv(curve)),
        write_json(out_dir / "noc.json", dict(summary=result.summary, timing=result.timing,
                                              thresholds=list(result.thresholds), max_clicks=result.max_clicks,
                                              per_image=per_image(result))),
        reports.plot_noc(result.summary, out_dir / "noc.png", result.thresholds),
    ]
    by_name = {d.name: d for d in datasets}
    for m in result.models if gallery > 0 else ():
        for st, per in result.summary[m].items():
            for d in per:
                if d in by_name:
                    files.append(reports.noc_gallery(_gallery_rows(result, by_name[d], m, st, gallery),
                                                     out_dir / "galleries" / f"noc_{m}_{st}_{d}.png",
                                                     tile=GALLERY_TILE))
    return {"tables": tables, "files": files}


def per_image(result: NocResult) -> list[dict]:
    """Every (model, start, image): its IoUs, NoC per threshold and clicks (no thumbnails)."""
    out = []
    for (m, st, d, name), r in result.records.items():
        out.append(dict(model=m, start=st, dataset=d, image=name, ious=r["ious"], clicks=r["clicks"],
                        **{f"NoC@{clicker.threshold_label(t)}": clicker.noc(r["ious"], t, result.max_clicks)
                           for t in result.thresholds}))
    return out


def _gallery_rows(result: NocResult, ds: Dataset, model: str, start: str, k: int) -> list[dict]:
    by_name = {s.name: s for s in ds.samples}
    t = result.thresholds[len(result.thresholds) // 2]
    rows = []
    for name, r in hardest(result, model, start, ds.name, k):
        thumbs = read_thumbs(record_path(result.out_dir / "noc", model, start, ds.name, name))
        h, w = r["shape"]
        th, tw = reports.thumbnail_size(h, w, GALLERY_TILE)
        sample = by_name[name]
        image = reports.thumbnail(sample.read_image(), (th, tw))
        gt = reports.thumbnail(read_labels(sample, ds.labels)[0], (th, tw))
        scale = np.array([tw / w, th / h])
        clicks = [((col + 0.5) * scale[0] - 0.5, (row + 0.5) * scale[1] - 0.5, pos) for row, col, pos in r["clicks"]]
        n = clicker.noc(r["ious"], t, result.max_clicks)
        reached = "never" if clicker.failed(r["ious"], t, result.max_clicks) else str(n)
        rows.append(dict(caption=f"{name}   NoC@{clicker.threshold_label(t)} = {reached}", image=image, gt=gt,
                         clicks=clicks, steps=[(s, thumbs[s], r["ious"][s]) for s in sorted(thumbs)]))
    return rows


# ----------------------------------------------------------------------------- resume


def record_path(noc_dir: Path, model: str, start: str, dataset: str, name: str) -> Path:
    return Path(noc_dir) / model / start / dataset / f"{name}.npz"


def _write_record(path: Path, rec: dict) -> None:
    """One (model, start, image) as one atomic ``.npz``: the record as JSON and its gallery masks."""
    thumbs = rec["thumbs"]
    meta = {k: v for k, v in rec.items() if k != "thumbs"}
    meta["ious"] = [None if np.isnan(v) else v for v in meta["ious"]]
    meta["thumb_steps"] = sorted(thumbs)
    buf = io.BytesIO()
    np.savez_compressed(buf, record=np.array(json.dumps(meta)),
                        thumbs=np.stack([thumbs[s] for s in sorted(thumbs)]) if thumbs else np.zeros((0, 1, 1), bool))
    atomic_write_bytes(path, buf.getvalue())


def read_thumbs(record) -> dict[int, np.ndarray]:
    """The gallery's small masks {step: (h, w) bool} of a record file (a path, or an open ``np.load``)."""
    if not isinstance(record, np.lib.npyio.NpzFile):
        with np.load(record, allow_pickle=False) as z:
            return read_thumbs(z)
    steps = json.loads(str(record["record"]))["thumb_steps"]
    thumbs = record["thumbs"]
    if len(thumbs) != len(steps):
        raise ValueError(f"{len(thumbs)} gallery masks for {len(steps)} steps")
    return dict(zip(steps, thumbs))


def _read_record(path: Path, model: str, start: str, name: str, fg: np.ndarray, ignore: np.ndarray | None,
                 max_clicks: int) -> dict | None:
    """A stored record, or None (with a warning when one exists) when there is none that can be used."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            rec = json.loads(str(z["record"]))
            read_thumbs(z)  # the gallery's masks must be readable too
        if (rec.get("model"), rec.get("start"), rec.get("image")) != (model, start, name):
            raise ValueError(f"it is not a record of {model} ({start}) on {name}")
        if len(rec["ious"]) != max_clicks + 1:
            raise ValueError(f"it has {len(rec['ious']) - 1} clicks, not {max_clicks}")
        rec["ious"] = [float("nan") if v is None else float(v) for v in rec["ious"]]
    except Exception as e:  # any unreadable record is simply computed again
        log.warning("%s: unreadable NoC record (%s: %s); computing it again", path, type(e).__name__, e)
        return None
    area = (int(np.count_nonzero(fg)), 0 if ignore is None else int(np.count_nonzero(ignore)))
    if rec["shape"] != list(fg.shape) or (rec["object_area"], rec["ignored_area"]) != area:
        log.warning("%s: the ground truth changed (%s, object %d px there; %s, %d px now); computing it again",
                    path, rec["shape"], rec["object_area"], list(fg.shape), area[0])
        return None
    return rec
