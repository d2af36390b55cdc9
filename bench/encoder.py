"""Image-encoder benchmark: our jitted ViT vs ``segment_anything``'s ImageEncoderViT, same process, same weights.

    python -m bench.encoder [--model-type vit_b] [--repeats 5] [--batch 1] [--img-size 1024] [--cases encoder]

Prints one JSON line per case. Both sides compute the same function: random torch weights
(with the zero-initialised tensors randomised too) converted by ``convert.keymap.load_torch_weights``;
the first run checks that the outputs agree.

Timing: median wall time of ``--repeats`` calls after one warm-up call (ours: the warm-up follows
an explicit ``lower().compile()``, whose time is reported as ``compile_s``). Torch runs under
``torch.inference_mode``, on the GPU when there is one, else with as many threads as XLA's CPU client uses
(``threads()``); TF32 off on both sides (see ``torch_device``).

Precision (``--dtype``): float32 on both sides (JAX at ``jax_default_matmul_precision="highest"``, torch with
TF32 off), or bfloat16 on both sides: ours through ``set_compute_dtype`` (float32 parameters cast at use,
LayerNorm and softmax in float32), torch's module and image cast to bfloat16 with its attention through
``F.scaled_dot_product_attention`` (the decomposed rel-pos term as the additive mask; ``sdpa_attention_``),
as segment-anything-fast does. ``bench_torch_compile`` times torch's side under ``torch.compile`` (``bench.gpu``).

Memory, two figures:
  * ``peak_rss_mib``: for each side, the rise of the process's peak resident set over one forward
    call: the peak is reset through ``/proc/self/clear_refs`` (Linux), then VmHWM after the call minus
    VmRSS before it. Weights are resident before, so this counts activations and workspace.
  * ``ours_xla_mib``: XLA's own ``compiled.memory_analysis()`` of our executable: temp + argument
    + output - alias bytes (arguments = weights and image).

To add a case (e.g. the decoder's per-prompt latency), write ``bench_<name>(args) -> dict`` and
register it in ``CASES``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import jax
import numpy as np

MIB = 2**20


# --------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_rise_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident-set rise (MiB) while running ``fn``; None where /proc/self/clear_refs is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        fn()
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def xla_memory_mib(compiled) -> float | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return total / MIB


def threads() -> int:
    """The CPU threads XLA's CPU client computes with: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _device() -> str:
    """Our side's device, e.g. "cpu:cpu, 2 threads" or "gpu:NVIDIA H200"."""
    d = jax.devices()[0]
    where = f"{d.platform}:{getattr(d, 'device_kind', '')}"
    return f"{where}, {threads()} threads" if d.platform == "cpu" else where


def torch_device_name(device: str) -> str:
    """The torch side's device in the words of ``_device``."""
    import torch

    if device == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu, {torch.get_num_threads()} threads"


def sides(ours_s: float, torch_s: float, ours_dtype: str, torch_dtype: str, device: str) -> dict:
    """The fields every bench case reports about its two sides: times (ms), ratio, dtypes and devices."""
    return {
        "ours_ms": round(1e3 * ours_s, 3), "torch_ms": round(1e3 * torch_s, 3),
        "ratio_ours_over_torch": round(ours_s / torch_s, 3),
        "ours_dtype": ours_dtype, "torch_dtype": torch_dtype,
        "ours_device": _device(), "torch_device": torch_device_name(device),
    }


def torch_device() -> str:
    """Where the PyTorch side runs: the GPU when there is one (as JAX does), else the CPU with XLA's threads.

    True fp32 on both sides: TF32 is off for torch's matmuls and cuDNN convolutions, as JAX runs with
    ``jax_default_matmul_precision="highest"``.
    """
    import torch

    torch.set_num_threads(threads())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "cuda" if torch.cuda.is_available() else "cpu"


