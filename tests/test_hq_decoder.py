"""HQ-SAM: the decoder module, the converter and the predictor against ``segment_anything_hq==0.3``.

Random weights saved as the official ``sam_hq_vit_*.pth`` are (a raw state_dict), converted with
``convert.hq_sam``, compared at fp32 with the highest matmul precision (conftest) against the reference's own fp32
error, measured with a float64 copy of the reference (tests/parity.py).

Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: mask logits at the original size ours up to 6.4e-6,
the reference 5.9e-6 (the fp32 resize weights, alike on both sides); decoder outputs up to 7.1e-7; ratios <= 1.22.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything_hq import SamPredictor as HQSamPredictor

from convert.hq_sam import convert_hq_sam
from convert.keymap import ConversionError, load_torch_weights, torch_names
from convert.sam import convert_sam
from pisam_jax.modeling.hq_decoder import MaskDecoderHQ
from pisam_jax.modeling.transformer import TwoWayTransformer
from pisam_jax import transforms
from pisam_jax.models import ModelConfig, load_model
from pisam_jax.predictor import Predictor, PromptError
from references.hq import TINY, build_torch_hq_decoder, build_torch_hq_sam, save_official
from references.sam import expose_layer_norm_2d_eps_
from tests.parity import assert_as_accurate, assert_same_masks, float64, logit_band, reference_in_float64

# The IoU scores are a handful of values (one per mask): too few for the reference's error on them to be a scale.
# They come out of the whole decoder and a 256-term dot product that cancels (|IoU| ~ 0.05 from terms up to ~1), so
# their error scale is ~1e-6 of the terms, not of the result: 64 roundings (4e-6) of max|IoU|. Measured: up to 58 U
# for one score (ours under XLA's SSE4.2 path), 10-30 U typically, ours and the reference alike.
IOU_ROUNDINGS = 64


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


# --------------------------------------------------------------------------------------
# The decoder module alone, small sizes
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoders():
    """Torch MaskDecoderHQ (dim 64, ViT width 48) and ours with its weights, plus random inputs for 3 prompts."""
    torch.manual_seed(5)
    d, vit_dim, grid, prompts = 64, 48, 8, 3
    ref = build_torch_hq_decoder(transformer_dim=d, vit_dim=vit_dim, mlp_dim=128)
    assert expose_layer_norm_2d_eps_(ref) == ["output_upscaling.0", "compress_vit_feat.0", "embedding_encoder.0",
                                             "embedding_maskfeature.0"]
    ours = nnx.eval_shape(
        lambda: MaskDecoderHQ(
            transformer_dim=d,
            transformer=TwoWayTransformer(depth=2, embedding_dim=d, num_heads=8, mlp_dim=128, rngs=nnx.Rngs(0)),
            vit_dim=vit_dim,
            rngs=nnx.Rngs(0),
        )
    )
    consumed = load_torch_weights(ours, ref.state_dict())
    assert consumed == set(ref.state_dict())
    g = torch.Generator().manual_seed(6)
    inputs = dict(
        image_embeddings=torch.randn(1, d, grid, grid, generator=g),
        image_pe=torch.randn(1, d, grid, grid, generator=g),
        sparse_prompt_embeddings=torch.randn(prompts, 3, d, generator=g),
        dense_prompt_embeddings=torch.randn(prompts, d, grid, grid, generator=g),
        interm_embeddings=[torch.randn(1, grid, grid, vit_dim, generator=g)],  # BHWC, as the ViT's blocks
    )
    return ref, ours, inputs, float64(ref)


def _both(fn, ref, ref64, inputs):
    """fn(reference, inputs) in fp32 and in float64 (fn returns a tuple of tensors) -> [(fp32, exact), ...]."""
    as64 = {k: [a.double() for a in v] if isinstance(v, list) else v.double() for k, v in inputs.items()}
    with torch.no_grad():
        runs = [[o.numpy() for o in fn(r, x)] for r, x in ((ref, inputs), (ref64, as64))]
    return list(zip(*runs))


def _ours_inputs(inputs):
    return dict(
        image_embeddings=jnp.asarray(_nhwc(inputs["image_embeddings"])),
        image_pe=jnp.asarray(_nhwc(inputs["image_pe"])),
        sparse_prompt_embeddings=jnp.asarray(inputs["sparse_prompt_embeddings"].numpy()),
        dense_prompt_embeddings=jnp.asarray(_nhwc(inputs["dense_prompt_embeddings"])),
    )


SELECTIONS = [(m, h) for m in (True, False) for h in (True, False)]  # (multimask_output, hq_token_only)


@pytest.fixture(scope="module")
def ours_outputs(decoders):
    """Every output of our decoder, in one jit-compiled call (one compilation for the module tests)."""
    _, ours, inputs, _ = decoders
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state, x, vit):
        m = nnx.merge(graphdef, state)
        hq = m.hq_features(x["image_embeddings"], vit)
        out = {"hq_features": hq, "predict_masks": m.predict_masks(**x, hq_features=hq)}
        for mm, hq_only in SELECTIONS:
            out[f"{mm}/{hq_only}"] = m(**x, multimask_output=mm, hq_token_only=hq_only, interm_embeddings=[vit])
        return out

    return run(state, _ours_inputs(inputs), jnp.asarray(inputs["interm_embeddings"][0].numpy()))


def test_hq_features_and_all_masks_match(decoders, ours_outputs):
    """Step A (HQ features) and the raw decoder output: SAM's 4 masks + the HQ mask, and the 4 IoUs."""
    ref, _, inputs, ref64 = decoders

    def reference(r, x):
        vit = x["interm_embeddings"][0].permute(0, 3, 1, 2)
        hq = r.embedding_encoder(x["image_embeddings"]) + r.compress_vit_feat(vit)
        masks, iou = r.predict_masks(x["image_embeddings"], x["image_pe"], x["sparse_prompt_embeddings"],
                                     x["dense_prompt_embeddings"], hq)
        return hq.permute(0, 2, 3, 1), masks, iou

    ref_hq, ref_masks, ref_iou = _both(reference, ref, ref64, inputs)
    hq = ours_outputs["hq_features"]
    assert hq.shape == (1, 32, 32, 8)
    assert_as_accurate("hq_features", hq, *ref_hq)
    masks, iou = ours_outputs["predict_masks"]
    assert masks.shape == (3, 5, 32, 32) and iou.shape == (3, 4)
    assert_as_accurate("sam masks", masks[:, :4], *(m[:, :4] for m in ref_masks))
    assert_as_accurate("hq mask", masks[:, 4:], *(m[:, 4:] for m in ref_masks))
    assert_as_accurate("iou", iou, *ref_iou, roundings=IOU_ROUNDINGS)


