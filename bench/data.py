"""Input-pipeline and click-simulation benchmarks; one JSON line per case.

    python -m bench.data [--n 24] [--workers 2] [--threads 2] [--size 2048]

* train pipeline throughput (images/s of 1024x1024 training samples, decode + flip +
  large-scale jitter + crop/pad + box) on synthetic ``--size`` px JPEGs, with 0 and N
  worker processes, read from the folders and from the same files prepared as a TFDS
  ArrayRecord dataset (``source``), in ``--rounds`` alternating rounds (a busy moment of a
  shared machine hits both) and their medians (``data_sources``); the eval pipeline
  (``stretch``, folders);
  ``sample_mib``: host memory of one sample's arrays (float32 image and mask: 16 MiB at 1024^2);
* size on disk of the images' folders and of the prepared ArrayRecord dataset;
* click simulation time per sample at 256x256 and 1024x1024 (ours, numpy/scipy), next
  to the reference's method (torch max-pool erosion + cv2.connectedComponents + topk).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _emit(**kw):
    print(json.dumps(kw), flush=True)


def _disk_bytes(path: str) -> int:
    """Bytes allocated on disk under ``path`` (as du counts them)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def open_sources(root: str, tmp: str) -> dict:
    """The images in ``root`` (im/, gt/) as a folder dataset and as a prepared TFDS dataset (dis5k's train
    split, from a manual folder linking to them); prints their sizes on disk."""
    from pisam_jax.data import tfds as tfds_data
    from pisam_jax.data.datasets import open_folder

    manual = os.path.join(tmp, "manual")
    os.makedirs(os.path.join(manual, "DIS5K"))
    os.symlink(os.path.abspath(root), os.path.join(manual, "DIS5K", "DIS-TR"))
    t0 = time.perf_counter()
    builder = tfds_data.prepare("dis5k", os.path.join(tmp, "tfds"), manual, progress=False)
    prepare_s = time.perf_counter() - t0
    folder_bytes = _disk_bytes(os.path.join(root, "im")) + _disk_bytes(os.path.join(root, "gt"))
    tfds_bytes = _disk_bytes(os.fspath(builder.data_dir))
    _emit(bench="data_disk", images=builder.info.splits["train"].num_examples,
          folder_mib=round(folder_bytes / 2 ** 20, 2), tfds_mib=round(tfds_bytes / 2 ** 20, 2),
          tfds_over_folder=round(tfds_bytes / folder_bytes, 4), prepare_s=round(prepare_s, 2))
    return {"folders": open_folder(os.path.join(root, "im"), os.path.join(root, "gt"), name="DIS5K-TR"),
            "tfds": tfds_data.open_dataset("DIS5K-TR", os.path.join(tmp, "tfds"))}


def bench_pipeline(d, source: str, n: int, workers: int, threads: int, kind: str):
    from pisam_jax.data import pipeline

    if kind == "train":
        ds = pipeline.train_dataset([d], batch_size=1, seed=0, shard_index=0, shard_count=1,
                                    threads=threads, workers=workers)
    else:
        ds = pipeline.eval_iter(pipeline.eval_dataset(d, shard_index=0, shard_count=1).repeat(None),
                                threads=threads, workers=workers)
    it = iter(ds)
    first = next(it)
    for _ in range(max(1, workers * 2 - 1)):  # warm up (worker start, first decodes)
        next(it)
    sample_mib = sum(v.nbytes for v in first.values() if isinstance(v, np.ndarray)) / 2 ** 20
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - t0
    _emit(bench="data_pipeline", pipeline=kind, source=source, out_size=1024, src_size=max(d[0].height, d[0].width),
          workers=workers, threads=threads, images=n, images_per_s=round(n / dt, 2),
          sample_mib=round(sample_mib, 2), cpus=os.cpu_count())
    return n / dt


