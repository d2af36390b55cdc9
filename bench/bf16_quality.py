"""What bfloat16 compute costs in quality (issue 15): the same weights run in float32 and in bfloat16, compared.

    python -m bench.bf16_quality [--workdir runs/quickstart] [--images 60] [--clicks 1,5] [--click-subset 0]
                                 [--cases miniature vit_b] [--code-paths cpu|accelerator]

Prints one JSON line per case, then a Markdown table.

``miniature``: the models ``python quickstart.py`` trained and exported (WORKDIR/{sam,hq,pisam}/export) on its
held-out images (WORKDIR/data, DIS5K-VD), with the quickstart evaluation's prompts and code
(``evaluation.segmenter.BoxSegmenter``, stretch geometry, ``MetricSuite``): the GT box, then for each k in
``--clicks`` the click protocol's k clicks in one pass (``protocol.overlap_clicks`` in the overlapping error area
of the three models' float32 box predictions, seeded as ``evaluation.interactive``). Both dtypes get the float32
run's clicks, so they answer the same prompts. The click images are the eligible ones, worst first as the
protocol ranks them (``--click-subset 20``: the quickstart's subset; 0: all eligible). Per (model, prompt):
IoU and Boundary IoU against the GT in each dtype (dataset means); the agreement of the two binary masks (IoU
between them, mean and worst image, and the fraction of pixels that differ); the logits' difference at the
original resolution (max and mean of |fp32 - bf16|, next to the RMS of the fp32 logits), and the largest
|fp32 logit| among the pixels that flipped (how far from the threshold 0 bfloat16 moves a decision); for the
clicks, the mean number given (fewer than k where the overlap has fewer components).

``vit_b``: SAM vit_b at full size (1024^2 input) with random weights, built as the parity tests build them
(``references.sam.build_torch_sam``: an official-format model, norms and position tables perturbed) and
converted; one random 1024^2 image, a box and a box with two clicks. Max and RMS of |bf16 - fp32| of the image
embedding and of the low-res logits, each relative to the RMS of the fp32 values, and the fraction of the
1024^2 mask pixels that differ.

Both dtypes share the float32 parameters (``models.with_dtype``); float32 runs with
``jax_default_matmul_precision="highest"`` (true fp32 on every backend; the parity tests' setting).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bench.encoder import _device
from bench.flags import add_code_paths_flag, code_paths, use_code_paths

MODELS = ("sam", "hq", "pisam")  # quickstart.py's exports, WORKDIR/<name>/export
HELD_OUT = "DIS5K-VD"


def machine() -> str:
    """The CPU's model name (and JAX's device), for the records."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------------------------------
# Comparing two answers to the same prompt
# --------------------------------------------------------------------------------------------------------------


