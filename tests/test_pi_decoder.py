"""Pi-SAM's decoder: reference layout, RGB embedding, convert.pisam, and fp32 parity with the PyTorch reference.

The reference (``tests/pisam_reference.py``, written from PISAM_SPEC.md) gets random weights with nothing trivially
zero (perturbed LayerNorms, non-zero DCN offset/modulator convs and interactor ``out_cov``), is saved in the
official key layout (188 keys stage 1, 270 stage 2, raw or under ``model_state_dict``), converted together with a
small SAM at the real 1024 input (Pi-SAM's decoder assumes 64^2 embeddings and 256^2 / 1024^2 outputs), and
compared on the 256^2 logits and the 1024^2 logits without and with foreground and background clicks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.keymap import ConversionError, torch_names
from convert.pisam import RGB_FINGERPRINTS, check_rgb_fingerprints, convert_pisam, seed42_rgb_embed
from pisam_jax.modeling import pi_decoder
from pisam_jax.models import ModelConfig, abstract_model, load_model
from pisam_jax.overlay import BACKGROUND, FOREGROUND
from tests.parity import assert_close
from tests.pisam_reference import (
    VIT_CONFIGS,
    MaskDecoderAE,
    count,
    interact,
    perturb_,
    torch_encode,
)
from tests.pisam_reference import seed42_rgb_embed as torch_seed42_rgb_embed
from tests.sam_reference import build_torch_sam, save_official

# A SAM at Pi-SAM's real geometry (1024 input, 64^2 embedding) but 2 narrow blocks: cheap on two CPU cores.
SMALL_1024 = dict(image_size=1024, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=14)
BOX = [180.0, 150.0, 820.0, 900.0]
FG = [[0.31, 0.42], [0.55, 0.61], [0.7, 0.2]]  # (x, y) normalised with pixel centres
BG = [[0.12, 0.88], [0.9, 0.5]]


def build_reference(vit_dim: int, interactor: bool, sam=None, seed: int = 1) -> MaskDecoderAE:
    """A random reference decoder; with ``sam``, its copy of SAM's decoder is the SAM model's (as in real files)."""
    torch.manual_seed(seed)
    ref = perturb_(MaskDecoderAE(vit_dim, interact=interactor), seed=seed)
    if sam is not None:
        missing, _ = ref.load_state_dict(sam.mask_decoder.state_dict(), strict=False)
        assert not [k for k in missing if not k.startswith(NEW_MODULES)], missing
    return ref.eval()


NEW_MODULES = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature",
               "embedding_act", "mask_aspp", "output_upscaling_2", "out_act", "interact_2")


def _stage1(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("interact_2.")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pisam")
    sam = build_torch_sam(**SMALL_1024)
    save_official(sam, root / "sam_small.pth")
    ref = build_reference(64, True, sam)
    sd = ref.state_dict()
    torch.save({"model_state_dict": sd}, root / "pisam_stage2.pth")
    torch.save(_stage1(sd), root / "pisam_stage1.pth")
    stage2 = convert_pisam(root / "sam_small.pth", root / "pisam_stage2.pth", root / "stage2")
    stage1 = convert_pisam(root / "sam_small.pth", root / "pisam_stage1.pth", root / "stage1")
    return dict(root=root, sam=sam, ref=ref, stage1=stage1, stage2=stage2)


@pytest.fixture(scope="module")
def torch_outputs(setup):
    """The reference on one image and one box: 256^2 logits, 1024^2 logits without and with clicks."""
    sam, ref = setup["sam"], setup["ref"]
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (1, 3, 1024, 1024), generator=g).float()
    with torch.no_grad():
        x = sam.preprocess(image)
        emb, interm = torch_encode(sam.image_encoder, x)
        rgb_embed = torch_seed42_rgb_embed(SMALL_1024)
        rgb = rgb_embed(x)
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([BOX]), masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
        e, hyper_in, low_res = ref.base(emb, pe, sparse, dense, interm[0])
        large = ref.head(e, rgb)
        large_clicks = ref.head(interact(ref.interact_2, e, hyper_in, torch.tensor([FG]), torch.tensor([BG])), rgb)
        # (The heavy test runs the reference's whole forward; here its pieces, so the base runs once.)
    return dict(x=x.permute(0, 2, 3, 1).numpy(), e=e.permute(0, 2, 3, 1).numpy(), low_res=low_res.numpy(),
                large=large.numpy(), large_clicks=large_clicks.numpy())


@pytest.fixture(scope="module")
def jax_outputs(setup, torch_outputs):
    model = load_model(setup["stage2"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def base(state, x, boxes):
        m = nnx.merge(graphdef, state)
        features = m.encode(x)
        return features, m.pi_base(features, boxes)

    @jax.jit
    def refine(state, features, b, points, labels):
        return nnx.merge(graphdef, state).pi_refine(features, b, (points, labels))

    @jax.jit
    def refine_no_clicks(state, features, b):
        return nnx.merge(graphdef, state).pi_refine(features, b)

    features, b = base(state, jnp.asarray(torch_outputs["x"]), jnp.asarray([[BOX]]))
    points = jnp.asarray([FG + BG])
    labels = jnp.asarray([[1] * len(FG) + [0] * len(BG)])
    return dict(
        e=b.embedding, low_res=b.low_res, large=refine_no_clicks(state, features, b),
        large_clicks=refine(state, features, b, points, labels),
        # Padding slots (label -1) change nothing (D5).
        large_padded=refine(state, features, b, jnp.concatenate([points, jnp.full((1, 2, 2), 0.37)], 1),
                            jnp.concatenate([labels, jnp.full((1, 2), -1)], 1)),
    )


# -- the reference itself ------------------------------------------------------------------


def test_reference_state_dict_layout():
    """270 keys with the interactor, 188 without, in the appendix's order and shapes (vit_b)."""
    sd = MaskDecoderAE(768, interact=True).state_dict()
    keys = list(sd)
    assert len(keys) == 270 and len(_stage1(sd)) == 188
    assert len(MaskDecoderAE(768, interact=False).state_dict()) == 188
    assert keys[0] == "transformer.layers.0.self_attn.q_proj.weight"
    assert keys[keys.index("iou_prediction_head.layers.2.bias") + 1] == "hf_token.weight"
    assert keys[187] == "out_act.4.bias" and keys[188] == "interact_2.img_pe"
    assert keys[-1] == "interact_2.bnd_op.laplacian_kernel"
    shapes = {
        "compress_vit_feat.0.weight": (768, 256, 2, 2),
        "mask_aspp.mask_embedding.0.weight": (32, 33, 1, 1),
        "mask_aspp.aspp2.atrous_conv.0.offset_conv.weight": (98, 32, 7, 7),
        "mask_aspp.aspp2.atrous_conv.0.modulator_conv.weight": (49, 32, 7, 7),
        "mask_aspp.conv_out.0.weight": (32, 96, 1, 1),
        "output_upscaling_2.3.weight": (16, 8, 2, 2),
        "out_act.4.weight": (1, 8, 3, 3),
        "interact_2.img_pe": (32, 256, 256),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert "mask_aspp.conv_out.0.bias" not in sd and "mask_aspp.aspp1.atrous_conv.0.regular_conv.bias" not in sd


def test_parameter_counts_match_the_spec():
    """PISAM_SPEC 3.3, for the reference and for our decoder."""
    per_module = {
        "hf_token": 256, "hf_mlp": 139_808, "compress_vit_feat": 820_000, "embedding_encoder": 73_952,
        "embedding_maskfeature": 37_088, "embedding_act": 9_312, "mask_aspp": 311_566,
        "mask_aspp.mask_embedding": 10_464, "mask_aspp.aspp1": 17_083, "mask_aspp.aspp2": 280_883,
        "mask_aspp.conv_out": 3_136, "output_upscaling_2": 2_616, "out_act": 689,
        "interact_2.token_embed": 99_104, "interact_2.transformer": 58_688, "interact_2.out_cov": 9_248,
        "interact_2.points_flag": 64, "interact_2.bnd_op": 9,
    }
    ref = MaskDecoderAE(768, interact=True)
    assert {m: count(ref, m + ".") for m in per_module} == per_module
    assert count(ref) == 5_620_740
    stage1_new = sum(count(ref, m + ".") for m in NEW_MODULES if m != "interact_2")
    assert stage1_new == 1_395_287
    # vit_l / vit_h differ only in compress_vit_feat.0 (C_vit x 256 x 2 x 2).
    for c_vit, total in {1024: 5_882_884, 1280: 6_145_028}.items():
        assert count(ref) + (c_vit - 768) * 256 * 4 == total

    model = abstract_model(ModelConfig.preset("vit_b", decoder="pi", interactor=True))
    sizes = {key: int(np.prod(v.shape)) for key, v in _ours_by_torch_key(model.mask_decoder).items()}
    ours = lambda m: sum(n for k, n in sizes.items() if k.startswith(m + "."))  # noqa: E731
    assert {m: ours(m) for m in per_module} == per_module
    # Ours = the reference's 270 tensors (buffers img_pe and the PE matrix included) + rgb_embed (616).
    assert ours("rgb_embed") == 616
    assert sum(sizes.values()) == sum(v.numel() for v in ref.state_dict().values()) + 616


def _ours_by_torch_key(module):
    state = dict(nnx.to_flat_state(nnx.state(module, nnx.Variable)))
    return {key: state[path] for path, (key, _) in torch_names(module).items()}


@pytest.mark.parametrize("model_type", ["vit_b", pytest.param("vit_l", marks=pytest.mark.heavy),
                                        pytest.param("vit_h", marks=pytest.mark.heavy)])
def test_seed42_rgb_embed_fingerprints(model_type):
    """D2: the reconstruction gives the spec's sums, in the reference helper and in the converter."""
    ref = {k: v.numpy() for k, v in torch_seed42_rgb_embed(VIT_CONFIGS[model_type]).state_dict().items()}
    c = VIT_CONFIGS[model_type]
    ours = seed42_rgb_embed(dict(encoder_depth=c["depth"], encoder_embed_dim=c["embed_dim"], image_size=1024,
                                 encoder_num_heads=c["num_heads"], patch_size=16, window_size=14,
                                 encoder_global_attn_indexes=c["global_attn_indexes"]))
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k])
    assert check_rgb_fingerprints(ours, model_type) == "verified"
    for k, v in RGB_FINGERPRINTS[model_type].items():
        assert abs(float(ref[k].sum()) - v) < 2e-6
    if model_type == "vit_b":
        np.testing.assert_allclose(ref["0.weight"][0, :, 0, 0], [0.294122, -0.540917, 0.541550], atol=1e-6)
        with pytest.raises(ConversionError, match="does not match"):
            check_rgb_fingerprints({k: v + 1e-3 for k, v in ours.items()}, "vit_b")