@pytest.mark.parametrize("multimask_output, hq_token_only", SELECTIONS)
def test_decoder_forward_matches(decoders, ours_outputs, multimask_output, hq_token_only):
    """``MaskDecoderHQ.forward``'s selection: the best-IoU SAM mask per prompt (multimask) or mask 0,
    plus the HQ mask, or the HQ mask alone."""
    ref, _, inputs, ref64 = decoders
    ref_masks, ref_iou = _both(lambda r, x: r(**x, multimask_output=multimask_output, hq_token_only=hq_token_only),
                               ref, ref64, inputs)
    masks, iou = ours_outputs[f"{multimask_output}/{hq_token_only}"]
    name = f"decoder multimask={multimask_output} hq_token_only={hq_token_only}"
    assert masks.shape == ref_masks[0].shape == (3, 1, 32, 32) and iou.shape == ref_iou[0].shape == (3, 1)
    assert_as_accurate(f"{name} masks", masks, *ref_masks)
    assert_as_accurate(f"{name} iou", iou, *ref_iou, roundings=IOU_ROUNDINGS)


def test_multimask_selection_is_per_prompt():
    """Each prompt keeps the SAM mask (of 1..3) with its own best IoU, first on ties, as torch.max."""
    masks = jnp.arange(4 * 5, dtype=jnp.float32).reshape(4, 5, 1, 1)
    iou = jnp.asarray([[9, 0.1, 0.9, 0.5], [9, 0.7, 0.2, 0.1], [9, 0.1, 0.2, 0.8], [9, 0.3, 0.3, 0.1]])
    out, score = MaskDecoderHQ.select_hq(masks, iou, multimask_output=True, hq_token_only=False)
    best = np.array([2, 1, 3, 1])
    np.testing.assert_array_equal(score[:, 0], np.asarray(iou)[np.arange(4), best])
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.arange(4) * 5 + best + np.arange(4) * 5 + 4)