class Comparison:
    """Accumulates, over images, the float32 and bfloat16 answers to one (model, prompt) case.

    ``add(logits32, logits16, gt)``: (H, W) float32 logits at the original resolution of each dtype, the GT
    (H, W) uint8 0..255. Scores against the GT with ``MetricSuite`` (the quickstart's metrics), mask agreement
    with ``metrics.iou``.
    """

    def __init__(self, metrics=("iou", "boundary_iou")):
        from pisam_jax.evaluation.metrics import MetricSuite

        self.suites = {"fp32": MetricSuite(metrics), "bf16": MetricSuite(metrics)}
        self.agreement: list[float] = []
        self.differing = self.pixels = 0
        self.worst_differing = 0.0
        self.abs_diff_max = self.abs_diff_sum = self.sq_fp32 = 0.0
        self.flipped_max_abs_logit = 0.0

    def add(self, logits32: np.ndarray, logits16: np.ndarray, gt: np.ndarray, name: str) -> None:
        from pisam_jax.evaluation.metrics import iou

        m32, m16 = logits32 > 0, logits16 > 0
        self.suites["fp32"].update(m32, gt, name)
        self.suites["bf16"].update(m16, gt, name)
        self.agreement.append(iou(m32, m16))
        flipped = m32 != m16
        n = int(np.count_nonzero(flipped))
        self.differing += n
        self.pixels += flipped.size
        self.worst_differing = max(self.worst_differing, n / flipped.size)
        if n:
            self.flipped_max_abs_logit = max(self.flipped_max_abs_logit, float(np.abs(logits32[flipped]).max()))
        diff = np.abs(logits32.astype(np.float64) - logits16)
        self.abs_diff_max = max(self.abs_diff_max, float(diff.max()))
        self.abs_diff_sum += float(diff.sum())
        self.sq_fp32 += float(np.square(logits32, dtype=np.float64).sum())

    def result(self) -> dict:
        r32, r16 = (s.results() for s in self.suites.values())
        return {
            "images": r32["num_images"],
            "iou_fp32": r32["iou"], "iou_bf16": r16["iou"],
            "biou_fp32": r32["boundary_iou"], "biou_bf16": r16["boundary_iou"],
            "mask_iou_fp32_vs_bf16_mean": float(np.mean(self.agreement)),
            "mask_iou_fp32_vs_bf16_min": float(np.min(self.agreement)),
            "differing_pixels": self.differing / self.pixels,
            "differing_pixels_worst_image": self.worst_differing,
            "logit_abs_diff_max": self.abs_diff_max,
            "logit_abs_diff_mean": self.abs_diff_sum / self.pixels,
            "logit_rms_fp32": float(np.sqrt(self.sq_fp32 / self.pixels)),
            "flipped_max_abs_logit_fp32": self.flipped_max_abs_logit,
        }


# --------------------------------------------------------------------------------------------------------------
# The trained miniature models
# --------------------------------------------------------------------------------------------------------------


def miniature(args) -> list[dict]:
    from pisam_jax.data.datasets import DatasetError, open_dataset
    from pisam_jax.evaluation import protocol
    from pisam_jax.evaluation.interactive import image_seed
    from pisam_jax.evaluation.loop import progress
    from pisam_jax.evaluation.segmenter import BoxSegmenter
    from pisam_jax.models import load_model, with_dtype

    work = Path(args.workdir)
    dirs = {m: work / m / "export" for m in MODELS}
    missing = [str(d) for d in dirs.values() if not (d / "config.json").is_file()]
    if missing:
        fail(f"no trained miniature model at {', '.join(missing)}; run python quickstart.py --workdir {work} "
             "first (or give its --workdir)")
    try:
        samples = open_dataset(HELD_OUT, str(work / "data")).samples[: args.images or None]
    except DatasetError as e:
        fail(f"{e}; the held-out images are quickstart.py's (WORKDIR/data)")
    segs = {}
    for m, d in dirs.items():
        model = load_model(d)
        segs[m] = (BoxSegmenter(model, name=m), BoxSegmenter(with_dtype(model, "bfloat16"), name=m))

    def box_answers(m, sample):
        """Both dtypes' box predictions (``BoxOutput``) on ``sample``; the box is the same (GT geometry only)."""
        image, gt = sample.read_image(), sample.read_mask()
        outs = []
        for seg in segs[m]:
            seg.set_image(image)
            outs.append(seg.predict_box(seg.gt_box(gt)))
        return gt, outs

    results, initial = [], {}  # initial: (image key) -> {model: fp32 box mask}
    for m in MODELS:
        cmp, t0 = Comparison(), time.time()
        for s in progress(samples, len(samples), f"{m} box, fp32 and bf16"):
            gt, (out32, out16) = box_answers(m, s)
            cmp.add(out32.logits, out16.logits, gt, s.name)
            initial.setdefault(f"{HELD_OUT}/{s.name}", {})[m] = out32.mask
        results.append(_record("miniature", m, "box", cmp, time.time() - t0))
        print(json.dumps(results[-1]), flush=True)

    if not args.clicks:
        return results
    by_key = {f"{HELD_OUT}/{s.name}": s for s in samples}
    entries = [protocol.subset_entry(k, preds, by_key[k].read_mask()) for k, preds in initial.items()]
    subset = protocol.select_subset(entries, args.click_subset or len(entries))
    for m in MODELS:
        cmps, given, t0 = {k: Comparison() for k in args.clicks}, {k: [] for k in args.clicks}, time.time()
        for key in progress(subset, len(subset), f"{m} clicks, fp32 and bf16"):
            s = by_key[key]
            gt, (out32, out16) = box_answers(m, s)
            overlap = protocol.overlap_errors(list(initial[key].values()), gt)
            for k in args.clicks:
                c = protocol.overlap_clicks(out32.mask, gt, overlap, k, image_seed(args.seed, key, k, "ALL"))
                n = int(c["n"])
                points, flags = c["points"][:n], c["flags"][:n]
                given[k].append(n)
                cmps[k].add(segs[m][0].refine(out32, points, flags), segs[m][1].refine(out16, points, flags),
                            gt, s.name)
        for k, cmp in cmps.items():
            results.append({**_record("miniature", m, f"box + {k} click{'s' * (k > 1)}", cmp, time.time() - t0),
                            "clicks_given_mean": float(np.mean(given[k]))})
            print(json.dumps(results[-1]), flush=True)
    return results