# -- parity ----------------------------------------------------------------------------------


def test_object_embedding_matches(torch_outputs, jax_outputs):
    assert_close("E (256^2 x 32)", jax_outputs["e"], torch_outputs["e"], rtol=1e-4)


def test_low_res_logits_match(torch_outputs, jax_outputs):
    assert_close("pred_masks 256^2", jax_outputs["low_res"], torch_outputs["low_res"], rtol=1e-4)


def test_large_logits_match_without_clicks(torch_outputs, jax_outputs):
    assert_close("pred_masks_large 1024^2", jax_outputs["large"], torch_outputs["large"], rtol=1e-4)


def test_large_logits_match_with_clicks(torch_outputs, jax_outputs):
    ref = torch_outputs["large_clicks"]
    assert np.abs(ref - torch_outputs["large"]).max() > 1e-2 * np.abs(ref).max(), "the clicks changed nothing"
    assert_close("pred_masks_large 1024^2, 3 fg + 2 bg clicks", jax_outputs["large_clicks"], ref, rtol=1e-4)
    assert_close("padded clicks", jax_outputs["large_padded"], jax_outputs["large_clicks"], rtol=1e-5)


@pytest.mark.parametrize("band_rows", [64, 1024])
def test_head_bands_are_the_layer_by_layer_head(setup, monkeypatch, band_rows):
    """The HR head's functional forward (bands of output rows on CPU, one band elsewhere) is its modules applied in
    turn, for a batch sharing one RGB embedding; so are its gradients (the head trains in both stages)."""
    monkeypatch.setattr(pi_decoder, "HEAD_BAND_ROWS", band_rows)
    graphdef, state = nnx.split(load_model(setup["stage2"]).mask_decoder)
    rng = np.random.default_rng(7)
    # E at 64^2 (head output 256^2) keeps it quick: 4 bands of 64 rows, or one (1024 rows do not divide 256).
    e = jnp.asarray(rng.standard_normal((2, 64, 64, 32), dtype=np.float32))
    rgb = jnp.asarray(rng.standard_normal((1, 256, 256, 8), dtype=np.float32))

    def banded(state, e):
        return nnx.merge(graphdef, state).head(e, rgb)

    def layers(state, e):
        d = nnx.merge(graphdef, state)
        return d.out_act(d.output_upscaling_2(e) + rgb).transpose(0, 3, 1, 2)

    assert_close("banded head", jax.jit(banded)(state, e), jax.jit(layers)(state, e), rtol=1e-5)

    def grads(f):  # w.r.t. the decoder's state and E
        return jax.jit(jax.grad(lambda s, e: jnp.mean(jnp.tanh(f(s, e))), argnums=(0, 1)))(state, e)

    leaves = jax.tree_util.tree_leaves_with_path(grads(banded))
    for (path, got), expected in zip(leaves, jax.tree_util.tree_leaves(grads(layers)), strict=True):
        if np.abs(expected).max() > 0:  # the parameters outside the head get none
            assert_close(f"d/d{jax.tree_util.keystr(path)}", got, expected, rtol=1e-5)


