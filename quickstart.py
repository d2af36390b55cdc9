"""The paper in miniature, on a fresh machine with nothing downloaded, in about 10 minutes on two CPU cores:

    python quickstart.py [--workdir runs/quickstart] [--seed 0]

1. generates synthetic thin-structure data under WORKDIR/data: 256 px training images (DIS5K-TR) and
   held-out images drawn with another seed (DIS5K-VD);
2. trains the miniature recipe (``configs/miniature.py``): a small SAM from scratch, then HQ-SAM on the frozen
   SAM, then Pi-SAM stage 1 (High-Resolution Mask Decoder) and stage 2 (Precise Interactor) on it;
3. evaluates SAM, HQ-SAM and Pi-SAM on the held-out images with box prompts and the click protocol
   (1, 2 and 5 correcting clicks, the paper's Table 2), and writes WORKDIR/report.json and report.md.

Each step is the command a user would type, printed before it runs; every one resumes where it stopped, and a
second run with the same settings only prints the report.

    python quickstart.py --ablation [--workdir runs/quickstart] [--seed 0]

is the paper's Table 5 in miniature, after the main run (its data and SAM): Pi-SAM stage 1 trained again without
the RGB embedding, without the Object Embedder's deformable branches, and with the 256^2 output only (each a
``config.model`` flag), every row scored by IoU and Boundary IoU on the same held-out images
(WORKDIR/ablation.json and ablation.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPORT = "report.json"
TIMINGS = "timings.json"  # seconds spent in each step, summed over interrupted and resumed runs
TRAIN = ("DIS5K/DIS-TR", 400)  # folder under the data root, images
HELD_OUT = ("DIS5K/DIS-VD", 60)
CLICK_SUBSET = 20  # the click protocol's n worst images (the paper: 200 of its test sets)
IMAGE_SIZE, DETAIL = 256, 12  # synthetic images: long side, structure widths (configs/miniature.py says why)
# (report name, training stage, its workdir, where it starts from)
RUNS = (("sam", "sam", "sam", None), ("hq", "hq", "hq", "sam"), ("stage1", "stage1", "pisam_stage1", "sam"),
        ("pisam", "stage2", "pisam", "pisam_stage1"))
MODELS = ("sam", "hq", "pisam")
CLICKS = (1, 2, 5)
BOX_METRICS = {"iou": "iou", "biou": "boundary_iou", "hce": "hce", "wfm": "weighted_f"}
CLICK_METRICS = {"iou": "iou", "wfm": "weighted_f"}
# Table 5 in miniature: (report name = workdir, the model flag it turns off); "pisam_stage1" is the main run's.
ABLATIONS = (("pisam_stage1", None), ("no_rgb_embedding", "pi_rgb_embedding"),
             ("no_deformable", "pi_deformable"), ("low_res_output", "pi_high_res"))


def run(cmd: list[str], timings: Path | None = None, key: str = "") -> None:
    """Runs one step; with ``timings``, adds its wall time under ``key`` (a resumed step adds up)."""
    print("\n$ " + shlex.join(cmd), flush=True)
    t0 = time.time()
    code = subprocess.call(cmd)
    if timings is not None:
        spent = json.loads(timings.read_text()) if timings.is_file() else {}
        spent[key] = spent.get(key, 0.0) + time.time() - t0
        timings.write_text(json.dumps(spent, indent=2) + "\n")
    if code:
        sys.exit(code)


def data_seed(seed: int, held_out: bool) -> int:
    """Training images are drawn with the run's seed, held-out ones with another (never the same images)."""
    return 1000 + seed if held_out else seed


def mean_logged(workdir: Path, key: str) -> float:
    """The mean of ``key`` over a run's metrics.jsonl (each line a mean over the steps since the previous one)."""
    values = [r[key] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if key in r]
    return float(sum(values) / len(values))


def build_report(work: Path, settings: dict) -> dict:
    eval_dir = work / "eval"
    box = json.loads((eval_dir / "all.json").read_text())
    clicks = json.loads((eval_dir / "clicks_table.json").read_text())
    subset = json.loads((eval_dir / "clicks" / "subset.json").read_text())
    ds = "DIS5K-VD"
    return {
        "box": {m: {k: box[m][ds][v] for k, v in BOX_METRICS.items()} for m in MODELS},
        "clicks": {m: {str(k): {n: clicks[m][str(k)][v] for n, v in CLICK_METRICS.items()} for k in (0, *CLICKS)}
                   for m in MODELS},
        "stage2_valid_fraction": mean_logged(work / "pisam", "valid_fraction"),
        "minutes": round(sum(json.loads((work / TIMINGS).read_text()).values()) / 60, 2),
        "images": {"held_out": HELD_OUT[1], "click_subset": len(subset["names"])},
        "settings": settings,
    }


