"""Reports: the paper's tables as Markdown / CSV / JSON, metric-versus-clicks plots, worst-case galleries.

Results come in as nested dicts of floats (what ``MetricSuite.results()`` gives, per model
and dataset):

* ``{model: {dataset: {metric: value}}}`` for Tables 1 (DIS5K), 3 (HRSOD/UHRSD), 4 (BIG);
* ``{model: {n_clicks: {metric: value}}}`` for Table 2, ``n_clicks`` 0 being the initial
  ("Ori") prediction;
* ``{model: {mode: {metric: value}}}`` for Table 7, mode in ``Ori``/``ALL``/``BG``/``FG``;
* ``{model: {start: {dataset: {"NoC@90": .., "NoF@90": .., "mIoU": [..]}}}}`` for the interactive
  field's NoC tables (``noc_table``, ``noc_iou_table``, ``plot_noc``, ``noc_gallery``; ``evaluation.noc``).

A table builder returns a ``Table``; ``write_table`` writes ``<stem>.md``, ``<stem>.csv``
(the same cells, numbers at full precision) and ``<stem>.json`` (the results it was
built from). Every file is written to a temporary name and renamed into place.
Markdown marks the best value of a row in bold (direction-aware: MAE and HCE lower is
better); in the click tables, as in the paper, an interactive value is bold when it
improves on the initial one. Missing values print as ``-`` (empty in CSV).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pisam_jax import outputs
from pisam_jax.evaluation.clicker import threshold_label
from pisam_jax.evaluation.metrics import (BIG_METRICS, CLICK_METRICS, DIS_METRICS, LOWER_IS_BETTER,
                                          SOD_METRICS)

METRIC_LABELS = {  # Markdown labels, as the paper writes them (GitHub renders the $...$)
    "max_f": r"$F_{\beta}^x$ ↑",
    "mean_f": r"$F_{\beta}^m$ ↑",
    "weighted_f": r"$F_{\beta}^{\omega}$ ↑",
    "mae": r"$\mathcal{M}$ ↓",
    "s_measure": r"$S_m$ ↑",
    "mean_e": r"$E_{\phi}^m$ ↑",
    "max_e": r"$E_{\phi}^x$ ↑",
    "hce": r"$HCE_{\gamma}$ ↓",
    "iou": "IoU ↑",
    "boundary_iou": "Bnd IoU ↑",
    "mba": "mBA ↑",
}
PLAIN_LABELS = {"max_f": "max F", "mean_f": "mean F", "weighted_f": "weighted F", "mae": "MAE",
                "s_measure": "S-measure", "mean_e": "mean E", "max_e": "max E", "hce": "HCE",
                "iou": "IoU", "boundary_iou": "Boundary IoU", "mba": "mBA"}
DIS_DATASETS = ("DIS5K-TE1", "DIS5K-TE2", "DIS5K-TE3", "DIS5K-TE4", "DIS5K-TE(1-4)", "DIS5K-VD")
SOD_DATASETS = ("HRSOD-TE", "UHRSD-TE")
BIG_DATASETS = ("BIG_test", "BIG_val")
CLICK_MODES = ("Ori", "ALL", "BG", "FG")  # paper Table 7 column order
DATASET_LABELS = {"DIS5K-TE1": "DIS-TE1", "DIS5K-TE2": "DIS-TE2", "DIS5K-TE3": "DIS-TE3",
                  "DIS5K-TE4": "DIS-TE4", "DIS5K-TE(1-4)": "DIS-TE(1-4)", "DIS5K-VD": "DIS-VD",
                  "HRSOD-TE": "HRSOD", "UHRSD-TE": "UHRSD", "BIG_test": "BIG Test", "BIG_val": "BIG Val"}


# ----------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A report table: ``keys`` label columns then value columns; one ``Row`` per line."""

    title: str
    key_columns: list[str]
    value_columns: list[str]  # CSV / JSON header names
    value_labels: list[str]  # Markdown header labels
    rows: list["Row"] = field(default_factory=list)
    column_metrics: list[str] | None = None  # per value column, when columns (not rows) are metrics


@dataclass
class Row:
    keys: list[str]  # CSV cells of the label columns
    key_labels: list[str]  # Markdown cells of the label columns ("" repeats are blanked)
    metric: str
    values: list[float | None]
    bold: list[bool]