def test_stage1_model_is_stage2_without_the_interactor_and_refuses_clicks(setup):
    """Same weights as the stage-2 model everywhere but interact_2 (so the no-click parity above covers it)."""
    model = load_model(setup["stage1"])
    assert model.config.interactor is False and model.mask_decoder.interact_2 is None
    stage1 = _ours_by_torch_key(model)
    stage2 = _ours_by_torch_key(load_model(setup["stage2"]))
    assert set(stage1) == {k for k in stage2 if not k.startswith("mask_decoder.interact_2.")}
    for key, value in stage1.items():
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(stage2[key][...]), err_msg=key)
    low_res, large = jax.eval_shape(lambda: model.decode_pi(model.encode(jnp.zeros((1, 1024, 1024, 3))),
                                                            jnp.asarray([[BOX]])))
    assert low_res.shape == (1, 1, 1, 256, 256) and large.shape == (1, 1, 1, 1024, 1024)
    clicks = (jnp.asarray([[FG]]), jnp.ones((1, 1, 3), jnp.int32))
    with pytest.raises(ValueError, match="interact_2"):
        jax.eval_shape(
            lambda: model.decode_pi(model.encode(jnp.zeros((1, 1024, 1024, 3))), jnp.asarray([[BOX]]), clicks)
        )


