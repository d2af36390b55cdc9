"""Per-prompt decoder latency after ``set_image``: our Predictor vs the PyTorch SamPredictor, SAM and HQ-SAM.

    python -m bench.decoder [--model-type vit_b] [--repeats 20] [--prompts 1] [--cases decoder_sam decoder_hq]

(also reachable as ``python -m bench.encoder --cases decoder_sam decoder_hq``). Prints one JSON line per case.

What is timed is what a user waits for after an image is set: ``predictor.predict(box=...)`` (or
``predict_batch`` with ``--prompts`` boxes), i.e. prompt encoder + mask decoder + upsampling of the logits
to the original image, on both sides, results on the host, fp32 (JAX at "highest" precision, torch without
TF32). HQ-SAM, the same work on both sides: both compute the HQ features (two transposed-conv stacks at
256^2) in every call. ``segment_anything_hq`` does so and cannot do otherwise without changing its code, so our
predictor's cache (``set_image`` computes them once) is bypassed for the timed ratio; what the cache saves is
reported beside it as ``ours_cached_ms`` (our ``predict`` as users get it). Random weights
(``references.sam`` / ``references.hq``: the packages' models, every size a parameter, norms perturbed)
converted by ``convert.keymap.load_torch_weights``.
The image encoder is not run: both predictors get the same random image features
(embedding and global-block outputs), which the decoder's cost does not depend on.
The first call checks that the low-res logits agree.

Timing: median wall time of ``--repeats`` calls after a warm-up (ours: the warm-up compiles, its
time is ``compile_s``); torch under ``torch.inference_mode``, on the GPU when there is one
(``bench.encoder.torch_device``). Both sides bring the results to the host, as a user's call does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.encoder import (
    encoder_config,
    median_seconds,
    model_config,
    random_model,
    sides,
    torch_device,
    torch_synced,
)

ORIGINAL_SIZE = (768, 1024)  # a 4:3 landscape photo: resized to 768x1024, padded to 1024


def _models(model_type: str, decoder: str, image_size: int = 1024):
    """(torch Sam, our Sam) with the same random weights; ``model_type`` "tiny" is a 2-block ViT."""
    from convert.keymap import load_torch_weights
    from pisam_jax.models import abstract_model

    if decoder == "hq":
        from references.hq import build_torch_hq_sam as build
    else:
        from references.sam import build_torch_sam as build
    ref = build(image_size, **encoder_config(model_type))
    ours = abstract_model(model_config(model_type, decoder, image_size))
    load_torch_weights(ours, ref.state_dict())
    return ref, ours


def _input_size(config) -> tuple[int, int]:
    """``ORIGINAL_SIZE`` resized to the model's input (longest side ``image_size``)."""
    return tuple(round(s * config.image_size / max(ORIGINAL_SIZE)) for s in ORIGINAL_SIZE)


