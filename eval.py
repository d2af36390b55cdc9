"""Evaluate models on the paper's benchmarks with GT box prompts, and optionally the click protocol.

    python eval.py --model checkpoints/sam_vit_h,checkpoints/hq_sam_vit_h,checkpoints/pisam_vit_h \
        --data_root data --datasets DIS5K-VD,DIS5K-TE1,DIS5K-TE2,DIS5K-TE3,DIS5K-TE4 --out results/dis \
        [--geometry stretch] [--clicks 1,2,5 --click_modes ALL,FG,BG --subset 200]

The datasets are read from their folders under --data_root, or with --source=tfds from the TFDS datasets
prepared in --tfds_data_dir (``python -m pisam_jax.data.tfds prepare``), with the same names and results.
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

--protocol noc runs the interactive-segmentation field's protocol instead (``evaluation.noc``):

    python eval.py --protocol noc --model checkpoints/sam_vit_h,checkpoints/hq_sam_vit_h,checkpoints/pisam_vit_h \
        --data_root data --datasets interactive,hqseg-val --out results/noc [--max_clicks 20] [--starts box,clicks]

clicks placed one at a time by RITM's clicker, up to --max_clicks; Pi-SAM refines the GT box's mask, SAM and
HQ-SAM answer from the box (start ``box``) and from clicks alone (``clicks``). Writes ``noc.md|csv|json``
(NoC@85/90/95, NoF, seconds per click), ``noc_iou.csv`` (mean IoU after 0..20 clicks), ``noc.png`` (the curves,
one panel per dataset), ``galleries/noc_<model>_<start>_<dataset>.png`` (the clicks on the hardest images), and
its records under ``noc/`` (an interrupted run resumes per model, start and image).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("model", None, "model directories (comma-separated); each is named by its base name")
flags.DEFINE_string("data_root", None, "data root holding the datasets in their folder layouts")
flags.DEFINE_enum("source", "folders", ["folders", "tfds"], "folders: under --data_root; tfds: the prepared TFDS "
                  "datasets in --tfds_data_dir (python -m pisam_jax.data.tfds prepare)")
flags.DEFINE_string("tfds_data_dir", None, "--source=tfds: the TFDS data dir (default: TFDS's)")
flags.DEFINE_list("datasets", ["dis-test"], "dataset names or groups (DIS5K-VD, DIS5K-TE1, ..., dis-test, paper-test; "
                  "for --protocol noc also GrabCut, Berkeley, DAVIS, interactive, hqseg-val)")
flags.DEFINE_string("out", None, "output directory")
flags.DEFINE_enum("protocol", "box", ["box", "noc"],
                  "box: the paper's box-prompt tables (and its click protocol with --clicks); noc: the interactive "
                  "field's iterative clicks (NoC@85/90/95, NoF, mean IoU after 1..20 clicks)")
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
flags.DEFINE_integer("max_clicks", 20, "--protocol noc: clicks per image (NoC counts this when never reached)")
flags.DEFINE_list("noc_thresholds", ["0.85", "0.90", "0.95"], "--protocol noc: IoU thresholds of NoC and NoF")
flags.DEFINE_list("starts", ["box", "clicks"], "--protocol noc: box (every model: the GT box, then clicks) and/or "
                  "clicks (SAM and HQ-SAM: clicks alone, the first at the object's centre)")
flags.DEFINE_integer("gallery", 8, "worst cases per model and dataset in the overlay gallery (0: none)")
flags.DEFINE_bool("skip_bad", False, "leave corrupt or unpaired samples out (counted) instead of stopping")
flags.DEFINE_bool("progress", True, "show progress bars")


class UsageError(ValueError):
    pass


RESERVED_NAMES = ("clicks", "galleries", "noc")  # folders of the results beside the models'


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


def _floats(values, flag):
    try:
        return [float(v) for v in values]
    except ValueError:
        raise UsageError(f"--{flag} takes comma-separated numbers, got {','.join(values)}") from None


def check_noc_flags() -> tuple[list[str], list[float]]:
    """The --protocol noc flags: the starts and thresholds; the box protocol's click flags are refused."""
    from pisam_jax.evaluation import noc

    for flag in ("clicks", "click_modes", "modes_clicks", "subset", "rank_by"):
        if FLAGS[flag].present:
            raise UsageError(f"--{flag} belongs to the paper's click protocol (--protocol box); with --protocol noc "
                             "use --max_clicks, --noc_thresholds and --starts")
    if FLAGS.max_clicks < 1:
        raise UsageError(f"--max_clicks must be positive, got {FLAGS.max_clicks}")
    starts = [s.lower() for s in FLAGS.starts]
    if unknown := [s for s in starts if s not in noc.STARTS]:
        raise UsageError(f"--starts: unknown {unknown}; use {', '.join(noc.STARTS)}")
    thresholds = _floats(FLAGS.noc_thresholds, "noc_thresholds")
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise UsageError(f"--noc_thresholds are IoUs in (0, 1], e.g. 0.85,0.90,0.95; got {thresholds}")
    return starts, thresholds