# -- the converter ---------------------------------------------------------------------------


def test_converted_config_provenance_and_every_key(setup):
    model = load_model(setup["stage2"])
    cfg = model.config
    assert (cfg.decoder, cfg.interactor, cfg.encoder_embed_dim, cfg.image_size) == ("pi", True, 64, 1024)
    prov = cfg.provenance
    assert prov["converted_from"]["stage"] == 2 and prov["converted_from"]["pisam_keys"] == 270
    assert prov["sam_decoder_equals_sam_checkpoint"] is True
    assert prov["rgb_embed"]["fingerprint"] == "no fingerprint (custom model)"
    assert "seed 42" in prov["rgb_embed"]["source"]
    # Every decoder tensor round-trips: the reference's 270 plus the reconstructed rgb_embed.
    expected = dict(setup["ref"].state_dict())
    expected.update({f"rgb_embed.{k}": v for k, v in torch_seed42_rgb_embed(SMALL_1024).state_dict().items()})
    names = torch_names(model.mask_decoder)
    state = dict(nnx.to_flat_state(nnx.state(model.mask_decoder, nnx.Variable)))
    assert {key for key, _ in names.values()} == set(expected)
    for path, (key, layout) in names.items():
        np.testing.assert_array_equal(np.asarray(state[path][...]), layout(expected[key].numpy()), err_msg=key)
    assert load_model(setup["stage1"]).config.provenance["converted_from"]["pisam_keys"] == 188