def random_model(config, seed: int = 0):
    """Our ``Sam`` of ``config`` with N(0, 0.02^2) weights drawn on the host, for timing (speed does not depend on
    the values). ``build_model``'s initialisers compile one small program per parameter: 20-30 s on this 2-core
    machine even for the tiny models, which this avoids."""
    import jax.numpy as jnp
    from flax import nnx

    from pisam_jax.models import abstract_model

    graphdef, state = nnx.split(abstract_model(config))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape, dtype=np.float32), leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def torch_synced(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a CUDA synchronise, so that wall time covers the GPU work (a no-op on CPU)."""
    import torch

    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


# A ViT small enough for --small runs on two CPU cores (references.sam.TINY's encoder).
TINY_ENCODER = dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,))


def encoder_config(model_type: str) -> dict:
    """embed_dim, depth, num_heads, global_attn_indexes of ``model_type`` ("vit_b", ..., or "tiny")."""
    from pisam_jax.modeling.image_encoder import ENCODER_CONFIGS

    return TINY_ENCODER if model_type == "tiny" else ENCODER_CONFIGS[model_type]


def model_config(model_type: str, decoder: str, image_size: int = 1024, **fields):
    """Our ``ModelConfig`` of ``model_type`` ("vit_b", ..., or "tiny": ``TINY_ENCODER`` with SAM's decoder)."""
    from pisam_jax.models import ModelConfig

    if model_type != "tiny":
        return ModelConfig.preset(model_type, decoder=decoder, image_size=image_size, **fields)
    tiny = TINY_ENCODER
    return ModelConfig.preset("vit_b", decoder=decoder, image_size=image_size, encoder_embed_dim=tiny["embed_dim"],
                              encoder_depth=tiny["depth"], encoder_num_heads=tiny["num_heads"],
                              encoder_global_attn_indexes=tiny["global_attn_indexes"], **fields)


def sdpa_attention_(encoder) -> None:
    """Runs every attention of segment_anything's ``ImageEncoderViT`` through ``F.scaled_dot_product_attention``,
    in place: the decomposed rel-pos term (``add_decomposed_rel_pos`` on zero logits) is the additive mask."""
    import torch
    import torch.nn.functional as F
    from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos

    def forward(self, x):
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, HW, C)
        bias = None
        if self.use_rel_pos:
            zeros = torch.zeros(b * self.num_heads, h * w, h * w, dtype=q.dtype, device=q.device)
            flat_q = q.reshape(b * self.num_heads, h * w, -1)
            bias = add_decomposed_rel_pos(zeros, flat_q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            bias = bias.view(b, self.num_heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))

    for module in encoder.modules():
        if isinstance(module, Attention):
            module.forward = forward.__get__(module)


def torch_encoder(cfg: dict, device: str = "cpu"):
    """segment_anything's ``ImageEncoderViT`` of ``cfg`` on ``device`` (initialised there: seconds less for vit_h
    on a GPU), random weights (position tables too), eval mode, fp32."""
    import torch
    from segment_anything.modeling.image_encoder import ImageEncoderViT as TorchEncoder

    torch.manual_seed(0)
    with torch.device(device):
        ref = TorchEncoder(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, **cfg).eval()
    with torch.no_grad():  # the reference zero-initialises these; random values make the check meaningful
        for name, p in ref.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0.0, 0.1)
    return ref


def bench_torch_compile(args) -> dict:
    """torch's bf16 SDPA encoder (as in ``bench_encoder``) under ``torch.compile``: torch's side alone."""
    import torch

    dtype = getattr(args, "dtype", "bfloat16")
    device = torch_device()
    cfg = dict(img_size=args.img_size, window_size=14, **encoder_config(args.model_type))
    ref = torch_encoder(cfg, device).to(dtype=getattr(torch, dtype))
    if dtype == "bfloat16":
        sdpa_attention_(ref)
    image = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=getattr(torch, dtype))
    return {"case": "encoder_torch_compile", "model_type": args.model_type, "batch": args.batch, "dtype": dtype,
            "torch_dtype": dtype, "torch_device": torch_device_name(device), **time_torch_compile(ref, image, args.repeats)}