def _value(d: Mapping, *path) -> float | None:
    for k in path:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    if d is None:  # NaN written to JSON comes back as null
        return None
    v = float(d)
    return None if math.isnan(v) else v


def _best_mask(metric: str, values: Sequence[float | None]) -> list[bool]:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return [False] * len(values)
    best = min(present) if metric in LOWER_IS_BETTER else max(present)
    return [v is not None and v == best for v in values]


def _improved(metric: str, before: float | None, after: float | None) -> bool:
    if before is None or after is None:
        return False
    return after < before if metric in LOWER_IS_BETTER else after > before


def format_value(metric: str, value: float | None) -> str:
    """3 decimals; counts (HCE, NoF@t, num_*) as integers, NoC@t with 2 decimals (as the field prints it),
    seconds (s_*) with 3 significant digits; ``-`` when missing."""
    if value is None:
        return "-"
    if metric == "hce" or metric.startswith(("NoF@", "num_")):
        return f"{value:.0f}"
    if metric.startswith("NoC@"):
        return f"{value:.2f}"
    if metric.startswith("s_"):
        return f"{value:.3g}"
    return f"{value:.3f}"


def _models(results: Mapping, models: Sequence[str] | None) -> list[str]:
    return list(models) if models is not None else list(results)


def _ordered(found, preferred: Sequence) -> list:
    """The preferred keys present in ``found`` in that order, then the others as found."""
    found = list(dict.fromkeys(found))
    return [k for k in preferred if k in found] + [k for k in found if k not in preferred]


def add_dis_te_mean(results: Mapping, sets: Sequence[str] = DIS_DATASETS[:4],
                    name: str = "DIS5K-TE(1-4)") -> dict:
    """A copy of ``{model: {dataset: {metric}}}`` with ``name`` = the mean of the four test sets' scores.

    DIS5K's "DIS-TE(1-4)" row is the average of the four subsets' scores (each subset
    weighted equally), not a pool of their images. Models missing a set get no row.
    """
    out = {m: {d: dict(v) for d, v in per.items()} for m, per in results.items()}
    for model, per in out.items():
        if not all(s in per for s in sets):
            continue
        metrics = set.intersection(*(set(per[s]) for s in sets))
        out[model][name] = {k: float(np.mean([per[s][k] for s in sets])) for k in sorted(metrics)}
    return out


def dis_table(results: Mapping, models: Sequence[str] | None = None,
              datasets: Sequence[str] | None = None, metrics: Sequence[str] = DIS_METRICS) -> Table:
    """Paper Table 1: rows dataset x metric, columns models; best model of a row in bold."""
    models = _models(results, models)
    if datasets is None:
        datasets = _ordered([d for m in models for d in results.get(m, {})], DIS_DATASETS)
    t = Table("Results on DIS5K", ["dataset", "metric"], list(models), list(models))
    for d in datasets:
        for i, k in enumerate(metrics):
            vals = [_value(results, m, d, k) for m in models]
            t.rows.append(Row([d, k], [DATASET_LABELS.get(d, d) if i == 0 else "", METRIC_LABELS.get(k, k)],
                              k, vals, _best_mask(k, vals)))
    return t


def _per_model_table(title, results, models, datasets, metrics, preferred) -> Table:
    models = _models(results, models)
    if datasets is None:
        datasets = _ordered([d for m in models for d in results.get(m, {})], preferred)
    cols = [f"{d}/{k}" for d in datasets for k in metrics]
    labels = [f"{DATASET_LABELS.get(d, d)} {METRIC_LABELS.get(k, k)}" for d in datasets for k in metrics]
    t = Table(title, ["model"], cols, labels)
    rows_vals = [[_value(results, m, d, k) for d in datasets for k in metrics] for m in models]
    # bold: best model in each column
    col_best = [_best_mask(metrics[j % len(metrics)], [rv[j] for rv in rows_vals]) for j in range(len(cols))]
    for i, m in enumerate(models):
        bold = [col_best[j][i] for j in range(len(cols))]
        t.rows.append(Row([m], [m], "", rows_vals[i], bold))
    t.column_metrics = [metrics[j % len(metrics)] for j in range(len(cols))]
    return t


