"""SAM end to end: official-format checkpoint -> convert.sam -> load_model -> Predictor, against SamPredictor, judged
against the reference's own fp32 error (a float64 copy of the reference gives the exact values; tests/parity.py).

Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: logits ours up to 1.0e-6, the reference 1.1e-6 (ratios
<= 1.26).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from convert.keymap import ConversionError
from convert.sam import convert_sam
from pisam_jax import transforms
from pisam_jax.models import ModelError, load_model
from pisam_jax.predictor import Predictor, PromptError
from references.sam import TINY, build_torch_sam, expose_layer_norm_2d_eps_, save_official
from tests.parity import assert_as_accurate, assert_same_masks, float64, logit_band, reference_in_float64

# The IoU scores are a handful of values (one per mask): too few for the reference's error on them to be a scale.
# They come out of the whole decoder and a 256-term dot product that cancels (|IoU| ~ 0.05 from terms up to ~1), so
# their error scale is ~1e-6 of the terms, not of the result: 64 roundings (4e-6) of max|IoU|. Measured: up to 58 U
# for one score (ours under XLA's SSE4.2 path), 10-30 U typically, ours and the reference alike.
IOU_ROUNDINGS = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """conftest's tiny SAM with its LayerNorm2d inputs scaled down, so that their epsilon shows
    (``expose_layer_norm_2d_eps_``): (torch Sam, its .pth, our converted model directory)."""
    root = tmp_path_factory.mktemp("tiny_sam_exposed")
    sam = build_torch_sam(**TINY)
    assert expose_layer_norm_2d_eps_(sam) == ["image_encoder.neck.0", "image_encoder.neck.2",
                                              "prompt_encoder.mask_downscaling.0", "prompt_encoder.mask_downscaling.3",
                                              "mask_decoder.output_upscaling.0"]
    save_official(sam, root / "sam_tiny.pth")
    return sam, root / "sam_tiny.pth", convert_sam(root / "sam_tiny.pth", root / "converted")


@pytest.fixture(scope="module")
def predictor(tiny):
    """One Predictor for the prompt-only tests, so each prompt shape compiles once."""
    return Predictor(load_model(tiny[2]))


@pytest.fixture(scope="module")
def references(tiny):
    """The reference predictor and its float64 copy."""
    return SamPredictor(tiny[0]), SamPredictor(float64(tiny[0]))


def _set_image(references, image):
    with torch.no_grad():
        for r in references:
            r.set_image(image)


def _reference_predict(references, **kwargs):
    """``predict`` of the reference and of its float64 copy -> [(fp32, exact) for masks, scores, low-res]."""
    with torch.no_grad(), reference_in_float64():
        return list(zip(*(r.predict(return_logits=True, **kwargs) for r in references)))


def _reference_boxes(references, boxes, multimask):
    """``predict_torch`` of P boxes (pixels of the set image) -> [(fp32, exact) for masks, scores, low-res]."""
    runs = []
    for r in references:
        with torch.no_grad(), reference_in_float64():
            t = r.transform.apply_boxes_torch(torch.from_numpy(boxes), r.original_size)
            out = r.predict_torch(None, None, t, multimask_output=multimask, return_logits=True)
            runs.append([o.numpy() for o in out])
    return list(zip(*runs))


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_converted_config_and_provenance(tiny):
    _, pth, out = tiny
    model = load_model(out)
    cfg = model.config
    assert (cfg.model_type, cfg.image_size, cfg.encoder_embed_dim, cfg.encoder_depth) == ("custom", 256, 64, 2)
    assert (cfg.encoder_num_heads, cfg.encoder_global_attn_indexes, cfg.window_size) == (2, (1,), 7)
    assert cfg.provenance["converted_from"]["sam"] == pth.name
    assert len(cfg.provenance["converted_from"]["sha256"]) == 64


def test_every_weight_round_trips(tiny):
    """Each torch tensor lands, transposed as documented, in the converted and reloaded model."""
    from flax import nnx

    from convert.keymap import torch_names

    sam, _, out = tiny
    model = load_model(out)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Variable)))
    names = torch_names(model)
    reference = sam.state_dict()
    assert {key for key, _ in names.values()} == set(reference)
    for path, (key, layout) in names.items():
        np.testing.assert_array_equal(np.asarray(state[path][...]), layout(reference[key].numpy()), err_msg=key)


@pytest.mark.parametrize(
    "prompt",
    ["points", "box", "box_and_points", "mask_and_points", "single_point_single_mask"],
)
def test_predictor_matches_sam_predictor(predictor, references, prompt):
    image = _image(200, 150)  # portrait, so the longest-side resize and the padding both matter
    ours = predictor
    ours.set_image(image)
    _set_image(references, image)
    rng = np.random.default_rng(1)
    kwargs = {}
    if "points" in prompt or "single_point" in prompt:
        n = 1 if "single" in prompt else 3
        kwargs["point_coords"] = rng.uniform(0, [150, 200], (n, 2)).astype(np.float32)
        kwargs["point_labels"] = np.array([1, 0, 1][:n])
    if "box" in prompt:
        kwargs["box"] = np.array([20, 30, 120, 170], np.float32)
    if "mask" in prompt:
        kwargs["mask_input"] = rng.normal(0, 3, (1, 64, 64)).astype(np.float32)
    multimask = prompt != "box_and_points"
    ref_masks, ref_scores, ref_low = _reference_predict(references, multimask_output=multimask, **kwargs)
    masks, scores, low = ours.predict(multimask_output=multimask, return_logits=True, **kwargs)
    assert masks.shape == ref_masks[0].shape == (3 if multimask else 1, 200, 150)
    assert_as_accurate(f"{prompt} low-res logits", low, *ref_low)
    assert_as_accurate(f"{prompt} iou", scores, *ref_scores, roundings=IOU_ROUNDINGS)
    errors = assert_as_accurate(f"{prompt} mask logits", masks, *ref_masks)
    binary, _, _ = ours.predict(multimask_output=multimask, **kwargs)
    # Thresholded masks agree except where the logit is within float error of 0.
    assert_same_masks(f"{prompt} masks", binary, ref_masks[0], logit_band(errors))


def test_batched_prompts_equal_one_by_one(predictor, references):
    """predict_batch over P boxes returns what P separate predict calls return: the reference's."""
    image = _image(180, 240, seed=3)
    predictor.set_image(image)
    _set_image(references, image)
    boxes = np.array([[10, 10, 100, 90], [50, 40, 230, 170], [0, 0, 240, 180]], np.float32)
    ref_masks, _, ref_low = _reference_boxes(references, boxes, multimask=False)
    masks, scores, low = predictor.predict_batch(boxes=boxes, multimask_output=False, return_logits=True)
    assert masks.shape == (3, 1, 180, 240)
    assert_as_accurate("3 boxes at once, masks", masks, *ref_masks)
    assert_as_accurate("3 boxes at once, low-res", low, *ref_low)
    for i, box in enumerate(boxes):
        m, s, lo = predictor.predict(box=box, multimask_output=False, return_logits=True)
        assert_as_accurate(f"box {i} alone, masks", m, *(r[i] for r in ref_masks))
        assert_as_accurate(f"box {i} alone, low-res", lo, *(r[i] for r in ref_low))