# --------------------------------------------------------------------------------------
# Whole tiny model: convert.hq_sam -> load_model -> Predictor, against segment_anything_hq.SamPredictor
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hq(tmp_path_factory):
    """(torch HQ Sam, its official-format .pth, our converted model directory)."""
    root = tmp_path_factory.mktemp("tiny_hq")
    sam = build_torch_hq_sam(**TINY, seed=1)
    expose_layer_norm_2d_eps_(sam)
    save_official(sam, root / "sam_hq_tiny.pth")
    return sam, root / "sam_hq_tiny.pth", convert_hq_sam(root / "sam_hq_tiny.pth", root / "converted")


IMAGE_HW = (200, 150)  # portrait: the longest-side resize and the padding both matter


@pytest.fixture(scope="module")
def predictors(tiny_hq):
    """Ours, the reference and its float64 copy with the same image set once: the prompt tests only run the decoder."""
    sam, _, out = tiny_hq
    image = np.random.default_rng(0).integers(0, 256, IMAGE_HW + (3,), dtype=np.uint8)
    ours, ref, ref64 = Predictor(load_model(out)), HQSamPredictor(sam), HQSamPredictor(float64(sam))
    ours.set_image(image)
    with torch.no_grad():
        ref.set_image(image)
        ref64.set_image(image)
    return ours, ref, ref64


def _reference_predict(ref, ref64, **kwargs):
    """``predict`` of the reference and of its float64 copy -> [(fp32, exact) for masks, scores, low-res]."""
    with torch.no_grad(), reference_in_float64():
        return list(zip(ref.predict(return_logits=True, **kwargs), ref64.predict(return_logits=True, **kwargs)))


def _reference_predict_torch(ref, ref64, boxes, multimask=True):
    """``predict_torch`` of P boxes -> [(fp32, exact) for masks, scores, low-res]."""
    runs = []
    for r in (ref, ref64):
        with torch.no_grad(), reference_in_float64():
            t = r.transform.apply_boxes_torch(torch.from_numpy(boxes), r.original_size)
            out = r.predict_torch(None, None, t, multimask_output=multimask, return_logits=True)
            runs.append([o.numpy() for o in out])
    return list(zip(*runs))


def test_converted_config_and_every_key(tiny_hq):
    """Every key of the torch state_dict is consumed, each tensor lands (transposed as documented) and reloads."""
    sam, pth, out = tiny_hq
    model = load_model(out)
    cfg = model.config
    assert (cfg.decoder, cfg.model_type, cfg.image_size, cfg.encoder_embed_dim) == ("hq", "custom", 256, 64)
    assert isinstance(model.mask_decoder, MaskDecoderHQ)
    assert cfg.provenance["converted_from"]["hq_sam"] == pth.name
    reference = sam.state_dict()
    names = torch_names(model)
    assert len(names) == len(reference) == 199
    assert {key for key, _ in names.values()} == set(reference)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Variable)))
    for path, (key, layout) in names.items():
        np.testing.assert_array_equal(np.asarray(state[path][...]), layout(reference[key].numpy()), err_msg=key)