def _record(case: str, model: str, prompt: str, cmp: Comparison, seconds: float) -> dict:
    return {"case": case, "model": model, "prompt": prompt, **cmp.result(), "dtypes": "float32 vs bfloat16",
            "device": _device(), "code_paths": code_paths(), "machine": machine(), "seconds": round(seconds, 1)}


# --------------------------------------------------------------------------------------------------------------
# Random full-size vit_b
# --------------------------------------------------------------------------------------------------------------


def vit_b(args) -> list[dict]:
    from convert.keymap import load_torch_weights
    from pisam_jax.models import ModelConfig, abstract_model
    from pisam_jax.predictor import Predictor
    from references.sam import build_torch_sam

    t0 = time.time()
    model = abstract_model(ModelConfig.preset("vit_b"))
    load_torch_weights(model, build_torch_sam(1024, 768, 12, 12, (2, 5, 8, 11), seed=args.seed).state_dict())
    image = np.random.default_rng(args.seed).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    box = np.array([180.0, 240.0, 760.0, 900.0])
    prompts = {"box": dict(box=box),
               "box + 2 clicks": dict(box=box, point_coords=np.array([[400, 500], [650, 300]]),
                                      point_labels=np.array([1, 0]))}
    answers = []
    for dtype in ("float32", "bfloat16"):
        predictor = Predictor(model, dtype=dtype)
        predictor.set_image(image)
        embedding = np.asarray(predictor.features.embeddings, np.float32)
        out = {p: predictor.predict(**kw, multimask_output=False, return_logits=True) for p, kw in prompts.items()}
        answers.append((embedding, out))
    (e32, out32), (e16, out16) = answers
    seconds = round(time.time() - t0, 1)
    results = [_error_record("image embedding", e16, e32, seconds)]
    for p in prompts:
        (masks32, _, low32), (masks16, _, low16) = out32[p], out16[p]
        results.append({**_error_record(f"low-res logits, {p}", low16, low32, seconds),
                        "differing_pixels": float(np.mean((masks32 > 0) != (masks16 > 0)))})
    for r in results:
        print(json.dumps(r), flush=True)
    return results