def run_noc(segs, datasets, out: Path, starts, thresholds) -> None:
    from pisam_jax.evaluation import noc, reports

    res = noc.evaluate_noc(segs, datasets, out, starts=starts, max_clicks=FLAGS.max_clicks, thresholds=thresholds,
                           skip_bad=FLAGS.skip_bad, show_progress=FLAGS.progress)
    written = noc.write_reports(res, out, datasets, gallery=FLAGS.gallery)
    for table in written["tables"]:
        print(reports.to_markdown(table))
    if res.skipped:
        print(f"skipped {len(res.skipped)} bad image(s), first: {res.skipped[0][0]}/{res.skipped[0][1]}: "
              f"{res.skipped[0][2]}")
    print(f"NoC protocol: {res.computed} run(s) computed, the others read back from {out / 'noc'}; "
          f"tables {out / 'noc.md'}, curves {out / 'noc.png'}")


def run() -> None:
    from pisam_jax.data.datasets import open_dataset, resolve_names
    from pisam_jax.evaluation import interactive, loop, reports
    from pisam_jax.evaluation.segmenter import BoxSegmenter, model_name
    from pisam_jax.models import read_config

    for flag in ("model", "out") + (("data_root",) if FLAGS.source == "folders" else ()):
        if not getattr(FLAGS, flag):
            raise UsageError(f"--{flag} is required")
    names = [model_name(m) for m in FLAGS.model]
    if len(set(names)) != len(names):
        raise UsageError(f"--model: two model directories share a base name ({', '.join(names)}); rename one")
    if reserved := [n for n in names if n in RESERVED_NAMES]:
        raise UsageError(f"--model: a model named {reserved[0]} would mix with the {reserved[0]}/ folder of the "
                         "results; rename its directory")
    check_out(Path(FLAGS.out))
    if FLAGS.source == "folders" and not Path(FLAGS.data_root).is_dir():
        raise UsageError(f"--data_root {FLAGS.data_root}: folder not found")
    if FLAGS.protocol == "noc":
        starts, thresholds = check_noc_flags()
    elif noc_flags := [f for f in ("max_clicks", "noc_thresholds", "starts") if FLAGS[f].present]:
        raise UsageError(f"--{noc_flags[0]} belongs to --protocol noc; add it, or leave the flag out")
    clicks = _ints(FLAGS.clicks, "clicks")
    if any(k < 1 for k in clicks):
        raise UsageError(f"--clicks must be positive, got {clicks}")
    modes = [m.upper() for m in FLAGS.click_modes]
    if unknown := [m for m in modes if m not in interactive.MODES]:
        raise UsageError(f"--click_modes: unknown {unknown}; use ALL, FG, BG")

    if FLAGS.source == "tfds":
        from pisam_jax.data import tfds as tfds_data

        datasets = tfds_data.open_datasets(FLAGS.datasets, FLAGS.tfds_data_dir)
    else:
        datasets = [open_dataset(n, FLAGS.data_root, skip_bad=FLAGS.skip_bad) for n in resolve_names(FLAGS.datasets)]
    for m in FLAGS.model:  # every model directory readable before any is loaded
        read_config(m)
    segs = [BoxSegmenter.load(m, geometry=FLAGS.geometry, hq_token_only=FLAGS.hq_token_only, dtype=FLAGS.dtype)
            for m in FLAGS.model]
    for seg, m in zip(segs, FLAGS.model):
        print(f"model {seg.name}: {m}, parameters sha256 {loop.params_fingerprint(seg.model)[:16]}", flush=True)
    out = Path(FLAGS.out)
    if FLAGS.protocol == "noc":
        return run_noc(segs, datasets, out, starts, thresholds)

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
                cases = loop.worst_cases(r, ds, FLAGS.gallery)
                title = f"{seg.name} on {ds.name}: the {len(cases)} lowest IoU of {r.results['num_images']} images"
                galleries.append(reports.worst_cases_gallery(cases, path, title=title))

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
                            title="Metrics versus number of clicks (the click subset)", num_images=len(cr.subset),
                            datasets=[d.name for d in datasets])
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