def sod_table(results: Mapping, models: Sequence[str] | None = None,
              datasets: Sequence[str] | None = None, metrics: Sequence[str] = SOD_METRICS) -> Table:
    """Paper Table 3: rows models, columns dataset x metric (HRSOD, UHRSD; S_m, F^x, E^m, M)."""
    return _per_model_table("High-resolution salient object detection", results, models, datasets,
                            metrics, SOD_DATASETS)


def big_table(results: Mapping, models: Sequence[str] | None = None,
              datasets: Sequence[str] | None = None, metrics: Sequence[str] = BIG_METRICS) -> Table:
    """Paper Table 4: rows models, columns dataset x metric (BIG test / val; IoU, mBA)."""
    return _per_model_table("Zero-shot on BIG", results, models, datasets, metrics, BIG_DATASETS)


def clicks_table(results: Mapping, models: Sequence[str] | None = None,
                 clicks: Sequence[int] | None = None, metrics: Sequence[str] = CLICK_METRICS) -> Table:
    """Paper Table 2: rows n_clicks x metric, columns ``Ori-<model>``, ``<model>`` per model.

    ``results[model][0]`` is the initial prediction; ``clicks`` defaults to every
    positive count present. An after-click value is bold when it improves on ``Ori``.
    """
    models = _models(results, models)
    norm = {m: {int(k): v for k, v in results.get(m, {}).items()} for m in models}
    if clicks is None:
        clicks = sorted({k for m in models for k in norm[m] if k > 0})
    cols, labels = [], []
    for m in models:
        cols += [f"Ori-{m}", m]
        labels += [f"Ori-{m}", m]
    t = Table("Interactive correction of wrongly predicted areas", ["points", "metric"], cols, labels)
    for n in clicks:
        for i, k in enumerate(metrics):
            vals, bold = [], []
            for m in models:
                ori, after = _value(norm, m, 0, k), _value(norm, m, n, k)
                vals += [ori, after]
                bold += [False, _improved(k, ori, after)]
            t.rows.append(Row([str(n), k], [str(n) if i == 0 else "", METRIC_LABELS.get(k, k)], k, vals, bold))
    return t


def click_modes_table(results: Mapping, models: Sequence[str] | None = None,
                      modes: Sequence[str] = CLICK_MODES, metrics: Sequence[str] = CLICK_METRICS) -> Table:
    """Paper Table 7: rows model x metric, columns Ori / ALL / BG / FG; best mode of a row in bold."""
    models = _models(results, models)
    t = Table("Preference for click types", ["model", "metric"], list(modes), list(modes))
    for m in models:
        for i, k in enumerate(metrics):
            vals = [_value(results, m, mode, k) for mode in modes]
            t.rows.append(Row([m, k], [m if i == 0 else "", METRIC_LABELS.get(k, k)], k, vals, _best_mask(k, vals)))
    return t


START_LABELS = {"box": "box + clicks", "clicks": "clicks only"}


def _lowest(values: Sequence[float | None]) -> list[bool]:
    """Bold marks for the lowest values of a column; none when all are equal (nothing to point at)."""
    present = [v for v in values if v is not None]
    if len(present) < 2 or min(present) == max(present):
        return [False] * len(values)
    return [v is not None and v == min(present) for v in values]


def _noc_rows(summary: Mapping) -> list[tuple[str, str]]:
    return [(m, st) for m, per in summary.items() for st in per]


def noc_table(summary: Mapping, thresholds: Sequence[float], datasets: Sequence[str],
              timing: Mapping | None = None, max_clicks: int = 20) -> Table:
    """The interactive field's table: rows (model, start), per dataset NoC@t then NoF@t for each threshold,
    then the seconds per click when ``timing`` is given; the lowest of a column in bold.

    ``summary``: {model: {start: {dataset: {"NoC@90": .., "NoF@90": .., ...}}}} (``noc.evaluate_noc``).
    """
    labels = [threshold_label(t) for t in thresholds]
    metrics = [f"NoC@{t}" for t in labels] + [f"NoF@{t}" for t in labels]
    cols = [f"{d}/{k}" for d in datasets for k in metrics]
    col_labels = [f"{DATASET_LABELS.get(d, d)} {k}" for d in datasets for k in metrics]
    col_metrics = [k for _ in datasets for k in metrics]
    keys = _noc_rows(summary)
    values = [[_value(summary, m, st, d, k) for d in datasets for k in metrics] for m, st in keys]
    if timing is not None:
        cols, col_labels = cols + ["s_per_click"], col_labels + ["s / click"]
        col_metrics = col_metrics + ["s_per_click"]
        for (m, st), v in zip(keys, values):
            v.append(_value(timing, m, st, "s_per_click"))
    t = Table(f"Clicks to reach an IoU: NoC@t the mean number ({max_clicks} when never reached), NoF@t the images "
              f"that never reach it in {max_clicks} clicks", ["model", "start"], cols, col_labels,
              column_metrics=col_metrics)
    bold = [_lowest([v[j] for v in values]) for j in range(len(cols))]
    for i, ((m, st), v) in enumerate(zip(keys, values)):
        t.rows.append(Row([m, st], [m, START_LABELS.get(st, st)], "", v, [b[i] for b in bold]))
    return t


