"""Benchmark: ``pisam_jax.ops.deform_conv.deform_conv2d`` vs ``torchvision.ops.deform_conv2d`` in one process.

    python -m bench.deform_conv [--repeats 5] [--torch-repeats N] [--kernels 3 7] [--batches 1 4] [--size 256]

Cases: forward and forward+backward (gradients w.r.t. input, offset, mask and weight, with a random cotangent),
per kernel size and batch, on a (B, size, size, 32) map with 'same' padding. One JSON line per case:
median wall times after warm-up (JAX compile time reported separately), the ratio ours / torchvision, and
peak memory:
  * ours: ``compiled.memory_analysis()``, temp + output bytes of the jitted function (arguments excluded);
  * torchvision on CPU: the torch profiler's peak "Total Allocated" over one call (tensor allocations made
    during the call, output and torchvision's im2col columns included); on CUDA: max_memory_allocated minus
    the memory allocated before the call.
The same precision, flags and threads on both sides:
  * float32 (``--dtype``, the default): true fp32 on both, JAX at ``jax_default_matmul_precision="highest"``
    (its default on GPU is TF32 for the tap contractions), torch with TF32 off (``bench.encoder.torch_device``).
    bfloat16: every torchvision tensor in bfloat16 (it takes one dtype); ours x, weight and cotangent in
    bfloat16 with the offsets and modulation float32, as our model computes (blend and tap sum in float32).
    torchvision's CPU kernel has no bfloat16 ("deformable_im2col" not implemented for 'BFloat16'); whether its
    CUDA kernel has depends on the torchvision version (the case then fails with torch's message).
  * On a GPU, ``bench.flags.FTZ_ATOMICS`` is set before JAX starts: it gives our scatter-add (the input
    gradient) the same flushing ``atom.add.f32`` that torchvision's ``atomicAdd`` already is (see that module).
  * CPU threads: torch gets as many as XLA's CPU client uses (``bench.encoder.threads``); on a GPU machine both
    run on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision

from bench.flags import set_gpu_xla_flags

ON_GPU = torch.cuda.is_available()
set_gpu_xla_flags()  # before JAX initialises its backend

import jax  # noqa: E402

from bench.encoder import sides, threads, torch_device  # noqa: E402
from pisam_jax.ops.deform_conv import deform_conv2d  # noqa: E402

CHANNELS = 32


def make_inputs(rng: np.random.Generator, batch: int, size: int, k: int) -> dict[str, np.ndarray]:
    """NHWC/HWIO fp32 inputs: offsets ~ N(0, 2^2) pixels, modulation in [0, 2) as 2*sigmoid gives."""
    taps = k * k
    return {
        "x": rng.standard_normal((batch, size, size, CHANNELS), np.float32),
        "offset": rng.normal(0.0, 2.0, (batch, size, size, 2 * taps)).astype(np.float32),
        "mask": rng.uniform(0.0, 2.0, (batch, size, size, taps)).astype(np.float32),
        "weight": (rng.standard_normal((k, k, CHANNELS, CHANNELS)) / np.sqrt(CHANNELS * taps)).astype(np.float32),
        "cotangent": rng.standard_normal((batch, size, size, CHANNELS), np.float32),
    }


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def jax_case(inputs: dict, k: int, backward: bool, repeats: int, dtype: str = "float32") -> dict:
    """Compiles our op (forward, or forward + all input gradients) and times it. bfloat16: x, weight and the
    cotangent in bfloat16, offsets and modulation float32, as our model's deformable layers give them."""
    cast = {"x": dtype, "weight": dtype, "cotangent": dtype}
    put = lambda n: jax.device_put(inputs[n].astype(cast.get(n, "float32")))  # noqa: E731
    args = tuple(put(n) for n in ("x", "offset", "mask", "weight"))
    ct = put("cotangent")
    op = lambda x, offset, mask, weight: deform_conv2d(x, offset, mask, weight, padding=k // 2)
    if backward:
        fn = lambda args, ct: jax.vjp(op, *args)[1](ct)
    else:
        fn = lambda args, ct: op(*args)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(args, ct).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    run = lambda: jax.block_until_ready(compiled(args, ct))
    return {
        "ours_ms": median_ms(run, warmup=1, repeats=repeats),
        "ours_compile_s": compile_s,
        "ours_peak_mb": (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20,
    }


def torch_peak_mb(call) -> float:
    """Peak tensor memory allocated during one call (see the module docstring)."""
    if ON_GPU:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    allocated = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(allocated, default=0) / 2**20


def torch_case(inputs: dict, k: int, backward: bool, repeats: int, dtype: str = "float32") -> dict:
    """Times torchvision's op on the same data, NCHW (on CUDA when available), every tensor in ``dtype``
    (torchvision takes one dtype for all)."""
    device, t_dtype = torch_device(), getattr(torch, dtype)
    nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2).copy(), device=device, dtype=t_dtype)
    x, offset, mask, ct = (nchw(inputs[n]) for n in ("x", "offset", "mask", "cotangent"))
    weight = torch.tensor(inputs["weight"].transpose(3, 2, 0, 1).copy(), device=device, dtype=t_dtype)
    leaves = (x, offset, mask, weight)
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)

    def call():
        if backward:
            for t in leaves:
                t.requires_grad_(True)
                t.grad = None
            torchvision.ops.deform_conv2d(x, offset, weight, padding=(k // 2, k // 2), mask=mask).backward(ct)
        else:
            with torch.no_grad():
                torchvision.ops.deform_conv2d(x, offset, weight, padding=(k // 2, k // 2), mask=mask)
        sync()

    return {
        "torchvision_ms": median_ms(call, warmup=1, repeats=repeats),
        "torchvision_peak_mb": torch_peak_mb(call),
    }


def run_case(rng: np.random.Generator, op: str, k: int, batch: int, size: int, repeats: int,
             torch_repeats: int | None = None, dtype: str = "float32") -> dict:
    """One case, both sides in ``dtype`` (float32: at "highest" precision): the JSON record (module docstring)."""
    inputs = make_inputs(rng, batch, size, k)
    backward = op == "forward_backward"
    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32, as torchvision without TF32
    ref = torch_case(inputs, k, backward, torch_repeats or repeats, dtype)  # first: fails where torch has no kernel
    ours = jax_case(inputs, k, backward, repeats, dtype)
    record = {
        "case": f"deform_conv_{op}", "op": op, "kernel": k, "batch": batch, "shape": [batch, size, size, CHANNELS],
        **sides(ours["ours_ms"] / 1e3, ref["torchvision_ms"] / 1e3, dtype, dtype, "cuda" if ON_GPU else "cpu"),
        **{key: v for key, v in {**ours, **ref}.items() if key != "ours_ms"},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return {key: round(v, 3) if isinstance(v, float) else v for key, v in record.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of our op per case (median reported)")
    parser.add_argument("--torch-repeats", type=int, default=None, help="timed torchvision runs (default --repeats)")
    parser.add_argument("--kernels", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--size", type=int, default=256, help="feature map height and width")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' dtype")
    parser.add_argument("--ops", nargs="+", default=["forward", "forward_backward"], choices=["forward", "forward_backward"])
    args = parser.parse_args()
    print(f"threads: {threads()} (XLA's CPU client and torch)", file=sys.stderr)
    rng = np.random.default_rng(0)
    for k in args.kernels:
        for batch in args.batches:
            for op in args.ops:
                record = run_case(rng, op, k, batch, args.size, args.repeats, args.torch_repeats, args.dtype)
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