def report_markdown(r: dict) -> str:
    lines = [f"Held-out synthetic images: {r['images']['held_out']}, box prompts", "",
             "| model | IoU | Boundary IoU | HCE (lower is better) | weighted F |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {v['iou']:.3f} | {v['biou']:.3f} | {v['hce']:.1f} | {v['wfm']:.3f} |"
              for m, v in r["box"].items()]
    ks = list(next(iter(r["clicks"].values())))
    lines += ["", f"Click protocol on {r['images']['click_subset']} images: mean IoU after k clicks (0: the box alone)",
              "", "| model | " + " | ".join(ks) + " |", "|---" * (len(ks) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{v[k]['iou']:.3f}" for k in ks) + " |" for m, v in r["clicks"].items()]
    lines += ["", f"Stage 2: clicks simulated for {100 * r['stage2_valid_fraction']:.1f}% of the training samples",
              f"Run time: {r['minutes']:.1f} minutes (data, training and evaluation)"]
    return "\n".join(lines)


def train_command(work: Path, stage: str, run_dir: str, init: str | None, seed: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "train.py", f"--config=configs/miniature.py:{stage}", f"--workdir={work / run_dir}",
           f"--config.data.data_root={work / 'data'}", f"--config.seed={seed}", *extra]
    return cmd + ([f"--config.init_from={work / init}"] if init else [])


def ablation(work: Path, seed: int) -> None:
    """Paper Table 5 in miniature: stage 1 without each module, IoU / Boundary IoU on the held-out images."""
    if not (work / "sam" / "export" / "config.json").is_file():
        sys.exit(f"error: {work} has no trained miniature SAM; run python quickstart.py --workdir {work} first")
    for name, flag in ABLATIONS:
        if flag and not (work / name / "export" / "config.json").is_file():
            run(train_command(work, "stage1", name, "sam", seed, f"--config.model.{flag}=False"))
    models = ",".join(str(work / name / "export") for name, _ in ABLATIONS)
    run([sys.executable, "eval.py", f"--model={models}", f"--data_root={work / 'data'}", "--datasets=DIS5K-VD",
         f"--out={work / 'ablation'}", "--metrics=iou,boundary_iou", "--gallery=0"])
    scores = json.loads((work / "ablation" / "all.json").read_text())
    rows = {name: {k: scores[name]["DIS5K-VD"][v] for k, v in (("iou", "iou"), ("biou", "boundary_iou"))}
            for name, _ in ABLATIONS}
    (work / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| Pi-SAM stage 1 | IoU | Boundary IoU |", "|---|---|---|"]
    lines += [f"| {name} | {r['iou']:.3f} | {r['biou']:.3f} |" for name, r in rows.items()]
    (work / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training data, the models and the clicks")
    parser.add_argument("--ablation", action="store_true", help="the ablation table (after the main run)")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if args.ablation:
        return ablation(work, args.seed)
    settings = {"seed": args.seed}
    report_path = work / REPORT
    if report_path.is_file() and json.loads(report_path.read_text()).get("settings") == settings:
        print(report_markdown(json.loads(report_path.read_text())))
        print(f"\n(from {report_path}; delete it, or use another --workdir, to run again)")
        return

    py = sys.executable
    timings = work / TIMINGS
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    for (folder, n), held_out in ((TRAIN, False), (HELD_OUT, True)):
        if not (data / folder / "gt").is_dir() or len(list((data / folder / "gt").iterdir())) < n:
            run([py, "-m", "pisam_jax.data.synthetic", "--out", str(data / folder), "--n", str(n),
                 "--size", str(IMAGE_SIZE), "--detail", str(DETAIL), "--seed", str(data_seed(args.seed, held_out))],
                timings, "data")

    for _, stage, run_dir, init in RUNS:
        if not (work / run_dir / "export" / "config.json").is_file():
            run(train_command(work, stage, run_dir, init, args.seed), timings, stage)

    models = ",".join(str(work / m / "export") for m in MODELS)
    run([py, "eval.py", f"--model={models}", f"--data_root={data}", "--datasets=DIS5K-VD",
         f"--out={work / 'eval'}", "--clicks=" + ",".join(map(str, CLICKS)), f"--subset={CLICK_SUBSET}",
         f"--seed={args.seed}", "--gallery=4"], timings, "eval")

    report = build_report(work, settings)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    (work / "report.md").write_text(report_markdown(report) + "\n")
    print("\n" + report_markdown(report))
    print(f"\nreport: {report_path} (and report.md); tables, plots and overlays: {work / 'eval'}")


if __name__ == "__main__":
    main()
