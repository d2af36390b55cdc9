"""Pi-SAM's decoder: reference layout, RGB embedding, convert.pisam, and fp32 parity with the PyTorch reference.

The reference (``references/pisam.py``, written from PISAM_SPEC.md) gets random weights with nothing trivially
zero (perturbed LayerNorms, non-zero DCN offset/modulator convs and interactor ``out_cov``), is saved in the
official key layout (188 keys stage 1, 270 stage 2, raw or under ``model_state_dict``), converted together with a
small SAM at the real 1024 input (Pi-SAM's decoder assumes 64^2 embeddings and 256^2 / 1024^2 outputs), and
compared on the 256^2 logits and the 1024^2 logits without and with foreground and background clicks, against the
reference's own fp32 error (a float64 copy gives the exact values; tests/parity.py).

Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: E ours 4.0e-5, the reference 4.0e-5 (|E| up to 3.8:
the deformable convs sample where their own fp32 offsets point); 1024^2 logits ours up to 1.3e-5, the reference
1.1e-5; 256^2 logits 6.3e-7 and 5.8e-7; ratios <= 1.55 (the head's gradients). Rows B and C, judged at row A's
scale (assert_near), use at most 0.27 of that bound.
"""

from __future__ import annotations

import copy
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
from references.pisam import (
    VIT_CONFIGS,
    MaskDecoderAE,
    count,
    perturb_,
    torch_encode,
)
from references.pisam import seed42_rgb_embed as torch_seed42_rgb_embed
from references.sam import build_torch_sam, expose_layer_norm_2d_eps_, save_official
from tests.parity import (
    assert_as_accurate,
    assert_near,
    assert_same_masks,
    float64,
    logit_band,
    reference_in_float64,
)

# A SAM at Pi-SAM's real geometry (1024 input, 64^2 embedding) but 2 narrow blocks: cheap on two CPU cores.
SMALL_1024 = dict(image_size=1024, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=14)
BOX = [180.0, 150.0, 820.0, 900.0]
FG = [[0.31, 0.42], [0.55, 0.61], [0.7, 0.2]]  # (x, y) normalised with pixel centres
BG = [[0.12, 0.88], [0.9, 0.5]]
# Row A is (image 0, BOX, FG + BG clicks). For the batched paths: row B is a second box on image 0, row C a box on
# a second image, each with its own clicks, fewer than row A's (so they are padded and masked).
BOX_B, FG_B, BG_B = [40.0, 60.0, 500.0, 400.0], [[0.2, 0.15]], [[0.4, 0.3]]
BOX_C, FG_C, BG_C = [300.0, 200.0, 900.0, 700.0], [[0.5, 0.45]], []
ROWS = dict(A=(0, BOX, FG, BG), B=(0, BOX_B, FG_B, BG_B), C=(1, BOX_C, FG_C, BG_C))  # image, box, fg, bg


def build_reference(vit_dim: int, interactor: bool, sam=None, seed: int = 1) -> MaskDecoderAE:
    """A random reference decoder, its LayerNorm2d inputs scaled down so that their epsilon shows
    (``expose_layer_norm_2d_eps_``); with ``sam``, its copy of SAM's decoder is the SAM model's (as in real files)."""
    torch.manual_seed(seed)
    ref = perturb_(MaskDecoderAE(vit_dim, interact=interactor), seed=seed)
    expose_layer_norm_2d_eps_(ref)
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
    expose_layer_norm_2d_eps_(sam)
    save_official(sam, root / "sam_small.pth")
    ref = build_reference(64, True, sam)
    sd = ref.state_dict()
    torch.save({"model_state_dict": sd}, root / "pisam_stage2.pth")
    torch.save(_stage1(sd), root / "pisam_stage1.pth")
    stage2 = convert_pisam(root / "sam_small.pth", root / "pisam_stage2.pth", root / "stage2")
    stage1 = convert_pisam(root / "sam_small.pth", root / "pisam_stage1.pth", root / "stage1")
    return dict(root=root, sam=sam, ref=ref, stage1=stage1, stage2=stage2)