@pytest.mark.parametrize("stage,wrapped", [(1, True), (2, False)])
def test_other_file_forms_accepted(setup, tmp_path, stage, wrapped):
    """The fixture converts stage 2 wrapped and stage 1 raw; the other two forms read the same (what follows
    the reading is the same code)."""
    from convert.checkpoint import detect_encoder, read_state_dict
    from convert.pisam import _pi_state_dict

    sd = setup["ref"].state_dict()
    sd = _stage1(sd) if stage == 1 else dict(sd)
    torch.save({"model_state_dict": sd} if wrapped else sd, tmp_path / "pi.pth")
    encoder = detect_encoder(read_state_dict(setup["root"] / "sam_small.pth"))
    got, interactor = _pi_state_dict(tmp_path / "pi.pth", encoder)
    assert interactor is (stage == 2) and list(got) == list(sd)


def test_missing_and_unexpected_keys_are_listed(setup, tmp_path):
    sd = dict(setup["ref"].state_dict())
    del sd["mask_aspp.aspp2.atrous_conv.0.offset_conv.weight"]
    del sd["interact_2.out_cov.bias"]
    sd["mask_aspp.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "pi.pth")
    with pytest.raises(ConversionError) as e:
        convert_pisam(setup["root"] / "sam_small.pth", tmp_path / "pi.pth", tmp_path / "out")
    msg = str(e.value)
    for key in ("mask_aspp.aspp2.atrous_conv.0.offset_conv.weight", "interact_2.out_cov.bias",
                "mask_aspp.extra.weight"):
        assert key in msg
    assert not (tmp_path / "out").exists()


def test_model_type_mismatch_between_the_files(setup, tmp_path):
    sd = dict(setup["ref"].state_dict())
    sd["compress_vit_feat.0.weight"] = torch.zeros(768, 256, 2, 2)  # a vit_b Pi-SAM decoder
    torch.save(sd, tmp_path / "pi.pth")
    with pytest.raises(ConversionError, match="model types differ: pi.pth is a Pi-SAM decoder for vit_b"):
        convert_pisam(setup["root"] / "sam_small.pth", tmp_path / "pi.pth", tmp_path / "out")


def test_files_given_the_wrong_way_round(setup, tmp_path):
    root = setup["root"]
    with pytest.raises(ConversionError, match="not a Pi-SAM decoder checkpoint|whole SAM"):
        convert_pisam(root / "sam_small.pth", root / "sam_small.pth", tmp_path / "out")
    with pytest.raises(ConversionError, match="not a SAM checkpoint"):
        convert_pisam(root / "pisam_stage2.pth", root / "pisam_stage2.pth", tmp_path / "out")


def test_cli_dashed_flags_and_exit_status(setup, tmp_path):
    """The documented spelling (--sam-checkpoint ...) works; a user error is one line and status 2."""
    sd = dict(setup["ref"].state_dict())
    sd["compress_vit_feat.0.weight"] = torch.zeros(1280, 256, 2, 2)
    torch.save(sd, tmp_path / "pi_h.pth")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-m", "convert.pisam", f"--sam-checkpoint={setup['root'] / 'sam_small.pth'}",
         f"--pisam-checkpoint={tmp_path / 'pi_h.pth'}", f"--out={tmp_path / 'out'}"],
        cwd=root, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: model types differ")
    assert "Traceback" not in run.stderr