def test_interm_features_match(predictors):
    ours, ref, ref64 = predictors
    assert len(ours.features.interm) == len(ref.interm_features) == 1
    assert_as_accurate("first global block", ours.features.interm[0], ref.interm_features[0].numpy(),
                       ref64.interm_features[0].numpy())


PROMPT_CASES = [  # (prompt, multimask_output, hq_token_only): every prompt kind and every option, 1 compile each
    ("box", False, False),
    ("points", True, True),
    ("box_and_points", True, False),
    ("mask_and_box", False, True),
]


@pytest.mark.parametrize("prompt, multimask, hq_token_only", PROMPT_CASES)
def test_predictor_matches_hq_sam_predictor(predictors, prompt, multimask, hq_token_only):
    ours, ref, ref64 = predictors
    rng = np.random.default_rng(1)
    kwargs = {}
    if "points" in prompt:
        kwargs["point_coords"] = rng.uniform(0, IMAGE_HW[::-1], (3, 2)).astype(np.float32)
        kwargs["point_labels"] = np.array([1, 0, 1])
    if "box" in prompt:
        kwargs["box"] = np.array([20, 30, 120, 170], np.float32)
    if "mask" in prompt:
        kwargs["mask_input"] = rng.normal(0, 3, (1, 64, 64)).astype(np.float32)
    kwargs.update(multimask_output=multimask, hq_token_only=hq_token_only)
    ref_masks, ref_scores, ref_low = _reference_predict(ref, ref64, **kwargs)
    masks, scores, low = ours.predict(return_logits=True, **kwargs)
    name = f"{prompt} multimask={multimask} hq_token_only={hq_token_only}"
    assert masks.shape == ref_masks[0].shape == (1,) + IMAGE_HW
    assert_as_accurate(f"{name} low-res logits", low, *ref_low)
    assert_as_accurate(f"{name} iou", scores, *ref_scores, roundings=IOU_ROUNDINGS)
    errors = assert_as_accurate(f"{name} mask logits", masks, *ref_masks)
    binary, _, _ = ours.predict(**kwargs)
    assert_same_masks(f"{name} masks", binary, ref_masks[0], logit_band(errors))


def test_batched_boxes_match_predict_torch(predictors):
    """P boxes in one call, as ``SamPredictor.predict_torch``: the multimask choice is made per prompt."""
    ours, ref, ref64 = predictors
    boxes = np.array([[10, 10, 100, 90], [40, 50, 140, 190], [0, 0, 150, 200], [60, 20, 90, 60]], np.float32)
    ref_masks, ref_scores, ref_low = _reference_predict_torch(ref, ref64, boxes)
    masks, scores, low = ours.predict_batch(boxes=boxes, multimask_output=True, return_logits=True)
    assert masks.shape == (4, 1) + IMAGE_HW
    assert_as_accurate("4 boxes low-res logits", low, *ref_low)
    assert_as_accurate("4 boxes iou", scores, *ref_scores, roundings=IOU_ROUNDINGS)
    assert_as_accurate("4 boxes mask logits", masks, *ref_masks)