def _random_features(config, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random image features of ``config``: the embedding (1, g, g, 256) and the global blocks' outputs."""
    g = config.embedding_size
    emb = rng.standard_normal((1, g, g, config.prompt_embed_dim), dtype=np.float32)
    interm = [rng.standard_normal((1, g, g, config.encoder_embed_dim), dtype=np.float32)
              for _ in config.encoder_global_attn_indexes]  # fmt: skip
    return emb, interm


def _set_features(ours, ref, config, rng, device: str) -> None:
    """Gives both predictors the same random image features, as ``set_image`` would leave them."""
    import torch

    from pisam_jax.models import ImageFeatures

    emb, interm = _random_features(config, rng)
    input_size = _input_size(config)
    ours.set_features(ImageFeatures(jnp.asarray(emb), tuple(jnp.asarray(x) for x in interm)), ORIGINAL_SIZE, input_size)
    ref.reset_image()
    ref.features = torch.from_numpy(emb.transpose(0, 3, 1, 2).copy()).to(device)
    ref.interm_features = [torch.from_numpy(x).to(device) for x in interm]  # HQ-SAM's predictor reads these
    ref.original_size, ref.input_size, ref.is_image_set = ORIGINAL_SIZE, input_size, True


def random_predictor(config):
    """Our ``Predictor`` of a random-weight model of ``config``, random image features set for an
    ``ORIGINAL_SIZE`` image (the RGB embedding too for Pi-SAM), as ``set_image`` would leave them."""
    from pisam_jax.models import ImageFeatures
    from pisam_jax.predictor import Predictor

    rng = np.random.default_rng(0)
    emb, interm = _random_features(config, rng)
    rgb = None
    if config.decoder == "pi":
        rgb = jnp.asarray(rng.standard_normal((1, config.image_size, config.image_size, 8), dtype=np.float32))
    predictor = Predictor(random_model(config))
    features = ImageFeatures(jnp.asarray(emb), tuple(map(jnp.asarray, interm)), rgb=rgb)
    predictor.set_features(features, ORIGINAL_SIZE, _input_size(config))
    return predictor


def bench_decoder(args, decoder: str) -> dict:
    import torch

    from pisam_jax.predictor import Predictor

    if decoder == "hq":
        from segment_anything_hq import SamPredictor
    else:
        from segment_anything import SamPredictor

    device = torch_device()
    ref_model, model = _models(args.model_type, decoder, getattr(args, "img_size", 1024))
    ours, ref = Predictor(model), SamPredictor(ref_model.to(device))
    rng = np.random.default_rng(0)
    _set_features(ours, ref, model.config, rng, device)
    cached = ours.features
    if decoder == "hq":  # the same work as segment_anything_hq: HQ features in every call (module docstring)
        ours.features = dataclasses.replace(cached, hq=None)
    h, w = ORIGINAL_SIZE
    x0, y0 = rng.uniform(0, [w / 2, h / 2], (args.prompts, 2)).T
    boxes = np.stack([x0, y0, x0 + w / 3, y0 + h / 3], axis=1).astype(np.float32)

    def run_ours():
        if args.prompts == 1:
            return ours.predict(box=boxes[0], multimask_output=False)
        return ours.predict_batch(boxes=boxes, multimask_output=False)

    @torch_synced
    def run_torch():
        with torch.inference_mode():
            if args.prompts == 1:
                return ref.predict(box=boxes[0], multimask_output=False)
            t_boxes = ref.transform.apply_boxes_torch(torch.from_numpy(boxes).to(device), ORIGINAL_SIZE)
            return [x.cpu().numpy() for x in ref.predict_torch(None, None, t_boxes, multimask_output=False)]

    torch_low = np.asarray(run_torch()[2])  # also the warm-up
    torch_s = median_seconds(run_torch, args.repeats)
    t0 = time.perf_counter()
    low = run_ours()[2]
    compile_s = time.perf_counter() - t0
    ours_s = median_seconds(run_ours, args.repeats)
    extra = {}
    if decoder == "hq":
        ours.features = cached
        run_ours()  # compiles the cached-features variant
        extra["ours_cached_ms"] = round(1e3 * median_seconds(run_ours, args.repeats), 3)

    err = float(np.abs(low - torch_low).max())
    return {
        "case": f"decoder_{decoder}",
        "model_type": args.model_type,
        "prompts": args.prompts,
        "original_size": list(ORIGINAL_SIZE),
        **sides(ours_s, torch_s, "float32", "float32", device),
        "repeats": args.repeats,
        "compile_s": round(compile_s, 2),
        "ours_ms_per_prompt": round(1e3 * ours_s / args.prompts, 3),
        "torch_ms_per_prompt": round(1e3 * torch_s / args.prompts, 3),
        **extra,
        "max_abs_err_low_res": err,
        "max_rel_err_low_res": err / float(np.abs(torch_low).max()),
    }


CASES = {"decoder_sam": lambda args: bench_decoder(args, "sam"), "decoder_hq": lambda args: bench_decoder(args, "hq")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=1, help="boxes per call (1: predict, more: predict_batch)")


def main(argv=None) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 everywhere, as torch's matmuls
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls after the warm-up (median reported)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.prompts < 1:
        parser.error("--repeats and --prompts must be at least 1")
    for case in args.cases:
        print(json.dumps(CASES[case](args)), flush=True)


if __name__ == "__main__":
    main()