# -- the real size ---------------------------------------------------------------------------


@pytest.mark.heavy
def test_vit_b_end_to_end(tmp_path):
    """Real vit_b (random weights) at 1024: conversion with a verified seed-42 rgb_embed, then parity with clicks
    through the Predictor."""
    c = VIT_CONFIGS["vit_b"]
    sam = build_torch_sam(1024, c["embed_dim"], c["depth"], c["num_heads"], c["global_attn_indexes"], seed=5)
    save_official(sam, tmp_path / "sam_vit_b.pth")
    ref = build_reference(768, True, sam, seed=6)
    torch.save({"model_state_dict": ref.state_dict()}, tmp_path / "pisam_vit_b.pth")
    out = convert_pisam(tmp_path / "sam_vit_b.pth", tmp_path / "pisam_vit_b.pth", tmp_path / "out", model_type="vit_b")
    model = load_model(out)
    assert model.config.model_type == "vit_b" and model.config.provenance["rgb_embed"]["fingerprint"] == "verified"

    image = torch.randint(0, 256, (1, 3, 1024, 1024), generator=torch.Generator().manual_seed(7)).float()
    with torch.no_grad():
        x = sam.preprocess(image)
        emb, interm = torch_encode(sam.image_encoder, x)
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([BOX]), masks=None)
        low_res, large = ref(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                             interm + [torch_seed42_rgb_embed(c)(x)], fg=torch.tensor([FG]), bg=torch.tensor([BG]))
    # Ours through the Predictor, as a user runs it: pixels in, a box, then clicks in image pixels (D3).
    from pisam_jax.predictor import Predictor

    predictor = Predictor(model)
    predictor.set_image(image[0].permute(1, 2, 0).numpy().astype(np.uint8))
    _, _, ours_low = predictor.predict(box=np.array(BOX))
    clicks = [(u * 1024 - 0.5, v * 1024 - 0.5, True) for u, v in FG] + [(u * 1024 - 0.5, v * 1024 - 0.5, False) for u, v in BG]
    ours_large = predictor.refine(clicks, return_logits=True)
    assert_close("vit_b pred_masks 256^2 (Predictor)", ours_low, low_res[0].numpy(), rtol=1e-4)
    assert_close("vit_b pred_masks_large 1024^2 with clicks (Predictor.refine)", ours_large, large[0].numpy(), rtol=1e-4)


# -- the predictor: predict(box) from the 1024^2 head, refine(clicks) on cached features --------------------


@pytest.fixture(scope="module")
def pi_predictor(setup, torch_outputs):
    from pisam_jax.predictor import Predictor

    predictor = Predictor(load_model(setup["stage2"]))
    image = np.clip(torch_outputs["x"][0] * np.array([58.395, 57.12, 57.375]) + np.array([123.675, 116.28, 103.53]),
                    0, 255).round().astype(np.uint8)  # the reference's 1024^2 input back as pixels
    predictor.set_image(image)
    return predictor


def test_predictor_box_matches_the_reference_head(pi_predictor, torch_outputs):
    masks, scores, low_res = pi_predictor.predict(box=np.array(BOX), return_logits=True)
    assert masks.shape == (1, 1024, 1024) and scores.shape == (1,)
    assert_close("predictor 1024^2 logits, box", masks, torch_outputs["large"][0], rtol=1e-4)
    assert_close("predictor 256^2 logits, box", low_res, torch_outputs["low_res"][0], rtol=1e-4)