def test_batched_images_in_one_call(predictors):
    """Sam.decode with B=2 images x P=4 prompts in one call is each image's reference (HQ features per image)."""
    ours, ref, ref64 = predictors
    boxes = np.array([[10, 10, 100, 90], [40, 50, 140, 190], [0, 0, 150, 200], [60, 20, 90, 60]], np.float32)
    other = np.random.default_rng(7).integers(0, 256, IMAGE_HW + (3,), dtype=np.uint8)
    first = ours.features
    expected = [_reference_predict_torch(ref, ref64, boxes)[2]]
    ours.set_image(other)
    second, ours.features = ours.features, first  # leave the fixture's image set
    original = {id(r): (r.features, r.interm_features) for r in (ref, ref64)}
    try:
        with torch.no_grad():
            ref.set_image(other)
            ref64.set_image(other)
        expected.append(_reference_predict_torch(ref, ref64, boxes)[2])
    finally:
        for r in (ref, ref64):
            r.features, r.interm_features = original[id(r)]
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)
    model_boxes = jnp.asarray(transforms.apply_boxes(boxes, IMAGE_HW, ours.image_size))
    low, iou = nnx.jit(lambda m, f, b: m.decode(f, boxes=b, multimask_output=True))(
        ours.model, both, jnp.stack([model_boxes, model_boxes])
    )
    assert low.shape == (2, 4, 1, 64, 64) and iou.shape == (2, 4, 1)
    for i in range(2):
        assert_as_accurate(f"image {i} of 2, 4 boxes, low-res logits", low[i], *expected[i])