def _click_inputs(size: int, count: int):
    """(pred, gt) pairs: synthetic masks as GT, predictions with holes, extra blobs and shifts."""
    import cv2
    from pisam_jax.data import synthetic

    out = []
    for i in range(count):
        _, mask, _ = synthetic.generate_sample(7, i, size=max(size, 256))
        gt = cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR)
        rng = np.random.default_rng(i)
        pred = np.roll(gt > 128, rng.integers(-3, 4, 2), axis=(0, 1))
        for _ in range(8):
            r, c, rad = *rng.integers(0, size, 2), int(rng.integers(2, size // 16 + 3))
            cv2.circle(pred.view(np.uint8), (int(c), int(r)), rad, int(rng.integers(0, 2)), -1)
        out.append((pred, gt))
    return out


def _reference_clicks(pred, gt, rng):
    """The reference's PointInteract.get_points_coor for one sample (torch + cv2)."""
    import cv2
    import torch
    import torch.nn.functional as F

    L = torch.from_numpy(gt.astype(np.float32)) / 255
    P = torch.from_numpy(pred.astype(np.float32))
    pts = []
    for err, flag in (((L - P) == 1).float(), 1), (((L - P) == -1).float(), 0):
        e = -F.max_pool2d(-F.pad(err[None, None], (1, 1, 1, 1)), 3, stride=1)[0, 0]
        num, lab = cv2.connectedComponents(e.numpy().astype(np.uint8))
        for k in range(1, num):
            area = int((lab == k).sum())
            if area >= 2:
                pts.append((area, flag, k, lab))
    if not pts:
        return
    areas = torch.tensor([p[0] for p in pts])
    n = int(rng.integers(1, min(10, len(pts)) + 1))
    for j in torch.topk(areas, n).indices.tolist():
        nz = torch.nonzero(torch.from_numpy(pts[j][3] == pts[j][2]))
        nz[int(rng.integers(len(nz)))]


def bench_clicks(size: int, count: int):
    from pisam_jax.data import clicks

    inputs = _click_inputs(size, count)
    for name, fn in (("ours", lambda p, g, r: clicks.simulate_clicks(p, g, r)),
                     ("reference_torch_cv2", _reference_clicks)):
        rng = np.random.default_rng(0)
        fn(*inputs[0], rng)
        t0 = time.perf_counter()
        for p, g in inputs:
            fn(p, g, rng)
        ms = (time.perf_counter() - t0) / count * 1e3
        _emit(bench="click_simulation", impl=name, size=size, samples=count, ms_per_sample=round(ms, 3))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.data")
    ap.add_argument("--n", type=int, default=24, help="images timed per pipeline case")
    ap.add_argument("--workers", type=int, default=2, help="N for the worker-process case")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the folders / TFDS comparison")
    ap.add_argument("--size", type=int, default=2048, help="synthetic source long side")
    ap.add_argument("--data", default=None, help="existing folder with im/ and gt/ (else generated)")
    ap.add_argument("--images", type=int, default=16, help="synthetic images generated (without --data)")
    ap.add_argument("--click_samples", type=int, default=20)
    a = ap.parse_args(argv)
    from pisam_jax.data import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = a.data
        if root is None:
            root = os.path.join(tmp, "synthetic")
            synthetic.generate(root, a.images, size=a.size, seed=0, progress=False)
        sources = open_sources(root, tmp)
        for w in (0, a.workers):
            rates = {"folders": [], "tfds": []}
            for _ in range(a.rounds):
                for source, r in rates.items():
                    r.append(bench_pipeline(sources[source], source, a.n, w, a.threads, "train"))
            med = {s: float(np.median(r)) for s, r in rates.items()}
            _emit(bench="data_sources", pipeline="train", workers=w, threads=a.threads, rounds=a.rounds,
                  folders_images_per_s=round(med["folders"], 2), tfds_images_per_s=round(med["tfds"], 2),
                  tfds_over_folders=round(med["tfds"] / med["folders"], 3))
        for w in (0, a.workers):
            bench_pipeline(sources["folders"], "folders", a.n, w, a.threads, "eval")
    for size in (256, 1024):
        bench_clicks(size, a.click_samples)


if __name__ == "__main__":
    main()