def test_predictor_refine_matches_the_reference_with_clicks(pi_predictor, torch_outputs, monkeypatch):
    pi_predictor.predict(box=np.array(BOX))
    # A click at pixel (x, y) is (x + 0.5, y + 0.5) / 1024 in the model (D3): invert the normalised test clicks.
    clicks = [(u * 1024 - 0.5, v * 1024 - 0.5, True) for u, v in FG] + [(u * 1024 - 0.5, v * 1024 - 0.5, False) for u, v in BG]
    monkeypatch.setattr(pi_predictor, "_encode", lambda *a: pytest.fail("a click re-ran the encoder"))
    monkeypatch.setattr(pi_predictor, "_pi_base", lambda *a: pytest.fail("a click re-ran the SAM transformer"))
    logits = pi_predictor.refine(clicks, return_logits=True)
    assert_close("predictor refine 1024^2 logits", logits, torch_outputs["large_clicks"][0], rtol=1e-4)
    assert pi_predictor.refine(clicks).dtype == bool


def test_predictor_batched_boxes_with_different_click_counts(pi_predictor):
    boxes = np.array([BOX, [40.0, 60.0, 500.0, 400.0]], np.float32)
    per_box = [[(300.0, 420.0, True), (700.0, 200.0, False)], [(100.0, 100.0, True)]]
    pi_predictor.predict_batch(boxes=boxes)
    together = pi_predictor.refine(per_box, return_logits=True)
    assert together.shape == (2, 1, 1024, 1024)
    for i in range(2):
        pi_predictor.predict(box=boxes[i])
        alone = pi_predictor.refine(per_box[i], return_logits=True)
        np.testing.assert_allclose(together[i], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


def test_predictor_no_clicks_is_the_box_prediction(pi_predictor):
    masks, _, _ = pi_predictor.predict(box=np.array(BOX), return_logits=True)
    np.testing.assert_array_equal(pi_predictor.refine([], return_logits=True), masks)


def test_predictor_prompt_errors(setup, pi_predictor):
    from pisam_jax.predictor import Predictor, PromptError

    with pytest.raises(PromptError, match="boxes"):
        pi_predictor.predict(point_coords=np.array([[5, 5]]), point_labels=np.array([1]))
    pi_predictor.predict(box=np.array(BOX))
    with pytest.raises(PromptError, match="outside"):
        pi_predictor.refine([(2000, 5, True)])
    stage1 = Predictor(load_model(setup["stage1"]))
    with pytest.raises(PromptError, match="interactor"):
        stage1.refine([(5, 5, True)])


def test_new_image_forgets_the_last_boxes(pi_predictor):
    """Clicks after a new image would refine the old image's boxes: set_image / set_features forget them."""
    pi_predictor.predict(box=np.array(BOX))
    pi_predictor.set_features(pi_predictor.features, pi_predictor.original_size, pi_predictor.input_size)
    with pytest.raises(RuntimeError, match="predict"):
        pi_predictor.refine([(5, 5, True)])


def test_predict_cli_with_clicks(setup, tiny_sam, tmp_path, capsys):
    """predict.py --click on a Pi-SAM model writes the corrected mask and draws the clicks; SAM refuses --click."""
    from PIL import Image

    import predict

    image = np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "im.png")
    args = ["--image", str(tmp_path / "im.png"), "--box", "40", "30", "360", "270"]
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code = predict.main(["--model", str(setup["stage2"]), *args, "--click", "100", "150", "fg",
                         "--click", "300", "60", "bg", "--out", str(out), "--overlay", str(overlay)])
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out)).shape == (300, 400)
    picture = np.asarray(Image.open(overlay))
    assert tuple(picture[150, 100]) == FOREGROUND and tuple(picture[60, 300]) == BACKGROUND
    code = predict.main(["--model", str(tiny_sam[2]), *args, "--click", "10", "10", "fg", "--out", str(out)])
    assert code == 2 and "--click needs a Pi-SAM model" in capsys.readouterr().err
    code = predict.main(["--model", str(setup["stage2"]), *args, "--click", "10", "10", "maybe", "--out", str(out)])
    assert code == 2 and "fg or bg" in capsys.readouterr().err
