"""The real SAM sizes: vit_b end to end at 1024x1024 against segment_anything (judged against the reference's own
fp32 error, measured with a float64 copy; tests/parity.py); vit_l and vit_h converted and loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything import SamPredictor, sam_model_registry

from convert.keymap import torch_names
from convert.sam import convert_sam
from pisam_jax.models import ModelConfig, load_model
from pisam_jax.predictor import Predictor
from references.sam import build_torch_sam, expose_layer_norm_2d_eps_, save_official
from tests.parity import assert_as_accurate, assert_same_masks, float64, logit_band, reference_in_float64

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_b")
    sam = build_torch_sam(1024, 768, 12, 12, (2, 5, 8, 11))
    expose_layer_norm_2d_eps_(sam)
    save_official(sam, root / "sam_vit_b_random.pth")
    model = load_model(convert_sam(root / "sam_vit_b_random.pth", root / "converted"))
    image = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    ours, ref, ref64 = Predictor(model), SamPredictor(sam), SamPredictor(float64(sam))
    ours.set_image(image)
    with torch.no_grad():
        ref.set_image(image)
        ref64.set_image(image)
    return ours, ref, ref64


def test_vit_b_detected_as_the_official_model(vit_b):
    config = vit_b[0].model.config
    assert config == ModelConfig.preset("vit_b")


def test_vit_b_image_embedding(vit_b):
    ours, ref, ref64 = vit_b
    nhwc = lambda r: r.features[0].permute(1, 2, 0).numpy()  # noqa: E731
    assert_as_accurate("vit_b image embedding", ours.features.embeddings[0], nhwc(ref), nhwc(ref64))


@pytest.mark.parametrize("prompt", ["points", "box", "box_and_points", "mask_and_box"])
def test_vit_b_predictions(vit_b, prompt):
    ours, ref, ref64 = vit_b
    kwargs = {}
    if "points" in prompt:
        kwargs.update(point_coords=np.array([[400, 300], [120, 500], [700, 80]], np.float32), point_labels=np.array([1, 0, 1]))
    if "box" in prompt:
        kwargs["box"] = np.array([150, 100, 650, 520], np.float32)
    if "mask" in prompt:
        kwargs["mask_input"] = np.random.default_rng(2).normal(0, 4, (1, 256, 256)).astype(np.float32)
    with torch.no_grad(), reference_in_float64():
        ref_masks, ref_scores, ref_low = zip(*(r.predict(return_logits=True, **kwargs) for r in (ref, ref64)))
    masks, scores, low = ours.predict(return_logits=True, **kwargs)
    assert_as_accurate(f"vit_b {prompt} low-res logits", low, *ref_low)
    assert_as_accurate(f"vit_b {prompt} iou predictions", scores, *ref_scores, roundings=64)  # test_sam_model's IoU
    errors = assert_as_accurate(f"vit_b {prompt} mask logits (600x800)", masks, *ref_masks)
    assert_same_masks(f"vit_b {prompt} masks", masks > 0, ref_masks[0], logit_band(errors))


@pytest.mark.parametrize("model_type", ["vit_l", "vit_h"])
def test_large_models_convert_and_load(model_type, tmp_path):
    """Random official-layout vit_l / vit_h checkpoints: every key consumed, every parameter filled, the same values back."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sam_model_registry[model_type]().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    torch.save(state_dict, tmp_path / f"sam_{model_type}.pth")
    model = load_model(convert_sam(tmp_path / f"sam_{model_type}.pth", tmp_path / "converted"))
    assert model.config == ModelConfig.preset(model_type)
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Variable)))
    names = torch_names(model)
    assert {key for key, _ in names.values()} == set(state_dict)
    for path, (key, layout) in names.items():
        np.testing.assert_array_equal(np.asarray(ours[path][...]), layout(state_dict[key].numpy()), err_msg=key)