def bench_encoder(args) -> dict:
    """Whole image encoder on one (B, img, img, 3) image batch, in ``args.dtype`` on both sides."""
    import torch
    from flax import nnx

    from convert.keymap import load_torch_weights
    from pisam_jax.modeling.image_encoder import ImageEncoderViT
    from pisam_jax.modeling.precision import set_compute_dtype

    dtype = getattr(args, "dtype", "float32")
    cfg = dict(img_size=args.img_size, window_size=14, **encoder_config(args.model_type))
    device = torch_device()
    ref = torch_encoder(cfg, device)
    ours = nnx.eval_shape(lambda: ImageEncoderViT(**cfg, rngs=nnx.Rngs(0)))
    load_torch_weights(ours, ref.state_dict())
    set_compute_dtype(ours, dtype)
    t_dtype = getattr(torch, dtype)
    ref.to(device=device, dtype=t_dtype)
    if dtype == "bfloat16":
        sdpa_attention_(ref)
    graphdef, state = nnx.split(ours)
    state = jax.device_put(state)

    @jax.jit
    def encode(state, image):
        return nnx.merge(graphdef, state)(image)

    rng = np.random.default_rng(0)
    image = rng.standard_normal((args.batch, args.img_size, args.img_size, 3), dtype=np.float32)
    image_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=t_dtype)
    image_j = jax.device_put(image)

    @torch_synced
    def run_torch():
        with torch.inference_mode():
            return ref(image_t)

    def run_ours():
        return jax.block_until_ready(encode(state, image_j))

    # Torch first, while the process holds no XLA buffers.
    torch_peak = peak_rss_rise_mib(run_torch)  # also the warm-up
    torch_s = median_seconds(run_torch, args.repeats)
    y_ref = run_torch().float().cpu().numpy().transpose(0, 2, 3, 1)

    t0 = time.perf_counter()
    compiled = encode.lower(state, image_j).compile()
    compile_s = time.perf_counter() - t0
    ours_peak = peak_rss_rise_mib(run_ours)  # also the warm-up
    ours_s = median_seconds(run_ours, args.repeats)
    y, _ = run_ours()

    err = float(np.abs(np.asarray(y, np.float32) - y_ref).max())
    return {
        "case": "encoder",
        "model_type": args.model_type,
        "img_size": args.img_size,
        "batch": args.batch,
        "dtype": dtype,
        **sides(ours_s, torch_s, dtype, dtype, device),
        "torch_attention": "sdpa" if dtype == "bfloat16" else "segment_anything",
        "repeats": args.repeats,
        "compile_s": round(compile_s, 2),
        "ours_s": round(ours_s, 4),
        "torch_s": round(torch_s, 4),
        "ours_peak_rss_mib": None if ours_peak is None else round(ours_peak, 1),
        "torch_peak_rss_mib": None if torch_peak is None else round(torch_peak, 1),
        "ours_xla_mib": None if (m := xla_memory_mib(compiled)) is None else round(m, 1),
        "max_abs_err": err,
        "max_rel_err": err / float(np.abs(y_ref).max()),
    }


def time_torch_compile(module, image, repeats: int) -> dict:
    """``torch.compile(module)`` timed as the eager module is: {"torch_compile_ms", "torch_compile_s"} (the first
    call's time), or {"torch_compile": "failed: ..."} where it does not work on this machine."""
    import torch

    compiled = torch.compile(module)

    @torch_synced
    def run():
        with torch.inference_mode():
            return compiled(image)

    try:
        t0 = time.perf_counter()
        run()
        first_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - any failure of the compiler is reported, not fatal
        return {"torch_compile": f"failed: {type(e).__name__}: {e}"[:300]}
    return {"torch_compile_ms": round(1e3 * median_seconds(run, repeats), 3), "torch_compile_s": round(first_s, 2)}


def _decoder_case(decoder: str) -> Callable[[argparse.Namespace], dict]:
    """Per-prompt decoder latency (SAM or HQ-SAM) after set_image, from ``bench/decoder.py``."""

    def run(args):
        from bench.decoder import bench_decoder

        return bench_decoder(args, decoder)

    return run


CASES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "encoder": bench_encoder,
    "decoder_sam": _decoder_case("sam"),
    "decoder_hq": _decoder_case("hq"),
}


def main(argv=None) -> None:
    # True fp32 matmuls on every backend (GPU would otherwise use TF32), as torch's default for matmul.
    jax.config.update("jax_default_matmul_precision", "highest")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (median reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' compute dtype")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--prompts", type=int, default=1, help="decoder cases: boxes per call")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    for case in args.cases:
        print(json.dumps(CASES[case](args)), flush=True)


if __name__ == "__main__":
    main()