def test_hq_features_are_cached_once_per_image(predictors):
    """set_image computes the HQ features once; decoding with them is decoding with them recomputed per call
    (both as the reference)."""
    ours, ref, ref64 = predictors
    features = ours.features
    g = 4 * ours.model.config.embedding_size
    assert features.hq is not None and features.hq.shape == (1, g, g, ours.model.mask_decoder.transformer_dim // 8)
    boxes = jnp.asarray(transforms.apply_boxes(np.array([[10, 10, 100, 90]], np.float32), IMAGE_HW, ours.image_size))
    decode = nnx.jit(lambda m, f: m.decode(f, boxes=boxes[None], multimask_output=False)[0])
    cached = decode(ours.model, features)
    expected = _reference_predict_torch(ref, ref64, np.array([[10, 10, 100, 90]], np.float32), multimask=False)[2]
    assert_as_accurate("HQ features cached", cached[0], *expected)
    recomputed = decode(ours.model, dataclasses.replace(features, hq=None))
    assert_as_accurate("HQ features recomputed", recomputed[0], *expected)
    zeroed = decode(ours.model, dataclasses.replace(features, hq=jnp.zeros_like(features.hq)))
    assert np.abs(np.asarray(zeroed - cached)).max() > 1e-3  # the cached features are what the decoder uses


def test_hq_token_only_needs_an_hq_model(tiny_sam):
    predictor = Predictor(load_model(tiny_sam[2]))
    with pytest.raises(PromptError, match="hq_token_only needs an HQ-SAM model"):
        predictor.predict(box=np.array([1, 1, 20, 20]), hq_token_only=True)


def test_predict_cli_with_hq_model(tiny_hq, tmp_path, capsys):
    """predict.py serves HQ-SAM models, with --hq-token-only."""
    import predict
    from PIL import Image

    image = np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    args = ["--model", str(tiny_hq[2]), "--image", str(tmp_path / "in.png"), "--box", "10", "20", "150", "110"]
    assert predict.main(args + ["--out", str(tmp_path / "mask.png"), "--hq-token-only"]) == 0, capsys.readouterr().err
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (120, 160) and set(np.unique(mask)) <= {0, 255}


# --------------------------------------------------------------------------------------
# Converter errors
# --------------------------------------------------------------------------------------


def test_sam_checkpoint_given_to_hq_converter(tiny_sam, tmp_path):
    with pytest.raises(ConversionError) as e:
        convert_hq_sam(tiny_sam[1], tmp_path / "out")
    text = str(e.value)
    assert "is a SAM checkpoint, not HQ-SAM" in text and "python -m convert.sam" in text
    for key in ("mask_decoder.hf_token.weight", "mask_decoder.hf_mlp.layers.2.bias",
                "mask_decoder.compress_vit_feat.0.weight", "mask_decoder.embedding_encoder.3.bias",
                "mask_decoder.embedding_maskfeature.1.weight"):  # fmt: skip
        assert key in text
    assert not (tmp_path / "out").exists()


def test_hq_checkpoint_given_to_sam_converter(tiny_hq, tmp_path):
    with pytest.raises(ConversionError, match=r"is an HQ-SAM checkpoint.*python -m convert\.hq_sam"):
        convert_sam(tiny_hq[1], tmp_path / "out")


def test_hq_model_type_mismatch(tiny_hq, tmp_path):
    with pytest.raises(ConversionError, match="holds a custom model but --model-type says vit_l"):
        convert_hq_sam(tiny_hq[1], tmp_path / "out", model_type="vit_l")


def test_partial_hq_checkpoint_lists_every_problem(tiny_hq, tmp_path):
    sd = tiny_hq[0].state_dict()
    del sd["mask_decoder.hf_mlp.layers.1.bias"]
    sd["mask_decoder.compress_vit_feat.1.weight"] = torch.zeros(7)
    sd["mask_decoder.hf_extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "edited.pth")
    with pytest.raises(ConversionError) as e:
        convert_hq_sam(tmp_path / "edited.pth", tmp_path / "out")
    text = str(e.value)
    assert "missing" in text and "mask_decoder.hf_mlp.layers.1.bias" in text
    assert "wrong shape" in text and "mask_decoder.compress_vit_feat.1.weight" in text
    assert "unexpected" in text and "mask_decoder.hf_extra.weight" in text
    assert not (tmp_path / "out").exists()


def test_cli_exit_status(tiny_sam, tmp_path):
    """The command line parses its flags and turns a wrong file into one line and exit status 2."""
    cmd = [sys.executable, "-m", "convert.hq_sam", "--checkpoint", str(tiny_sam[1]), "--out", str(tmp_path / "o")]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and "not HQ-SAM" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------
# Real vit_b at 1024 x 1024
# --------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_vit_b_1024_through_the_predictor(tmp_path):
    sam = build_torch_hq_sam(1024, 768, 12, 12, (2, 5, 8, 11), seed=3)
    expose_layer_norm_2d_eps_(sam)
    save_official(sam, tmp_path / "sam_hq_vit_b_random.pth")
    model = load_model(convert_hq_sam(tmp_path / "sam_hq_vit_b_random.pth", tmp_path / "converted", model_type="vit_b"))
    assert model.config == ModelConfig.preset("vit_b", decoder="hq")
    image = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    ours, ref, ref64 = Predictor(model), HQSamPredictor(sam), HQSamPredictor(float64(sam))
    ours.set_image(image)
    with torch.no_grad():
        ref.set_image(image)
        ref64.set_image(image)
    assert_as_accurate("vit_b image embedding", ours.features.embeddings[0], _nhwc(ref.features)[0],
                       _nhwc(ref64.features)[0])
    assert_as_accurate("vit_b first global block", ours.features.interm[0], ref.interm_features[0].numpy(),
                       ref64.interm_features[0].numpy())
    box = np.array([150, 100, 650, 520], np.float32)
    points = dict(
        point_coords=np.array([[400, 300], [120, 500], [700, 80]], np.float32), point_labels=np.array([1, 0, 1])
    )
    for name, kwargs in [
        ("box", dict(box=box, multimask_output=False)),
        ("box+points multimask", dict(box=box, multimask_output=True, **points)),
        ("box hq_token_only", dict(box=box, multimask_output=False, hq_token_only=True)),
    ]:
        ref_masks, ref_scores, ref_low = _reference_predict(ref, ref64, **kwargs)
        masks, scores, low = ours.predict(return_logits=True, **kwargs)
        assert_as_accurate(f"vit_b {name} low-res logits", low, *ref_low)
        assert_as_accurate(f"vit_b {name} iou", scores, *ref_scores, roundings=IOU_ROUNDINGS)
        errors = assert_as_accurate(f"vit_b {name} mask logits (600x800)", masks, *ref_masks)
        assert_same_masks(f"vit_b {name} masks", masks > 0, ref_masks[0], logit_band(errors))