class _Reference:
    """The reference's pieces in one dtype (float32, or float64 for the exact values): SAM, the Pi-SAM decoder,
    the seed-42 RGB embedding. Torch layouts; every method runs without autograd."""

    def __init__(self, sam, decoder, dtype):
        self.dtype = dtype
        to = (lambda m: m) if dtype == torch.float32 else float64
        self.sam, self.decoder, self.rgb_embed = to(sam), to(decoder), to(torch_seed42_rgb_embed(SMALL_1024))

    @torch.no_grad()
    def encode(self, image):
        """image (1, 3, 1024, 1024) pixels -> (x, image embedding, first global block, RGB embedding)."""
        x = self.sam.preprocess(image.to(self.dtype))
        emb, interm = torch_encode(self.sam.image_encoder, x)
        return x, emb, interm[0], self.rgb_embed(x)

    @torch.no_grad()
    def base(self, encoded, box):
        """One box -> (E, hyper_in, 256^2 logits)."""
        _, emb, vit, _ = encoded
        with reference_in_float64():
            boxes = torch.tensor([box], dtype=self.dtype)
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
            return self.decoder.base(emb, self.sam.prompt_encoder.get_dense_pe(), sparse, dense, vit)

    @torch.no_grad()
    def head(self, e, rgb):
        return self.decoder.head(e, rgb)

    @torch.no_grad()
    def clicked(self, e, hyper_in, clicks):
        """The interactor on rows with clicks of different counts (clicks: per row (fg, bg)): padded as the reference
        pads ((0, 0), flag 0) and masked with kv_mask in every image->token attention (D5) -> E'."""
        n = max(len(fg) + len(bg) for fg, bg in clicks)
        points = torch.zeros(len(clicks), n, 2, dtype=self.dtype)
        flags = torch.zeros(len(clicks), n, dtype=torch.long)
        kv_mask = torch.ones(len(clicks), 1 + n, dtype=torch.bool)
        kv_mask[:, 0] = False
        for i, (fg, bg) in enumerate(clicks):
            k = len(fg) + len(bg)
            points[i, :k] = torch.tensor(fg + bg, dtype=self.dtype)
            flags[i, :len(fg)] = 1
            kv_mask[i, 1:1 + k] = False
        transformer = self.decoder.interact_2.transformer
        transformer.mask_final_attn = True
        try:
            return self.decoder.interact_2(e, hyper_in, points, flags, kv_mask)
        finally:
            transformer.mask_final_attn = False


def _images():
    """Image 0 and image 1, (1, 3, 1024, 1024) float pixels."""
    return [torch.randint(0, 256, (1, 3, 1024, 1024), generator=torch.Generator().manual_seed(seed)).float()
            for seed in (3, 4)]


@pytest.fixture(scope="module")
def torch_outputs(setup):
    """The reference on rows A, B, C (in float32) and on row A in float64 (its exact values): 256^2 logits, E, the
    1024^2 logits without clicks and with each row's clicks (all rows' clicks in one padded, masked call).

    The float64 reference is costly (torchvision's deformable convs), so it runs on row A only; rows B and C are
    judged at row A's error scale (``assert_near``): the same computation on another box or image.
    """
    out = {}
    for kind, dtype in (("fp32", torch.float32), ("exact", torch.float64)):
        ref = _Reference(setup["sam"], setup["ref"], dtype)
        rows = ROWS if kind == "fp32" else {"A": ROWS["A"]}
        encoded = [ref.encode(image) for image in _images()[: 1 + (kind == "fp32")]]
        bases = {name: ref.base(encoded[i], box) for name, (i, box, _, _) in rows.items()}
        rgb = torch.cat([encoded[rows[name][0]][3] for name in rows])
        e = torch.cat([bases[name][0] for name in rows])
        hyper_in = torch.cat([bases[name][1] for name in rows])
        clicked = ref.clicked(e, hyper_in, [(fg, bg) for _, _, fg, bg in rows.values()])
        large, large_clicks = ref.head(e, rgb), ref.head(clicked, rgb)
        out[kind] = {name: dict(e=bases[name][0].permute(0, 2, 3, 1).numpy(), low_res=bases[name][2].numpy(),
                                large=large[k:k + 1].numpy(), large_clicks=large_clicks[k:k + 1].numpy())
                     for k, name in enumerate(rows)}
        if kind == "fp32":
            out["x"] = [x.permute(0, 2, 3, 1).numpy() for x, *_ in encoded]
    return out