NOC_BRIEF_CLICKS = (0, 1, 2, 3, 5, 10, 15, 20)


def _value_at(seq, k):
    return None if seq is None or k >= len(seq) or seq[k] is None else float(seq[k])


def noc_iou_table(summary: Mapping, datasets: Sequence[str], max_clicks: int, brief: bool = False) -> Table:
    """Mean IoU after k clicks: rows (dataset, model, start), columns k = 0..max_clicks (``brief``: a few k);
    k = 0 is the box's mask (none for the clicks-only start). The highest of a dataset's column in bold."""
    clicks = [k for k in (NOC_BRIEF_CLICKS if brief else range(max_clicks + 1)) if k <= max_clicks]
    t = Table("Mean IoU after k clicks (0: the box alone)", ["dataset", "model", "start"], [str(k) for k in clicks],
              [str(k) for k in clicks])
    for d in datasets:
        keys = [(m, st) for m, st in _noc_rows(summary) if d in summary[m][st]]
        values = [[_value_at(summary[m][st][d].get("mIoU"), k) for k in clicks] for m, st in keys]
        bold = [_best_mask("iou", [v[j] for v in values]) for j in range(len(clicks))]
        for i, ((m, st), v) in enumerate(zip(keys, values)):
            t.rows.append(Row([d, m, st], [DATASET_LABELS.get(d, d) if i == 0 else "", m, START_LABELS.get(st, st)],
                              "iou", v, [b[i] for b in bold]))
    return t


def noc_timing_table(timing: Mapping) -> Table:
    """Seconds per model and start (medians): the encoder per image, the model's answer per click, the clicker
    per click; and how many clicks were measured."""
    cols = ["s_encoder", "s_per_click", "s_clicker", "num_clicks"]
    t = Table("Seconds (medians): encoder per image, model answer per click (never the encoder), clicker per click",
              ["model", "start"], cols, ["encoder s / image", "model s / click", "clicker s / click", "clicks"],
              column_metrics=cols)
    for m, st in _noc_rows(timing):
        v = [_value(timing, m, st, k) for k in cols[:3]] + [_value(timing, m, st, "clicks")]
        t.rows.append(Row([m, st], [m, START_LABELS.get(st, st)], "", v, [False] * 4))
    return t


