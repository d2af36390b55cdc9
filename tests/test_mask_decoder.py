"""Parity of SAM's mask decoder (and prompt encoder -> decoder) with segment_anything's (random weights, fp32), judged
against the reference's own fp32 error (a float64 copy gives the exact values; tests/parity.py).

Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: masks ours up to 4.1e-7, the reference 3.6e-7 (ratios
<= 1.34).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything.modeling import MaskDecoder as TorchMaskDecoder
from segment_anything.modeling import PromptEncoder as TorchPromptEncoder
from segment_anything.modeling import TwoWayTransformer as TorchTwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d as TorchLayerNorm2d

from convert.keymap import load_torch_weights
from pisam_jax.modeling.mask_decoder import MaskDecoder
from pisam_jax.modeling.prompt_encoder import PromptEncoder
from pisam_jax.modeling.transformer import TwoWayTransformer
from references.sam import expose_layer_norm_2d_eps_
from tests.parity import assert_as_accurate, float64, reference_in_float64

# The IoU scores are a handful of values (one per mask): too few for the reference's error on them to be a scale.
# They come out of the whole decoder and a 256-term dot product that cancels (|IoU| ~ 0.05 from terms up to ~1), so
# their error scale is ~1e-6 of the terms, not of the result: 64 roundings (4e-6) of max|IoU|. Measured: up to 58 U
# for one score (ours under XLA's SSE4.2 path), 10-30 U typically, ours and the reference alike.
IOU_ROUNDINGS = 64


def _perturb_layernorms(module):
    """LayerNorms default to weight 1, bias 0, which would hide a mislaid scale or bias."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, TorchLayerNorm2d)):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


def _our_decoder():
    return MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(2, 256, 8, 2048, rngs=nnx.Rngs(0)),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        rngs=nnx.Rngs(1),
    )


@pytest.fixture(scope="module")
def sam_size():
    """The decoder and prompt encoder of every real SAM (vit_b/l/h share them): dim 256, depth 2, 64x64."""
    torch.manual_seed(0)
    ref_pe = TorchPromptEncoder(256, (64, 64), (1024, 1024), 16).eval()
    ref = TorchMaskDecoder(
        transformer_dim=256,
        transformer=TorchTwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    ).eval()
    _perturb_layernorms(ref_pe)
    _perturb_layernorms(ref)
    assert expose_layer_norm_2d_eps_(ref) == ["output_upscaling.0"]
    expose_layer_norm_2d_eps_(ref_pe)
    ours = nnx.eval_shape(_our_decoder)
    load_torch_weights(ours, ref.state_dict())
    ours_pe = nnx.eval_shape(lambda: PromptEncoder(256, (64, 64), (1024, 1024), 16, rngs=nnx.Rngs(0)))
    load_torch_weights(ours_pe, ref_pe.state_dict())
    return dict(ref=ref, ref64=float64(ref), ours=ours, ref_pe=ref_pe, ref_pe64=float64(ref_pe), ours_pe=ours_pe)


def _reference(sam_size, *inputs, multimask):
    """The reference decoder on numpy inputs: (fp32, exact) pairs of (masks, iou)."""
    out = []
    for ref, dtype in ((sam_size["ref"], torch.float32), (sam_size["ref64"], torch.float64)):
        with torch.no_grad():
            out.append([o.numpy() for o in ref(*(torch.from_numpy(a).to(dtype) for a in inputs), multimask)])
    return list(zip(*out))


@pytest.fixture(scope="module")
def decode_both(sam_size):
    """Our decoder as a pure jitted function of its state, returning the multimask and the single-mask outputs.

    One compilation serves both flags (XLA shares the common work) and every test with the same shapes.
    """
    graphdef, state = nnx.split(sam_size["ours"])

    @jax.jit
    def run(state, image, pe, sparse, dense):
        decoder = nnx.merge(graphdef, state)
        return {flag: decoder(image, pe, sparse, dense, flag) for flag in (True, False)}

    return lambda *args: run(state, *args)