def _row_a(torch_outputs, key):
    """(fp32, exact) of one output of row A."""
    return torch_outputs["fp32"]["A"][key], torch_outputs["exact"]["A"][key]


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

    features, b = base(state, jnp.asarray(torch_outputs["x"][0]), jnp.asarray([[BOX]]))
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
    assert_as_accurate("E (256^2 x 32)", jax_outputs["e"], *_row_a(torch_outputs, "e"))


def test_low_res_logits_match(torch_outputs, jax_outputs):
    assert_as_accurate("pred_masks 256^2", jax_outputs["low_res"], *_row_a(torch_outputs, "low_res"))


def test_large_logits_match_without_clicks(torch_outputs, jax_outputs):
    assert_as_accurate("pred_masks_large 1024^2", jax_outputs["large"], *_row_a(torch_outputs, "large"))


def test_large_logits_match_with_clicks(torch_outputs, jax_outputs):
    ref = torch_outputs["fp32"]["A"]
    assert np.abs(ref["large_clicks"] - ref["large"]).max() > 1e-2 * np.abs(ref["large_clicks"]).max(), (
        "the clicks changed nothing")
    expected = _row_a(torch_outputs, "large_clicks")
    assert_as_accurate("pred_masks_large 1024^2, 3 fg + 2 bg clicks", jax_outputs["large_clicks"], *expected)
    assert_as_accurate("the same clicks and 2 padded slots", jax_outputs["large_padded"], *expected)


@pytest.fixture(scope="module")
def head_case(setup):
    """Our decoder (its state split) and the reference with E at 64^2 (head output 256^2, quick): random E for 2
    boxes sharing one RGB embedding."""
    graphdef, state = nnx.split(load_model(setup["stage2"]).mask_decoder)
    rng = np.random.default_rng(7)
    e = rng.standard_normal((2, 64, 64, 32), dtype=np.float32)
    rgb = rng.standard_normal((1, 256, 256, 8), dtype=np.float32)
    return graphdef, state, e, rgb


def _reference_head(ref, e, rgb, dtype):
    """The reference head in ``dtype``: logits, and the gradients of mean(tanh(logits)) (parameters by torch key,
    and E) in our layouts."""
    head = copy.deepcopy(torch.nn.ModuleDict(dict(output_upscaling_2=ref.output_upscaling_2, out_act=ref.out_act)))
    head = head.to(dtype)
    te = torch.from_numpy(e.transpose(0, 3, 1, 2)).to(dtype).requires_grad_(True)
    trgb = torch.from_numpy(rgb.transpose(0, 3, 1, 2)).to(dtype)
    logits = head.out_act(head.output_upscaling_2(te) + trgb)
    torch.tanh(logits).mean().backward()
    grads = {name: p.grad.numpy() for name, p in head.named_parameters()}
    return logits.detach().numpy(), grads, te.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("band_rows", [64, 1024])
def test_head_matches_the_reference(setup, head_case, monkeypatch, band_rows):
    """The HR head's functional forward (bands of output rows on CPU), the accelerators' form (``_head_layers``)
    and the plain layer-by-layer form are the reference's head, for a batch sharing one RGB embedding; so are
    their gradients (the head trains in both stages)."""
    monkeypatch.setattr(pi_decoder, "HEAD_BAND_ROWS", band_rows)
    graphdef, state, e, rgb = head_case
    # E at 64^2 (head output 256^2): 4 bands of 64 rows, or one (1024 rows do not divide 256).
    expected = [_reference_head(setup["ref"], e, rgb, dtype) for dtype in (torch.float32, torch.float64)]

    def banded(state, e):
        return nnx.merge(graphdef, state).head(e, rgb)

    def accelerator(state, e):
        return nnx.merge(graphdef, state)._head_layers(e, rgb)

    def layers(state, e):
        d = nnx.merge(graphdef, state)
        return d.out_act(d.output_upscaling_2(e) + rgb).transpose(0, 3, 1, 2)

    names = torch_names(nnx.merge(graphdef, state))
    for form, f in (("banded", banded), ("accelerator", accelerator), ("layer by layer", layers)):
        assert_as_accurate(f"{form} head", jax.jit(f)(state, e), expected[0][0], expected[1][0])
        grads = jax.jit(jax.grad(lambda s, e: jnp.mean(jnp.tanh(f(s, e))), argnums=(0, 1)))(state, e)
        assert_as_accurate(f"{form} head d/dE", grads[1], expected[0][2], expected[1][2])
        for path, grad in nnx.to_flat_state(grads[0]):
            key, layout = names[path]
            if key.startswith(("output_upscaling_2.", "out_act.")):
                assert_as_accurate(f"{form} head d/d{key}", grad[...], layout(expected[0][1][key]),
                                   layout(expected[1][1][key]))
            else:  # the parameters outside the head get none
                assert not np.asarray(grad[...]).any(), key


