"""How many kernels one call launches: the compiled HLO of the decoders and of the deformable convolution.

    python -m bench.hlo [--cases decoder_sam decoder_hq pi_box pi_clicks deform3 deform7] [--model-type vit_b]
                        [--code-paths cpu|accelerator]

Prints one JSON line per case, on whatever backend JAX runs (the GPU's counts come from ``bench/gpu.sh``):
  * ``kernels``: the executable's operations that run as kernels (fusions, matmuls, convolutions, library calls,
    copies, ...; not parameters, constants, tuples or bitcasts), a while loop's body counted once per iteration
    (its known trip count), so a 49-tap scan shows as 49 bodies;
  * ``fusions``, ``dots`` (matmuls and convolutions outside fusions), ``custom_calls`` (cuBLAS, cuDNN, ...) and
    ``loop_iterations`` alike;
  * ``host_overhead_us`` (predictor cases): the wall time of a ``Predictor`` call minus its jitted work (the same
    jitted functions called on the same arguments with nothing else around them): Python, argument handling,
    dispatch and the transfer of the results.
The decoders are compiled as the predictor calls them (one box, ``multimask_output=False``, a 768x1024 image),
the deformable convolution at batch 1 on a 256x256x32 map, as the Object Embedder runs it.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from bench.flags import add_code_paths_flag, code_paths, use_code_paths

NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all",
               "partition-id", "replica-id", "add-dependency"}
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (?:\([^=]*?\)|\S+) ([\w\-]+)\(")


def parse(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """HLO text -> ({computation: [instruction lines]}, the entry computation's name)."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            computations[current] = []
            entry = current if m.group(1) else entry
        elif current is not None and _INSTRUCTION.match(line):
            computations[current].append(line)
    return computations, entry


def count(computations: dict[str, list[str]], name: str) -> collections.Counter:
    """Kernel-like operations of one computation, while bodies expanded by their trip counts."""
    totals = collections.Counter()
    for line in computations[name]:
        op = _INSTRUCTION.match(line).group(1)
        if op == "while":
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            n = int(trips.group(1)) if trips else 1
            inner = count(computations, body)
            cond = count(computations, re.search(r"condition=%?([\w.\-]+)", line).group(1))
            for k, v in (inner + cond).items():
                totals[k] += n * v
            totals["loop_iterations"] += n
        elif op not in NOT_KERNELS:
            totals["kernels"] += 1
            totals["fusions"] += op == "fusion"
            totals["dots"] += op in ("dot", "convolution")
            totals["custom_calls"] += op == "custom-call"
    return totals


def kernel_counts(compiled) -> dict:
    computations, entry = parse(compiled.as_text())
    c = count(computations, entry)
    return {k: int(c[k]) for k in ("kernels", "fusions", "dots", "custom_calls", "loop_iterations")}


def _predictor(model_type: str, decoder: str):
    """A Predictor of a random model with random image features set for a 768x1024 image."""
    from bench.decoder import random_predictor
    from bench.encoder import model_config

    return random_predictor(model_config(model_type, decoder, interactor=decoder == "pi"))


def _host_overhead_us(call, jitted, repeats: int) -> float:
    """Median wall time of ``call`` minus the median of ``jitted`` (its device work, synchronised), each warmed."""
    from bench.encoder import median_seconds

    call(), jitted()
    return round(1e6 * (median_seconds(call, repeats) - median_seconds(jitted, repeats)), 1)


def bench_decoder(args, decoder: str) -> dict:
    p = _predictor(args.model_type, decoder)
    box = np.array([[100.0, 120.0, 600.0, 500.0]], np.float32)
    boxes = jnp.asarray(box * 1024 / 1024)[None]
    kw = dict(multimask_output=False, hq_token_only=False)
    decode = p._decode.lower(p._params, p.features, None, boxes, None, **kw).compile()
    low_res = p._decode(p._params, p.features, None, boxes, None, **kw)[1]
    up_kw = dict(input_size=p.input_size, original_size=p.original_size, size=p.image_size)
    upsample = p._to_original.lower(low_res, logits=False, **up_kw).compile()
    up = lambda: p._to_original(low_res, logits=False, **up_kw)  # noqa: E731
    counts = {k: a + b for (k, a), b in zip(kernel_counts(decode).items(), kernel_counts(upsample).values())}

    def jitted():
        jax.block_until_ready((p._decode(p._params, p.features, None, boxes, None, **kw), up()))

    overhead = _host_overhead_us(lambda: p.predict(box=box[0], multimask_output=False), jitted, args.repeats)
    return {"case": f"decoder_{decoder}", **counts, "host_overhead_us": overhead}


def bench_pi(args, clicks: int) -> dict:
    p = _predictor(args.model_type, "pi")
    box = np.array([100.0, 120.0, 600.0, 500.0], np.float32)
    p.predict(box=box)
    params, feats, base = p._params, p.features, p.pi_base
    boxes = jnp.asarray(box)[None, None]
    counts = collections.Counter()
    click_arrays = None
    if clicks:
        click_arrays = p._click_arrays([[(300.0 + 20 * i, 300.0, i % 2 == 0) for i in range(clicks)]])
    else:
        counts.update(kernel_counts(p._pi_base.lower(params, feats, boxes).compile()))
    counts.update(kernel_counts(p._pi_refine.lower(params, feats, base, click_arrays).compile()))
    return {"case": "pi_clicks" if clicks else "pi_box", "clicks": clicks, **dict(counts)}


def bench_deform(args, k: int) -> dict:
    from pisam_jax.ops.deform_conv import deform_conv2d

    s = jax.ShapeDtypeStruct
    shapes = (s((1, 256, 256, 32), jnp.float32), s((1, 256, 256, 2 * k * k), jnp.float32),
              s((1, 256, 256, k * k), jnp.float32), s((k, k, 32, 32), jnp.float32))
    compiled = jax.jit(lambda *a: deform_conv2d(*a, padding=k // 2)).lower(*shapes).compile()
    return {"case": f"deform{k}", "batch": 1, **kernel_counts(compiled)}


CASES = {
    "decoder_sam": lambda a: bench_decoder(a, "sam"),
    "decoder_hq": lambda a: bench_decoder(a, "hq"),
    "pi_box": lambda a: bench_pi(a, 0),
    "pi_clicks": lambda a: bench_pi(a, 5),
    "deform3": lambda a: bench_deform(a, 3),
    "deform7": lambda a: bench_deform(a, 7),
}


def main(argv=None) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeats", type=int, default=10, help="timed predictor calls for the host overhead")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    add_code_paths_flag(parser)
    args = parser.parse_args(argv)
    use_code_paths(args.code_paths)
    device = jax.devices()[0]
    for case in args.cases:
        result = {**CASES[case](args), "backend": jax.default_backend(), "device": device.device_kind,
                  "code_paths": code_paths()}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
