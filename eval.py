"""Evaluate models on the paper's benchmarks with GT box prompts, and optionally the click protocol.

    python eval.py --model checkpoints/sam_vit_h,checkpoints/hq_sam_vit_h,checkpoints/pisam_vit_h \
        --data_root data --datasets DIS5K-VD,DIS5K-TE1,DIS5K-TE2,DIS5K-TE3,DIS5K-TE4 --out results/dis \
        [--geometry stretch] [--clicks 1,2,5 --click_modes ALL,FG,BG --subset 200]

Writes under --out: the predictions ``<model>/<dataset>/<name>.png`` (0/255, original
resolution; an interrupted run resumes, skipping images already predicted), per-dataset
scores ``<model>/<dataset>.json``, the tables (``dis.md|csv|json`` for DIS5K, ``sod.*`` for
HRSOD/UHRSD, ``big.*`` for BIG, ``all.*`` every dataset and metric), worst-case galleries
``galleries/<model>_<dataset>.png``, and with --clicks the click protocol's
``clicks_table.*`` (Table 2), ``click_modes_table.*`` (Table 7), ``clicks.png`` and
``clicks/subset.json``; the click stage stores each finished (model, image) under
``clicks/<model>/`` and a rerun with the same click settings resumes it (other --clicks,
--click_modes, --modes_clicks, --seed or models: an error). Predictions are reused only for
the same model: each model's parameters are fingerprinted (sha256, printed at the start and
recorded in ``<model>/settings.json``), and a model folder that was re-converted or
re-exported under the same name stops the run with an error instead of reusing stale
predictions. --out is a new or empty folder, or one an earlier evaluation wrote. Prints the
Markdown tables. User errors (missing model or dataset folder, unknown dataset, corrupt image,
bad flag, --out not a folder of ours) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("model", None, "model directories (comma-separated); each is named by its base name")
flags.DEFINE_string("data_root", None, "data root holding the datasets in their folder layouts")
flags.DEFINE_list("datasets", ["dis-test"], "dataset names or groups (DIS5K-VD, DIS5K-TE1, ..., dis-test, paper-test)")
flags.DEFINE_string("out", None, "output directory")
flags.DEFINE_enum("geometry", "stretch", ["stretch", "longest_side"],
                  "stretch: 1024x1024 as the paper's evaluation; longest_side: SAM's resize + pad")
flags.DEFINE_bool("hq_token_only", False, "HQ-SAM models: score the HQ token's mask alone (HQ-SAM train.py "
                  "evaluation) instead of the HQ-corrected SAM mask (segment_anything_hq predictor default)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "compute dtype: float32 (the reference's), or bfloat16 (faster on GPUs and TPUs; float32 weights, "
                  "statistics and logits)")
flags.DEFINE_list("metrics", [], "metrics (default: the paper's for each dataset, plus IoU)")
flags.DEFINE_list("clicks", [], "click counts for the click protocol, e.g. 1,2,5 (empty: no click protocol)")
flags.DEFINE_list("click_modes", ["ALL"], "click types: ALL (Table 2), FG, BG (Table 7)")
flags.DEFINE_integer("modes_clicks", None, "clicks for the FG/BG/ALL comparison (default: the largest --clicks)")
flags.DEFINE_integer("subset", 200, "click protocol: number of worst images with overlapping errors")
flags.DEFINE_string("rank_by", "mean", "click subset ranking: mean | min of the models' IoU, or a model name")
flags.DEFINE_integer("seed", 0, "seed of the simulated clicks")
flags.DEFINE_integer("gallery", 8, "worst cases per model and dataset in the overlay gallery (0: none)")
flags.DEFINE_bool("skip_bad", False, "leave corrupt or unpaired samples out (counted) instead of stopping")
flags.DEFINE_bool("progress", True, "show progress bars")


class UsageError(ValueError):
    pass


RESERVED_NAMES = ("clicks", "galleries")  # folders of the results beside the models'


def check_out(out: Path) -> None:
    """--out must be a folder of ours: new, empty, or holding an earlier evaluation (which is resumed)."""
    from pisam_jax.evaluation.loop import is_eval_output
    from pisam_jax.outputs import OutputError, check_folder

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new, or one an earlier evaluation wrote)")
    if out.is_dir() and any(out.iterdir()) and not is_eval_output(out):
        entries = sorted(p.name for p in out.iterdir())
        raise UsageError(f"--out {out} holds other files ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}"
                         "), not an earlier evaluation; give a new or empty folder")
    try:
        check_folder(out, "--out")
    except OutputError as e:
        raise UsageError(str(e)) from None


def _ints(values, flag):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UsageError(f"--{flag} takes comma-separated integers, got {','.join(values)}") from None


def run() -> None:
    from pisam_jax.data.datasets import open_dataset, resolve_names
    from pisam_jax.evaluation import interactive, loop, reports
    from pisam_jax.evaluation.segmenter import BoxSegmenter, model_name
    from pisam_jax.models import read_config

    for flag in ("model", "data_root", "out"):
        if not getattr(FLAGS, flag):
            raise UsageError(f"--{flag} is required")
    names = [model_name(m) for m in FLAGS.model]
    if len(set(names)) != len(names):
        raise UsageError(f"--model: two model directories share a base name ({', '.join(names)}); rename one")
    if reserved := [n for n in names if n in RESERVED_NAMES]:
        raise UsageError(f"--model: a model named {reserved[0]} would mix with the {reserved[0]}/ folder of the "
                         "results; rename its directory")
    check_out(Path(FLAGS.out))
    if not Path(FLAGS.data_root).is_dir():
        raise UsageError(f"--data_root {FLAGS.data_root}: folder not found")
    clicks = _ints(FLAGS.clicks, "clicks")
    if any(k < 1 for k in clicks):
        raise UsageError(f"--clicks must be positive, got {clicks}")
    modes = [m.upper() for m in FLAGS.click_modes]
    if unknown := [m for m in modes if m not in interactive.MODES]:
        raise UsageError(f"--click_modes: unknown {unknown}; use ALL, FG, BG")

    datasets = [open_dataset(n, FLAGS.data_root, skip_bad=FLAGS.skip_bad) for n in resolve_names(FLAGS.datasets)]
    for m in FLAGS.model:  # every model directory readable before any is loaded
        read_config(m)
    segs = [BoxSegmenter.load(m, geometry=FLAGS.geometry, hq_token_only=FLAGS.hq_token_only, dtype=FLAGS.dtype)
            for m in FLAGS.model]
    for seg, m in zip(segs, FLAGS.model):
        print(f"model {seg.name}: {m}, parameters sha256 {loop.params_fingerprint(seg.model)[:16]}", flush=True)
    out = Path(FLAGS.out)

    results: dict = {}
    galleries = []
    for seg in segs:
        for ds in datasets:
            r = loop.evaluate_dataset(seg, ds, out, metrics=FLAGS.metrics or None, skip_bad=FLAGS.skip_bad,
                                      show_progress=FLAGS.progress)
            results.setdefault(seg.name, {})[ds.name] = r.results
            if r.skipped:
                print(f"{seg.name} {ds.name}: skipped {len(r.skipped)} bad image(s), first: {r.skipped[0][1]}")
            if FLAGS.gallery > 0:
                path = out / "galleries" / f"{seg.name}_{ds.name}.png"
                galleries.append(reports.worst_cases_gallery(loop.worst_cases(r, ds, FLAGS.gallery), path))

    tables = []
    dis = [d.name for d in datasets if d.name.startswith("DIS5K")]
    sod = [d.name for d in datasets if d.name.startswith(("HRSOD", "UHRSD"))]
    big = [d.name for d in datasets if d.name.startswith("BIG")]
    if dis:
        dis_res = reports.add_dis_te_mean(results)
        dis_sets = [d for d in reports.DIS_DATASETS if any(d in v for v in dis_res.values())]
        tables.append(("dis", reports.dis_table(dis_res, datasets=dis_sets), dis_res))
    if sod:
        tables.append(("sod", reports.sod_table(results, datasets=sod), results))
    if big:
        tables.append(("big", reports.big_table(results, datasets=big), results))
    all_metrics = list(dict.fromkeys(k for per in results.values() for v in per.values() for k in v
                                     if not k.startswith("num_")))
    all_table = reports.dis_table(results, datasets=[d.name for d in datasets], metrics=all_metrics)
    all_table.title = "All datasets and metrics"
    tables.append(("all", all_table, results))

    if clicks:
        cr = interactive.evaluate_clicks(segs, datasets, out, clicks=clicks, modes=modes,
                                         modes_clicks=FLAGS.modes_clicks, n_subset=FLAGS.subset,
                                         rank_by=FLAGS.rank_by, seed=FLAGS.seed, show_progress=FLAGS.progress)
        tables.append(("clicks_table", reports.clicks_table(cr.table2), cr.table2))
        if len(modes) > 1:
            tables.append(("click_modes_table", reports.click_modes_table(cr.table7, modes=("Ori", *[
                m for m in reports.CLICK_MODES if m in modes])), cr.table7))
        reports.plot_clicks(cr.table2, out / "clicks.png", metrics=("iou",) + reports.CLICK_METRICS,
                            title=f"Metrics versus number of clicks (mean over the {len(cr.subset)} images of the "
                                  "click subset)")
        print(f"click protocol on {len(cr.subset)} images ({out / 'clicks' / 'subset.json'}); plot: {out / 'clicks.png'}")

    for stem, table, res in tables:
        reports.write_table(table, res, out, stem)
        print(reports.to_markdown(table))
    if galleries:
        print(f"worst-case overlays: {out / 'galleries'} ({len(galleries)} files)")
    print(f"predictions and reports under {out}")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(2)
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    from pisam_jax.data.datasets import DatasetError
    from pisam_jax.data.images import ImageReadError
    from pisam_jax.evaluation.loop import EvalError
    from pisam_jax.models import ModelError
    from pisam_jax.outputs import OutputError
    from pisam_jax.predictor import PromptError

    try:
        run()
    except (UsageError, DatasetError, ImageReadError, ModelError, EvalError, PromptError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from pisam_jax.cli import parse_absl_flags

    app.run(main, flags_parser=parse_absl_flags)