def test_batch_of_images_matches_the_reference(setup, torch_outputs):
    """Sam.decode_pi on 2 images with a box each (rows A and C), without clicks and with clicks of different counts
    (row C's padded with label -1), against the reference run row by row (its clicks masked with kv_mask)."""
    model = load_model(setup["stage2"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, boxes, points, labels):
        m = nnx.merge(graphdef, state)
        features = m.encode(x)
        base = m.pi_base(features, boxes)
        return base.low_res, m.pi_refine(features, base), m.pi_refine(features, base, (points, labels))

    n = len(FG) + len(BG)
    points = np.full((2, n, 2), 0.37, np.float32)
    labels = np.full((2, n), -1, np.int32)
    for i, name in enumerate("AC"):
        _, _, fg, bg = ROWS[name]
        points[i, :len(fg) + len(bg)] = fg + bg
        labels[i, :len(fg) + len(bg)] = [1] * len(fg) + [0] * len(bg)
    x = np.concatenate(torch_outputs["x"])
    low_res, large, large_clicks = run(state, x, jnp.asarray([[BOX], [BOX_C]]), points, labels)
    _check_rows("2 images", dict(low_res=low_res, large=large, large_clicks=large_clicks), "AC", torch_outputs)


def _check_rows(name, ours, rows, torch_outputs):
    """ours: output -> (rows, 1, h, w); row A as accurate as the reference, the others at row A's error scale."""
    for key, value in ours.items():
        value = np.asarray(value)
        errors = assert_as_accurate(f"{name}, row A, {key}", value[:1], *_row_a(torch_outputs, key))
        for i, row in enumerate(rows[1:], 1):
            assert_near(f"{name}, row {row}, {key}", value[i:i + 1], torch_outputs["fp32"][row][key], errors)


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


def _pixel_clicks(fg, bg):
    """Normalised test clicks back as the pixels a user clicks: a click at pixel (x, y) is (x + 0.5, y + 0.5) / 1024
    in the model (D3)."""
    pixel = lambda u: u * 1024 - 0.5  # noqa: E731
    return [(pixel(u), pixel(v), True) for u, v in fg] + [(pixel(u), pixel(v), False) for u, v in bg]


@pytest.mark.heavy
def test_vit_b_end_to_end(tmp_path):
    """Real vit_b (random weights) at 1024: conversion with a verified seed-42 rgb_embed, then parity with clicks
    through the Predictor."""
    c = VIT_CONFIGS["vit_b"]
    sam = build_torch_sam(1024, c["embed_dim"], c["depth"], c["num_heads"], c["global_attn_indexes"], seed=5)
    expose_layer_norm_2d_eps_(sam)
    save_official(sam, tmp_path / "sam_vit_b.pth")
    ref = build_reference(768, True, sam, seed=6)
    torch.save({"model_state_dict": ref.state_dict()}, tmp_path / "pisam_vit_b.pth")
    out = convert_pisam(tmp_path / "sam_vit_b.pth", tmp_path / "pisam_vit_b.pth", tmp_path / "out", model_type="vit_b")
    model = load_model(out)
    assert model.config.model_type == "vit_b" and model.config.provenance["rgb_embed"]["fingerprint"] == "verified"

    image = torch.randint(0, 256, (1, 3, 1024, 1024), generator=torch.Generator().manual_seed(7)).float()
    runs = []  # (256^2 logits, 1024^2 logits with clicks) of the reference in fp32, then exact
    for dtype in (torch.float32, torch.float64):
        s, r = (sam, ref) if dtype == torch.float32 else (float64(sam), float64(ref))
        with torch.no_grad(), reference_in_float64():
            x = s.preprocess(image.to(dtype))
            emb, interm = torch_encode(s.image_encoder, x)
            sparse, dense = s.prompt_encoder(points=None, boxes=torch.tensor([BOX], dtype=dtype), masks=None)
            rgb = torch_seed42_rgb_embed(c).to(dtype)(x)
            low_res, large = r(emb, s.prompt_encoder.get_dense_pe(), sparse, dense, interm + [rgb],
                               fg=torch.tensor([FG], dtype=dtype), bg=torch.tensor([BG], dtype=dtype))
        runs.append((low_res[0].numpy(), large[0].numpy()))
    (low_ref, large_ref), (low_exact, large_exact) = runs
    # Ours through the Predictor, as a user runs it: pixels in, a box, then clicks in image pixels (D3).
    from pisam_jax.predictor import Predictor

    predictor = Predictor(model)
    predictor.set_image(image[0].permute(1, 2, 0).numpy().astype(np.uint8))
    _, _, ours_low = predictor.predict(box=np.array(BOX))
    ours_large = predictor.refine(_pixel_clicks(FG, BG), return_logits=True)
    assert_as_accurate("vit_b pred_masks 256^2 (Predictor)", ours_low, low_ref, low_exact)
    errors = assert_as_accurate("vit_b pred_masks_large 1024^2 with clicks (Predictor.refine)", ours_large, large_ref,
                                large_exact)
    assert_same_masks("vit_b masks with clicks", predictor.refine(_pixel_clicks(FG, BG)), large_ref, logit_band(errors))


# -- the predictor: predict(box) from the 1024^2 head, refine(clicks) on cached features --------------------


@pytest.fixture(scope="module")
def pi_predictor(setup):
    from pisam_jax.predictor import Predictor

    predictor = Predictor(load_model(setup["stage2"]))
    predictor.set_image(_images()[0][0].permute(1, 2, 0).numpy().astype(np.uint8))  # the reference's image 0
    return predictor


def test_predictor_box_matches_the_reference_head(pi_predictor, torch_outputs):
    masks, scores, low_res = pi_predictor.predict(box=np.array(BOX), return_logits=True)
    assert masks.shape == (1, 1024, 1024) and scores.shape == (1,)
    expected = _row_a(torch_outputs, "large")
    errors = assert_as_accurate("predictor 1024^2 logits, box", masks[None], *expected)
    assert_as_accurate("predictor 256^2 logits, box", low_res[None], *_row_a(torch_outputs, "low_res"))
    binary, _, _ = pi_predictor.predict(box=np.array(BOX))
    assert_same_masks("predictor mask, box", binary[None], expected[0], logit_band(errors))


def test_predictor_refine_matches_the_reference_with_clicks(pi_predictor, torch_outputs, monkeypatch):
    pi_predictor.predict(box=np.array(BOX))
    clicks = _pixel_clicks(FG, BG)
    monkeypatch.setattr(pi_predictor, "_encode", lambda *a: pytest.fail("a click re-ran the encoder"))
    monkeypatch.setattr(pi_predictor, "_pi_base", lambda *a: pytest.fail("a click re-ran the SAM transformer"))
    logits = pi_predictor.refine(clicks, return_logits=True)
    expected = _row_a(torch_outputs, "large_clicks")
    errors = assert_as_accurate("predictor refine 1024^2 logits", logits[None], *expected)
    binary = pi_predictor.refine(clicks)
    assert binary.dtype == bool
    assert_same_masks("predictor refine mask", binary[None], expected[0], logit_band(errors))


def test_predictor_several_boxes_with_different_click_counts(pi_predictor, torch_outputs):
    """predict_batch on two boxes of one image (rows A and B), then refine with 5 and 2 clicks (padded and masked),
    against the reference run box by box."""
    masks, _, low_res = pi_predictor.predict_batch(boxes=np.array([BOX, BOX_B], np.float32), return_logits=True)
    clicked = pi_predictor.refine([_pixel_clicks(FG, BG), _pixel_clicks(FG_B, BG_B)], return_logits=True)
    assert clicked.shape == (2, 1, 1024, 1024)
    _check_rows("2 boxes on one image", dict(low_res=low_res, large=masks, large_clicks=clicked), "AB", torch_outputs)


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
