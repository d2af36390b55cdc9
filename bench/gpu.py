"""The whole ours-vs-PyTorch comparison in one process: one JSON line per case, then the README's table.

    bash bench/gpu.sh [OUT.jsonl]            # on one GPU (the driver; sets the flags below)
    bash bench/gpu.sh --small [OUT.jsonl]    # every kind of case at tiny sizes, on CPU (tests/test_bench.py)
    python -m bench.gpu [--small] [--out FILE] [--table FILE] [--budget-s 480] [--only SUBSTRING ...]

The cases (full size; ``--small`` runs each kind at tiny sizes, fewer repeats):
  * SAM and HQ-SAM decoders, 1 and 64 box prompts per call (``bench.decoder``);
  * Pi-SAM, a new box and 5 clicks (``bench.pisam``);
  * deformable convolution 3x3 and 7x7, batch 1 and 8, forward and forward + backward, and the forward in
    bfloat16 where torchvision's CUDA kernel has it (``bench.deform_conv``; not in ``--small``: none on CPU);
  * image encoder, vit_b and vit_h, bfloat16 and float32, batch 1 and 8 (``bench.encoder``: bfloat16 on both
    sides, torch's attention through SDPA), each model followed by its stage-1 train step, batch 4
    (``bench.train_step.compare_stage1``); then, if time is left, torch's bfloat16 encoder under
    ``torch.compile`` against our same-size time (guarded: a failure is reported, not fatal).
Each case's record has ``ours_ms``, ``torch_ms``, ``ratio_ours_over_torch`` and each side's dtype and device
(fairness: see each bench's docstring). A case that fails is a line with ``error``; cases left when
``--budget-s`` is spent are lines with ``skipped`` (the cases run in the order above, the goals' first).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Iterator

from bench.flags import set_gpu_xla_flags

set_gpu_xla_flags()  # before JAX initialises its backend (bench/flags.py says why it is fair)

import jax  # noqa: E402

Case = tuple[str, Callable[[], list[dict]]]


def _encoder(model_type, dtype, batch, img_size, repeats) -> Callable[[], list[dict]]:
    from bench.encoder import bench_encoder

    return lambda: [bench_encoder(Namespace(model_type=model_type, dtype=dtype, batch=batch, img_size=img_size,
                                            repeats=repeats))]


def _decoder(model_type, decoder, prompts, img_size, repeats) -> Callable[[], list[dict]]:
    from bench.decoder import bench_decoder

    return lambda: [bench_decoder(Namespace(model_type=model_type, prompts=prompts, img_size=img_size,
                                            repeats=repeats), decoder)]


def _pi(model_type, img_size, repeats) -> Callable[[], list[dict]]:
    from bench.pisam import bench_pi

    return lambda: bench_pi(Namespace(model_type=model_type, img_size=img_size, clicks=5, repeats=repeats))


def _deform(op, k, batch, size, repeats, dtype="float32") -> Callable[[], list[dict]]:
    import numpy as np

    from bench.deform_conv import run_case

    return lambda: [run_case(np.random.default_rng(0), op, k, batch, size, repeats, dtype=dtype)]


def _train(name, batch, steps) -> Callable[[], list[dict]]:
    from bench.train_step import compare_stage1

    return lambda: [compare_stage1(name, batch, steps)]


def _torch_compile(model_type, batch, img_size, repeats) -> Callable[[], list[dict]]:
    from bench.encoder import bench_torch_compile

    return lambda: [bench_torch_compile(Namespace(model_type=model_type, dtype="bfloat16", batch=batch,
                                                  img_size=img_size, repeats=repeats))]


def cases(small: bool) -> Iterator[Case]:
    """(label, run) in the order they run; labels are the table's first column."""
    # Sizes: full, or the tiny stand-ins of --small (a 2-block 64-wide ViT; 128 / 256 px inputs).
    vits = ["tiny"] if small else ["vit_b", "vit_h"]
    enc_img, dec_img, pi_img = (128, 256, 256) if small else (1024, 1024, 1024)
    batches = [1, 2] if small else [1, 8]
    prompts = [1, 4] if small else [1, 64]
    fast, slow = (1, 1) if small else (20, 5)  # repeats of the millisecond cases, of the encoders
    dec_model = "tiny" if small else "vit_b"
    for decoder in ("sam", "hq"):
        for n in prompts:
            yield f"{decoder.upper()} decoder, {n} prompt(s) per call", _decoder(dec_model, decoder, n, dec_img, fast)
    yield "Pi-SAM box / clicks", _pi(dec_model, pi_img, fast)
    for op in ("forward", "forward_backward"):
        for k in (3, 7):
            for b in batches:
                yield f"deformable conv {op} {k}x{k}, batch {b}", _deform(op, k, b, 32 if small else 256, fast)
    if not small:  # torchvision's CPU kernel has no bfloat16; its CUDA kernel may (bench/deform_conv.py)
        for k in (3, 7):
            for b in batches:
                yield f"deformable conv forward {k}x{k}, batch {b}, bfloat16", _deform("forward", k, b, 256, fast, "bfloat16")
    # The encoders' compilations dominate a GPU run: vit_b, then each model's train step, then vit_h, so that what
    # a spent budget leaves out is the largest cases (a later run can take them with --only).
    train = ["tiny128"] if small else ["vit_b", "vit_h"]
    for i, vit in enumerate(vits):
        for dtype in ("bfloat16", "float32"):
            for b in batches:
                yield f"image encoder {vit} {dtype}, batch {b}", _encoder(vit, dtype, b, enc_img, slow)
        if i < len(train):
            name, b = train[i], 2 if small else 4
            yield f"stage-1 train step {name}, batch {b}", _train(name, b, 1 if small else 5)
    for vit in vits:
        for b in batches[:1] if small else batches:  # on CPU, one: inductor's C++ build takes half a minute
            yield f"image encoder {vit} bfloat16, batch {b}, torch.compile", _torch_compile(vit, b, enc_img, slow)