def to_markdown(table: Table) -> str:
    head = [*table.key_columns, *table.value_labels]
    lines = [f"**{table.title}**", "", "| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] * len(table.key_columns) + ["---:"] * len(table.value_labels)) + " |"]
    col_metrics = table.column_metrics
    for row in table.rows:
        cells = []
        for j, (v, b) in enumerate(zip(row.values, row.bold)):
            s = format_value(col_metrics[j] if col_metrics else row.metric, v)
            cells.append(f"**{s}**" if b else s)
        lines.append("| " + " | ".join([*row.key_labels, *cells]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.key_columns, *table.value_columns])
    for row in table.rows:
        w.writerow([*row.keys, *("" if v is None else repr(v) for v in row.values)])
    return buf.getvalue()


KEY_COLUMNS = ("dataset", "metric", "model", "points")


def read_csv(path: str | os.PathLike, key_columns: Sequence[str] = KEY_COLUMNS) -> list[dict]:
    """Rows of a table CSV as dicts; cells outside ``key_columns`` as float (None when empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{c: (v if c in key_columns else (None if v == "" else float(v))) for c, v in r.items()}
            for r in rows]


# ----------------------------------------------------------------------------- files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place (``outputs.write_file``:
    parent folders made as needed, the mode from the umask)."""
    return outputs.write_file(path, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) else v
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    """Atomic JSON (numpy scalars as Python numbers, NaN as null, keys as strings)."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_table(table: Table, results: Mapping, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """``<out_dir>/<stem>.md``, ``.csv``, ``.json`` (the results); returns the three paths."""
    out_dir = Path(out_dir)
    return {
        "md": atomic_write_text(out_dir / f"{stem}.md", to_markdown(table)),
        "csv": atomic_write_text(out_dir / f"{stem}.csv", to_csv(table)),
        "json": write_json(out_dir / f"{stem}.json", results),
    }


def _save_figure(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- plots


def plot_clicks(results: Mapping, path: str | os.PathLike, metrics: Sequence[str] = CLICK_METRICS,
                models: Sequence[str] | None = None, title: str = "Metrics versus number of clicks",
                dpi: int = 100, *, num_images: int | None = None, datasets: Sequence[str] = ()) -> Path:
    """One panel per metric, x = number of clicks (0 = initial prediction), one line per model (PNG).

    Under the title, a caption says what a point averages: "mean over N images of DATASETS; models: A, B"
    (``num_images``, ``datasets``: the click subset's size and where it comes from)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    models = _models(results, models)
    n = len(metrics)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, k in zip(axes, metrics):
        for m in models:
            pts = sorted((int(c), _value(results, m, c, k)) for c in results.get(m, {}))
            pts = [(c, v) for c, v in pts if v is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_title(f"{PLAIN_LABELS.get(k, k)} ({'lower' if k in LOWER_IS_BETTER else 'higher'} is better)")
        ax.set_xlabel("clicks")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend()
    over = f"mean over {num_images} images" if num_images is not None else "mean over the images"
    over += f" of {', '.join(datasets)}" if datasets else ""
    fig.suptitle(f"{title}\n{over}; models: {', '.join(models)}")
    return _save_figure(fig, path)


def plot_noc(summary: Mapping, path: str | os.PathLike, thresholds: Sequence[float] = (),
             title: str = "Mean IoU versus number of clicks", dpi: int = 100) -> Path:
    """One panel per dataset: mean IoU after k clicks (0: the box alone), one line per model and start, the
    NoC thresholds dotted. ``summary`` as ``noc_table``'s (its ``mIoU`` lists)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(d for per in summary.values() for runs in per.values() for d in runs))
    ncols = min(len(datasets), 3)
    nrows = math.ceil(len(datasets) / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.6 * nrows), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = {m: f"C{i}" for i, m in enumerate(summary)}  # one colour a model, one line style a start
    for ax, d in zip(axes, datasets):
        for m, st in _noc_rows(summary):
            res = summary[m][st].get(d)
            pts = [(k, v) for k, v in enumerate(res["mIoU"] if res else []) if v is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=f"{m} ({START_LABELS.get(st, st)})",
                        color=colours[m], linestyle="-" if st == "box" else "--")
        for t in thresholds:
            ax.axhline(t, color="grey", linestyle=":", linewidth=1)
        n = next(iter(summary[m][st][d]["num_images"] for m, st in _noc_rows(summary) if d in summary[m][st]), 0)
        ax.set_title(f"{DATASET_LABELS.get(d, d)} ({n} images)")
        ax.set_xlabel("clicks")
        ax.set_ylabel("mean IoU")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[len(datasets):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------- gallery


def thumbnail_size(h: int, w: int, tile: int) -> tuple[int, int]:
    """(height, width) of a gallery panel for an h x w image: ``tile`` high, at most ``2 * tile`` wide."""
    return (tile, max(1, round(w * tile / h))) if w <= 2 * h else (max(1, round(h * 2 * tile / w)), 2 * tile)


def thumbnail(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An image (H, W, 3) uint8 or a mask (H, W) bool shrunk to ``size`` (h, w) by area averaging."""
    import cv2

    array = np.asarray(array)
    if array.dtype == np.bool_:
        small = cv2.resize(array.astype(np.uint8) * 255, size[::-1], interpolation=cv2.INTER_AREA)
        return small > 127
    return cv2.resize(array, size[::-1], interpolation=cv2.INTER_AREA)


def _load_rgb(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _load_mask(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 128


def worst_cases_gallery(cases: Sequence[tuple], path: str | os.PathLike, *, tile: int = 256,
                        metric: str = "IoU", title: str | None = None) -> Path:
    """A grid PNG: the title, a legend, then one row per case: the image with its box and clicks | the
    prediction (filled and outlined) | the prediction against the ground truth (true positives, false positives
    and false negatives in three colours, ``overlay.draw_errors``).

    ``cases``: (name, image path, gt path, pred path, score[, clicks]) tuples, in display order; clicks (N, 3)
    as x, y, label (1 foreground, 0 background) in image pixels. The box drawn is the tight box of the ground
    truth (``> 128``), the box the evaluation prompts with. ``title`` says which model, which images and how
    many (``eval.py`` writes "MODEL on DATASET: the K lowest IoU of N images").
    Each panel is scaled to ``tile`` pixels high (at most ``2 * tile`` wide) and centred in a column as wide as
    the widest panel, so the PNG is ``3 * cell_w + 16`` wide and ``(header_lines + 1) * line_h +
    len(cases) * (tile + line_h + 4)`` high (``line_h = max(14, tile // 16) + 8``; the header: the title, if
    any, and the legend in as many lines as the width needs; then the column names). Masks are read as ``> 128``.
    """
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    from pisam_jax import overlay
    from pisam_jax.data.pipeline import tight_box

    if not cases:
        raise ValueError("worst_cases_gallery needs at least one case")
    font = ImageFont.load_default(size=max(10, tile // 16))
    line_h = max(14, tile // 16) + 8
    gap = 4
    rows, with_clicks = [], False
    for name, image_path, gt_path, pred_path, score, *clicks in cases:
        clicks = np.asarray(clicks[0] if clicks else np.zeros((0, 3)), np.float32).reshape(-1, 3)
        img = _load_rgb(image_path)
        gt, pred = _load_mask(gt_path), _load_mask(pred_path)
        h, w = img.shape[:2]
        th, tw = (tile, max(1, round(w * tile / h))) if w <= 2 * h else (max(1, round(h * 2 * tile / w)), 2 * tile)
        small = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        fx, fy = tw / w, th / h
        box, _ = tight_box(gt.astype(np.uint8) * 255)  # pixel indices: the box spans to the last pixel's far edge
        box = np.array([box[0] * fx, box[1] * fy, (box[2] + 1) * fx - 1, (box[3] + 1) * fy - 1])
        first = Image.fromarray(small)
        points = (clicks[:, :2] + 0.5) * np.array([fx, fy]) - 0.5  # pixel centres to the panel's
        overlay.draw_prompts(first, box=box, points=points, labels=clicks[:, 2], scale=max(2, tile // 128))
        with_clicks = with_clicks or len(clicks) > 0
        small_pred = cv2.resize(pred.astype(np.uint8) * 255, (tw, th), interpolation=cv2.INTER_AREA) > 127
        panels = [first, overlay.draw_overlay(small, small_pred),
                  Image.fromarray(overlay.draw_errors(img, gt, pred, size=(th, tw)))]
        rows.append((f"{name}   {metric} = {score:.3f}", panels))
    cell_w = max(p.width for _, ps in rows for p in ps)  # one column width for all rows, panels centred
    width = 3 * cell_w + 4 * gap
    legend = _legend_lines(_legend_entries(with_clicks), width - 2 * gap, line_h, font)
    header_lines = bool(title) + len(legend)
    top = (header_lines + 1) * line_h
    canvas = Image.new("RGB", (width, top + len(rows) * (tile + line_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap + 2, 2), title, fill=(0, 0, 0), font=font)
    for i, line in enumerate(legend):
        y = (bool(title) + i) * line_h + 2
        for x, colour, label in line:
            draw.rectangle([gap + x, y + 2, gap + x + line_h - 10, y + line_h - 8], fill=colour, outline=(0, 0, 0))
            draw.text((gap + x + line_h - 6, y), label, fill=(0, 0, 0), font=font)
    columns = ("image, box and clicks" if with_clicks else "image and box", "prediction",
               "prediction against the ground truth")
    for j, label in enumerate(columns):
        draw.text((gap + j * (cell_w + gap) + 2, header_lines * line_h + 2), label, fill=(0, 0, 0), font=font)
    y = top
    for caption, panels in rows:
        draw.text((gap + 2, y + 2), caption, fill=(0, 0, 0), font=font)
        for j, p in enumerate(panels):
            x0 = gap + j * (cell_w + gap) + (cell_w - p.width) // 2
            canvas.paste(p, (x0, y + line_h + (tile - p.height) // 2))
        y += tile + line_h + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def noc_gallery(rows: Sequence[Mapping], path: str | os.PathLike, *, tile: int = 160) -> Path:
    """A grid PNG of the clicks placed on images, one row per image: the ground truth with every click numbered,
    then the mask after each kept step with the clicks so far (overlay.FOREGROUND positive, BACKGROUND negative) and
    its IoU.

    ``rows``: dicts with ``caption``; ``image`` (h, w, 3) uint8 thumbnail; ``gt`` (h, w) bool; ``clicks``
    [(x, y, positive), ...] in its pixels, in click order; ``steps`` [(k, mask (h, w) bool, IoU), ...] after k
    clicks. Panels are ``tile`` high.
    """
    from PIL import Image, ImageDraw, ImageFont

    from pisam_jax.overlay import draw_overlay

    if not rows:
        raise ValueError("noc_gallery needs at least one row")
    font = ImageFont.load_default(size=max(10, tile // 14))
    caption_h, gap = max(14, tile // 14) + 8, 4
    drawn = []
    for row in rows:
        image, clicks = row["image"], list(row["clicks"])
        first = draw_overlay(image, row["gt"],
                             points=np.array([c[:2] for c in clicks]).reshape(-1, 2),
                             labels=np.array([int(c[2]) for c in clicks]))
        draw = ImageDraw.Draw(first)
        for i, (x, y, _) in enumerate(clicks):
            draw.text((x + 5, y - 5), str(i + 1), fill=(255, 255, 0), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        panels = [(first, "ground truth, all clicks")]
        for k, mask, value in row["steps"]:
            shown = np.array([c[:2] for c in clicks[:k]]).reshape(-1, 2)
            panel = draw_overlay(image, mask, points=shown, labels=np.array([int(c[2]) for c in clicks[:k]]))
            iou_text = "-" if value is None or np.isnan(value) else f"{value:.3f}"
            panels.append((panel, f"{k} click{'s' if k != 1 else ''}: IoU {iou_text}"))
        drawn.append((row["caption"], panels))
    cell_w = max(p.width for _, ps in drawn for p, _ in ps)
    ncols = max(len(ps) for _, ps in drawn)
    canvas = Image.new("RGB", (ncols * (cell_w + gap) + gap, len(drawn) * (tile + 2 * caption_h + gap)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for caption, panels in drawn:
        draw.text((gap + 2, y + 2), caption, fill=(0, 0, 0), font=font)
        for j, (p, label) in enumerate(panels):
            x0 = gap + j * (cell_w + gap)
            draw.text((x0 + 2, y + caption_h + 2), label, fill=(0, 0, 0), font=font)
            canvas.paste(p, (x0 + (cell_w - p.width) // 2, y + 2 * caption_h + (tile - p.height) // 2))
        y += tile + 2 * caption_h + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _legend_entries(with_clicks: bool) -> list[tuple[tuple[int, int, int], str]]:
    from pisam_jax import overlay

    entries = [(overlay.TRUE_POSITIVE, "true positive (in both)"),
               (overlay.FALSE_POSITIVE, "false positive (predicted, not in the ground truth)"),
               (overlay.FALSE_NEGATIVE, "false negative (in the ground truth, missed)"),
               (overlay.BOX, "box")]
    if with_clicks:
        entries += [(overlay.FOREGROUND, "foreground click"), (overlay.BACKGROUND, "background click")]
    return entries


def _legend_lines(entries, width: int, line_h: int, font) -> list[list[tuple[int, tuple, str]]]:
    """The legend's swatches laid out in lines no wider than ``width``: per line, (x, colour, label) entries."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, x = [[]], 0
    for colour, label in entries:
        w = line_h - 6 + int(measure.textlength(label, font=font))
        if x and x + w > width:
            lines.append([])
            x = 0
        lines[-1].append((x, colour, label))
        x += w + 14
    return lines