def test_batched_images_in_one_call(tiny, references):
    """Sam.encode/decode take many images with many prompts each, without a loop over the batch: each image's
    result is the reference's for that image alone."""
    import jax.numpy as jnp
    from flax import nnx

    _, _, out = tiny
    model = load_model(out)
    pixels = [_image(256, 256, seed=s) for s in (0, 1)]
    images = [transforms.preprocess(transforms.resize_longest_side(p, 256), 256) for p in pixels]
    encode = nnx.jit(lambda m, x: m.encode(x))
    decode = nnx.jit(lambda m, f, b: m.decode(f, boxes=b, multimask_output=True))
    features = encode(model, jnp.asarray(np.stack(images)))
    boxes = np.array([[10, 10, 100, 90], [30, 40, 200, 250]], np.float32)
    low, iou = decode(model, features, jnp.asarray(np.stack([boxes, boxes])))  # (B=2, P=2, 4)
    assert low.shape == (2, 2, 3, 64, 64) and iou.shape == (2, 2, 3)
    for i, image in enumerate(pixels):
        _set_image(references, image)  # 256 x 256: the reference's resize is the identity, as ours
        assert_as_accurate(f"image {i} of 2, 2 boxes, low-res", low[i], *_reference_boxes(references, boxes, True)[2])