def _error_record(what: str, got: np.ndarray, exact: np.ndarray, seconds: float) -> dict:
    err = np.abs(np.asarray(got, np.float64) - exact)
    rms = float(np.sqrt(np.mean(np.square(exact, dtype=np.float64))))
    return {"case": "vit_b", "model": "vit_b random (1024^2)", "prompt": what, "values": int(exact.size),
            "rms_fp32": rms, "abs_err_max": float(err.max()), "abs_err_rms": float(np.sqrt(np.mean(err**2))),
            "rel_err_max": float(err.max()) / rms, "rel_err_rms": float(np.sqrt(np.mean(err**2))) / rms,
            "dtypes": "float32 vs bfloat16", "device": _device(), "code_paths": code_paths(), "machine": machine(),
            "seconds": seconds}


# --------------------------------------------------------------------------------------------------------------


def markdown(results: list[dict]) -> str:
    lines = []
    mini = [r for r in results if r["case"] == "miniature"]
    if mini:
        lines += [("| model | prompt | images | IoU fp32 | IoU bf16 | BIoU fp32 | BIoU bf16 | mask IoU fp32 vs bf16 "
                   "(mean / min) | pixels differing (all / worst image) | abs logit diff max / mean (fp32 RMS) "
                   "| max fp32 abs logit of a flip |"), "|---" * 11 + "|"]
        lines += [f"| {r['model']} | {r['prompt']} | {r['images']} | {r['iou_fp32']:.4f} | {r['iou_bf16']:.4f} "
                  f"| {r['biou_fp32']:.4f} | {r['biou_bf16']:.4f} "
                  f"| {r['mask_iou_fp32_vs_bf16_mean']:.4f} / {r['mask_iou_fp32_vs_bf16_min']:.4f} "
                  f"| {r['differing_pixels']:.2e} / {r['differing_pixels_worst_image']:.2e} "
                  f"| {r['logit_abs_diff_max']:.3f} / {r['logit_abs_diff_mean']:.4f} ({r['logit_rms_fp32']:.2f}) "
                  f"| {r['flipped_max_abs_logit_fp32']:.3f} |" for r in mini]
    vit = [r for r in results if r["case"] == "vit_b"]
    if vit:
        lines += ["", ("| vit_b, random weights, 1024^2 | fp32 RMS | max abs err | RMS abs err | max / RMS "
                       "| RMS err / RMS | mask pixels differing |"), "|---" * 7 + "|"]
        for r in vit:
            differing = f"{r['differing_pixels']:.2e}" if "differing_pixels" in r else ""
            lines.append(f"| {r['prompt']} | {r['rms_fp32']:.3g} | {r['abs_err_max']:.3g} | {r['abs_err_rms']:.3g} "
                         f"| {r['rel_err_max']:.2e} | {r['rel_err_rms']:.2e} | {differing} |")
    if results:
        r = results[0]
        lines += ["", f"({r['machine']}, JAX on {r['device']}, {r['code_paths']} code paths)"]
    return "\n".join(lines)


CASES = {"miniature": miniature, "vit_b": vit_b}


def main(argv=None) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="quickstart.py's --workdir (miniature case)")
    parser.add_argument("--images", type=int, default=0, help="held-out images to use, in name order (0: all)")
    parser.add_argument("--clicks", default="1,5", help="click counts after the box (miniature case; '' for none)")
    parser.add_argument("--click-subset", type=int, default=0,
                        help="images for the clicks, worst first (0: every eligible one; the quickstart uses 20)")
    parser.add_argument("--seed", type=int, default=0, help="the clicks' seed (the quickstart's --seed), vit_b's")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    add_code_paths_flag(parser)
    args = parser.parse_args(argv)
    use_code_paths(args.code_paths)
    try:
        args.clicks = sorted({int(k) for k in args.clicks.split(",") if k.strip()})
    except ValueError:
        parser.error(f"--clicks takes comma-separated click counts such as 1,5, not {args.clicks!r}")
    if any(k < 1 for k in args.clicks) or args.images < 0 or args.click_subset < 0:
        parser.error("--clicks need positive counts; --images and --click-subset 0 or more")
    results = []
    for case in args.cases:
        results += CASES[case](args)
    print("\n" + markdown(results))


if __name__ == "__main__":
    main()