def _inputs(seed, b, n, images=1):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(images, 256, 64, 64)).astype(np.float32)
    pe = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    sparse = rng.normal(size=(b, n, 256)).astype(np.float32)
    dense = rng.normal(0, 0.5, size=(b, 256, 64, 64)).astype(np.float32)
    return image, pe, sparse, dense


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def test_decoder_one_image_many_prompts(sam_size, decode_both):
    """3 prompts of 3 tokens on one image: the reference repeat_interleaves the image; we take it repeated."""
    b, n = 3, 3
    image, pe, sparse, dense = _inputs(0, b, n)
    repeated = jnp.repeat(_nhwc(image), b, axis=0)  # the caller's job: one image row per prompt
    ours = decode_both(repeated, _nhwc(pe), jnp.asarray(sparse), _nhwc(dense))
    for multimask in (True, False):
        masks_ref, iou_ref = _reference(sam_size, image, pe, sparse, dense, multimask=multimask)
        masks, iou = ours[multimask]
        m = 3 if multimask else 1
        assert masks.shape == (b, m, 256, 256) and iou.shape == (b, m)
        assert_as_accurate(f"decoder(multimask={multimask}).masks", masks, *masks_ref)
        assert_as_accurate(f"decoder(multimask={multimask}).iou", iou, *iou_ref, roundings=IOU_ROUNDINGS)


def test_decoder_one_image_per_prompt(sam_size, decode_both):
    """Each prompt with its own image embedding: the reference run prompt by prompt."""
    b, n = 3, 3
    images, pe, sparse, dense = _inputs(7, b, n, images=b)
    per_prompt = [_reference(sam_size, images[i : i + 1], pe, sparse[i : i + 1], dense[i : i + 1], multimask=True)
                  for i in range(b)]
    masks_ref, iou_ref = ([np.concatenate([p[k][j] for p in per_prompt]) for j in range(2)] for k in range(2))
    masks, iou = decode_both(_nhwc(images), _nhwc(pe), jnp.asarray(sparse), _nhwc(dense))[True]
    assert_as_accurate("decoder(per-prompt images).masks", masks, *masks_ref)
    assert_as_accurate("decoder(per-prompt images).iou", iou, *iou_ref, roundings=IOU_ROUNDINGS)


def test_prompt_encoder_into_decoder(sam_size):
    """SAM's prompt path end to end under one jit: points + box + mask prompt -> masks, as Sam.forward does.

    The single image row is broadcast over the 2 prompts (SAM's one-image, many-prompts case).
    """
    rng = np.random.default_rng(11)
    b = 2
    coords = rng.uniform(0, 1024, (b, 2, 2)).astype(np.float32)
    labels = np.array([[1, 0], [-1, 1]])
    boxes = np.array([[100, 200, 600, 700], [0, 0, 1023, 1023]], np.float32)
    mask_in = rng.normal(0, 3, (b, 1, 256, 256)).astype(np.float32)
    image = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    outs = []
    for ref, ref_pe, dtype in ((sam_size["ref"], sam_size["ref_pe"], torch.float32),
                               (sam_size["ref64"], sam_size["ref_pe64"], torch.float64)):
        t = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
        with torch.no_grad(), reference_in_float64():
            sparse_t, dense_t = ref_pe((t(coords), torch.from_numpy(labels)), t(boxes), t(mask_in))
            outs.append([o.numpy() for o in ref(t(image), ref_pe.get_dense_pe(), sparse_t, dense_t, False)])
    masks_ref, iou_ref = zip(*outs)

    pe_graph, pe_state = nnx.split(sam_size["ours_pe"])
    dec_graph, dec_state = nnx.split(sam_size["ours"])

    @jax.jit
    def predict(pe_state, dec_state, image, coords, labels, boxes, mask_in):
        prompt_encoder, decoder = nnx.merge(pe_graph, pe_state), nnx.merge(dec_graph, dec_state)
        sparse, dense = prompt_encoder((coords, labels), boxes, mask_in)
        return decoder(image, prompt_encoder.get_dense_pe(), sparse, dense, False)

    masks, iou = predict(
        pe_state, dec_state, _nhwc(image), jnp.asarray(coords), jnp.asarray(labels), jnp.asarray(boxes), _nhwc(mask_in)
    )
    assert masks.shape == (b, 1, 256, 256)
    assert_as_accurate("prompt_encoder->decoder.masks", masks, *masks_ref)
    assert_as_accurate("prompt_encoder->decoder.iou", iou, *iou_ref, roundings=IOU_ROUNDINGS)