def test_predict_does_not_rerun_the_encoder(predictor, monkeypatch):
    predictor.set_image(_image(64, 64))
    monkeypatch.setattr(predictor, "_encode", lambda *a: pytest.fail("encoder re-ran"))
    predictor.predict(box=np.array([5, 5, 50, 50]))
    predictor.predict(point_coords=np.array([[10, 10]]), point_labels=np.array([1]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(box=np.array([10, 10, 10, 50])), "zero area"),
        (dict(box=np.array([40, 10, 10, 50])), "is inverted"),
        (dict(box=np.array([np.nan, 10, 20, 50])), "not a finite number"),
        (dict(box=np.array([10, 10, 90, 50])), "outside"),
        (dict(point_coords=np.array([[1, 2]])), "together"),
        (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([2])), "labels"),
        (dict(mask_input=np.zeros((1, 32, 32))), "mask_input"),
        (dict(), "at least one prompt"),
    ],
)
def test_bad_prompts_are_named(predictor, kwargs, message):
    predictor.set_image(_image(60, 80))
    with pytest.raises(PromptError, match=message):
        predictor.predict(**kwargs)


def test_predict_before_set_image_is_an_error(tiny):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(load_model(tiny[2])).predict(box=np.array([0, 0, 5, 5]))


# --- converter errors: every mismatch is listed, nothing is written -------------------------------------


def _convert_modified(tmp_path, sam, edit):
    sd = sam.state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "edited.pth")
    out = tmp_path / "out"
    try:
        convert_sam(tmp_path / "edited.pth", out)
    finally:
        assert not out.exists(), "a failed conversion left an output directory"


def test_missing_unexpected_and_misshapen_keys_are_listed(tiny, tmp_path):
    def edit(sd):
        del sd["mask_decoder.iou_token.weight"]
        sd["mask_decoder.extra.weight"] = torch.zeros(3)
        sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)

    with pytest.raises(ConversionError) as e:
        _convert_modified(tmp_path, tiny[0], edit)
    text = str(e.value)
    assert "missing" in text and "mask_decoder.iou_token.weight" in text
    assert "unexpected" in text and "mask_decoder.extra.weight" in text
    assert "wrong shape" in text and "prompt_encoder.no_mask_embed.weight" in text


def test_corrupt_and_foreign_files_get_clear_errors(tmp_path):
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        convert_sam(tmp_path / "corrupt.pth", tmp_path / "a")
    torch.save({"backbone.weight": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ConversionError, match="not a SAM checkpoint"):
        convert_sam(tmp_path / "foreign.pth", tmp_path / "b")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_sam(tmp_path / "absent.pth", tmp_path / "c")


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    """weights_only=True: a pickle with a callable in it is rejected instead of executed."""
    torch.save({"x": torch.zeros(1), "evil": print}, tmp_path / "code.pth")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        convert_sam(tmp_path / "code.pth", tmp_path / "out")


def test_model_type_mismatch(tiny):
    with pytest.raises(ConversionError, match="--model-type says vit_b"):
        convert_sam(tiny[1], tiny[1].parent / "never", model_type="vit_b")


def test_cli_exit_status(tiny, tmp_path):
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "convert.sam", *a], capture_output=True, text=True)  # noqa: E731
    bad = run("--checkpoint", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    good = run("--checkpoint", str(tiny[1]), "--out", str(tmp_path / "o"))
    assert good.returncode == 0, good.stderr
    assert load_model(tmp_path / "o").config.encoder_depth == 2


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a pisam-jax model directory"):
        load_model(tmp_path / "empty")