def _with_ours_from(record: dict, results: list[dict]) -> dict:
    """A torch.compile record gets our time from the eager case of the same model, dtype and batch."""
    if record.get("case") != "encoder_torch_compile":
        return record
    for r in results:
        if (r.get("case") == "encoder" and "ours_ms" in r
                and (r["model_type"], r["dtype"], r["batch"]) == (record["model_type"], record["dtype"], record["batch"])):
            if "torch_compile_ms" not in record:
                return record
            ratio = round(r["ours_ms"] / record["torch_compile_ms"], 3)
            return {**record, "ours_ms": r["ours_ms"], "torch_ms": record["torch_compile_ms"],
                    "ratio_ours_over_torch": ratio, "ours_dtype": r["ours_dtype"], "ours_device": r["ours_device"]}
    return record


def markdown_table(results: list[dict]) -> str:
    """The README's table: one row per record (a case that ran several, e.g. Pi-SAM box and clicks, gets one each)."""
    rows = ["| case | ours ms | PyTorch ms | ratio | dtype ours / torch | device ours / torch |", "|---|---|---|---|---|---|"]
    for r in results:
        label = r["label"] + (f" ({r['case']})" if r.get("case", "").startswith("pi_") else "")
        if "ratio_ours_over_torch" in r:
            rows.append(f"| {label} | {r['ours_ms']:.4g} | {r['torch_ms']:.4g} | {r['ratio_ours_over_torch']:.3g} "
                        f"| {r['ours_dtype']} / {r['torch_dtype']} | {r['ours_device']} / {r['torch_device']} |")
        else:
            why = r.get("error") or r.get("skipped") or r.get("torch_compile") or "no ratio"
            rows.append(f"| {label} | - | - | - | {why} | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="every kind of case at tiny sizes (CPU, minutes)")
    p.add_argument("--out", default="-", help="JSON lines file (default: stdout)")
    p.add_argument("--table", default="", help="also write the Markdown table here")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no case after this many seconds")
    p.add_argument("--only", nargs="+", default=[], help="run only the cases whose label contains one of these")
    a = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 cases: true fp32, as torch without TF32
    # A `timeout` (gpu.sh's hard limit) ends the run through the finally below: the table of what ran still prints.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    out = sys.stdout if a.out == "-" else open(a.out, "w")  # noqa: SIM115 - closed below
    start, results = time.perf_counter(), []
    try:
        todo = [c for c in cases(a.small) if not a.only or any(s in c[0] for s in a.only)]
        for i, (label, run) in enumerate(todo, 1):
            elapsed = time.perf_counter() - start
            print(f"[{elapsed:6.0f} s] case {i}/{len(todo)}: {label}", file=sys.stderr, flush=True)
            if elapsed > a.budget_s:
                records = [{"skipped": f"time budget of {a.budget_s:.0f} s spent"}]
            else:
                t0 = time.perf_counter()
                try:
                    records = run()
                except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                    records = [{"error": f"{type(e).__name__}: {e}"[:300]}]
                for r in records:
                    r["case_s"] = round(time.perf_counter() - t0, 1)
            for r in records:
                r = _with_ours_from({"label": label, **r}, results)
                results.append(r)
                out.write(json.dumps(r) + "\n")
                out.flush()
            gc.collect()
            _empty_torch_cache()
    finally:
        if out is not sys.stdout:
            out.close()
        table = markdown_table(results)
        print(f"\n{table}\n\n{len(results)} records in {time.perf_counter() - start:.0f} s; jax {jax.__version__} "
              f"({jax.default_backend()}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
        if a.table:
            with open(a.table, "w") as f:
                f.write(table + "\n")
    return 1 if any("error" in r for r in results) else 0


def _empty_torch_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
