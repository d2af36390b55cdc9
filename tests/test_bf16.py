"""bfloat16 compute (``modeling/precision.py``): which products run in bfloat16, and how accurate the result is.

A bfloat16 result is judged as the fp32 parity tests judge fp32 ones (tests/parity.py), with the reference's own
mixed precision as the scale: ``torch.autocast("cpu", dtype=torch.bfloat16)`` (bfloat16 matmuls and convolutions,
float32 elsewhere by torch's op lists), against the reference in fp32 as the exact values (its error, ~1e-6, is
negligible next to bfloat16's, ~1e-2). Ours must be within FACTOR (4) of autocast's error, in max and in RMS.
torchvision's deformable convolution has no bfloat16 CPU kernel and its CUDA autocast runs it in fp32, so the
reference's runs in fp32 here too.

Measured (AMD EPYC), from fp32: ours / autocast 0.8-1.2 for SAM end to end (low-res logits ~4e-3 of |logits| up to
0.28), 0.6 for Pi-SAM's decoder (its 1024-side head 0.05 of |logits| up to 1.6; E 0.3 of |E| up to 3.5: the Object
Embedder is the sensitive part), 0.7-1.0 for the interactor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import jax
import jax.extend as jex
import jax.numpy as jnp
from flax import nnx
from segment_anything import SamPredictor

from convert.keymap import load_torch_weights
from pisam_jax import models
from pisam_jax.evaluation.segmenter import BoxSegmenter
from pisam_jax.modeling.interactor import PointInteract
from pisam_jax.predictor import Predictor
from references import pisam as pisam_ref
from references import pisam_interactor
from tests.parity import assert_as_accurate

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)
TINY_PI = dict(image_size=128, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
               encoder_global_attn_indexes=(1,), window_size=4)


# -- what runs in bfloat16 -------------------------------------------------------------------------------------


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of its sub-jaxprs (jit, scan, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jex.core.Jaxpr):
                    yield from _equations(sub)
        yield eqn


def _products(jaxpr):
    """Every matrix product and convolution in ``jaxpr`` and its sub-jaxprs: (operand dtypes, output dtype,
    multiply-adds, terms summed per output)."""
    for eqn in _equations(jaxpr):
        if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
            continue
        lhs, rhs = (v.aval for v in eqn.invars[:2])
        out = eqn.outvars[0].aval
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            terms = int(np.prod([lhs.shape[i] for i in contracting]))
        else:  # HWIO kernels (every conv of ours): kh * kw * (Cin / groups) terms an output
            terms = int(np.prod(rhs.shape[:-1]))
        yield (str(lhs.dtype), str(rhs.dtype)), str(out.dtype), int(np.prod(out.shape)) * terms, terms


def _pi_jaxpr(dtype):
    """Encoder, HQ features, a box and three click slots (one padded) through a tiny stage-2 Pi-SAM."""
    model = models.abstract_model(models.ModelConfig.preset("vit_b", "pi", interactor=True, **TINY_PI), dtype)
    graphdef, state = nnx.split(model)

    def run(state, images, boxes, points, labels):
        m = nnx.merge(graphdef, state)
        features = m.cache_hq_features(m.encode(images))
        base = m.pi_base(features, boxes)
        return features.embeddings, base.low_res, m.pi_refine(features, base, (points, labels))

    args = (state, jnp.zeros((1, 128, 128, 3)), jnp.array([[[10.0, 12.0, 100.0, 90.0]]]), jnp.full((1, 3, 2), 0.5),
            jnp.array([[1, 0, -1]]))
    return jax.make_jaxpr(run)(*args), jax.eval_shape(run, *args)


def test_bf16_model_multiplies_in_bf16():
    """Every product of more than 2^16 multiply-adds that sums more than 16 terms takes bfloat16 operands. The
    float32 ones left are the LayerNorm statistics of the HR head (means over 8 and 16 channels as products), the
    positional encodings (2 coordinates) and the interactor's token-side algebra (a few tokens, at most 4096
    multiply-adds here). The outputs stay float32."""
    jaxpr, outputs = _pi_jaxpr("bfloat16")
    products = list(_products(jaxpr.jaxpr))
    heavy = [p for p in products if p[2] > 2**16 and p[3] > 16]
    assert len(heavy) > 50  # the encoder, the decoders and the head are all here
    assert [p for p in heavy if p[0] != ("bfloat16", "bfloat16")] == []
    f32_products = [p for p in products if p[0] == ("float32", "float32")]
    assert f32_products and all(p[3] <= 16 or p[2] <= 4096 for p in f32_products)
    assert [o.dtype for o in outputs] == [jnp.float32] * 3  # embeddings, 256^2 and 1024^2 logits


# Sums, maxima and transcendentals: LayerNorm statistics (reduce_sum, rsqrt), softmax (reduce_max, exp, reduce_sum),
# the deformable convs' modulation (logistic), poolings. In bfloat16 a sum of n terms loses ~n * 2^-9 relative.
FP32_ONLY = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "cumsum", "cummax",
             "cumlogsumexp", "exp", "exp2", "log", "log1p", "rsqrt", "sqrt", "logistic", "tanh"}


@pytest.mark.parametrize("paths", ["cpu", "accelerator"])
def test_bf16_model_reduces_in_fp32(paths, monkeypatch):
    """In a bfloat16 model no reduction and no exp / log / rsqrt / sigmoid takes a bfloat16 operand, on the CPU
    paths and on the accelerator ones (fused attention, the HR head layer by layer): LayerNorm statistics,
    softmax and the modulation stay float32 (issue 15)."""
    from pisam_jax.modeling import common

    monkeypatch.setattr(common, "CODE_PATHS", paths)
    jaxpr, _ = _pi_jaxpr("bfloat16")
    eqns = list(_equations(jaxpr.jaxpr))
    assert {"reduce_sum", "reduce_max", "exp", "rsqrt", "logistic"} <= {e.primitive.name for e in eqns}
    in_bf16 = [e.primitive.name for e in eqns if e.primitive.name in FP32_ONLY
               and any(getattr(v, "aval", None) is not None and v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert in_bf16 == []


def test_fp32_model_has_no_bf16():
    jaxpr, _ = _pi_jaxpr(None)
    dtypes = {str(v.aval.dtype) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
    assert "bfloat16" not in dtypes
    assert all(p[0] == ("float32", "float32") for p in _products(jaxpr.jaxpr))


# -- the API --------------------------------------------------------------------------------------------------


def test_dtype_chosen_at_load_and_by_the_predictor(tiny_sam):
    model = models.load_model(tiny_sam[2])
    assert model.compute_dtype == "float32"
    bf16 = models.load_model(tiny_sam[2], dtype="bfloat16")
    assert bf16.compute_dtype == "bfloat16" and bf16.image_encoder.blocks[0].attn.qkv.dtype == jnp.bfloat16
    # The parameters stay float32 whatever the compute dtype.
    assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    predictor = Predictor(model, dtype="bfloat16")
    assert predictor.model.compute_dtype == "bfloat16" and model.compute_dtype == "float32"  # the model is untouched
    kernel = lambda m: m.image_encoder.patch_embed.proj.kernel  # noqa: E731
    assert kernel(predictor.model) is kernel(model)  # the parameters are shared, not copied
    with pytest.raises(models.ModelError, match="unknown compute dtype 'float16'; choose one of float32, bfloat16"):
        models.load_model(tiny_sam[2], dtype="float16")
    # eval.py --dtype: bfloat16 predictions are recorded as such (a resume never mixes them with float32 ones).
    assert BoxSegmenter(bf16).settings["dtype"] == "bfloat16" and "dtype" not in BoxSegmenter(model).settings


# -- accuracy against the reference's autocast -------------------------------------------------------------------


def test_sam_predictor_as_accurate_as_autocast(tiny_sam):
    """Encoder, prompt encoder and mask decoder end to end (a box and two clicks), through the predictors."""
    sam, _, converted = tiny_sam
    image = np.random.default_rng(0).integers(0, 256, (200, 150, 3), dtype=np.uint8)
    box, points, labels = np.array([20.0, 30.0, 120.0, 170.0]), np.array([[60, 80], [100, 40]]), np.array([1, 0])
    reference = SamPredictor(sam)
    runs = []
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast(**AUTOCAST, enabled=autocast):
            reference.set_image(image)
            coords = torch.from_numpy(reference.transform.apply_coords(points, reference.original_size)).float()
            boxes = torch.from_numpy(reference.transform.apply_boxes(box[None], reference.original_size)).float()
            out = reference.predict_torch(coords[None], torch.from_numpy(labels)[None], boxes, return_logits=True)
            runs.append([o[0].float().numpy() for o in out])
    (exact_masks, _, exact_low), (auto_masks, _, auto_low) = runs
    ours = Predictor(models.load_model(converted, dtype="bfloat16"))
    ours.set_image(image)
    masks, _, low = ours.predict(point_coords=points, point_labels=labels, box=box, return_logits=True)
    assert masks.dtype == low.dtype == np.float32
    assert_as_accurate("SAM bf16 low-res logits", low, auto_low, exact_low)
    assert_as_accurate("SAM bf16 masks", masks, auto_masks, exact_masks)


@pytest.fixture
def deform_conv_in_fp32(monkeypatch):
    """torchvision's deformable conv as its CUDA autocast runs it: in float32 (it has no bfloat16 CPU kernel)."""
    deform_conv2d = pisam_ref.deform_conv2d

    def fp32(x, offset, weight, bias=None, stride=1, padding=0, mask=None):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        with torch.autocast("cpu", enabled=False):
            return deform_conv2d(f(x), f(offset), f(weight), f(bias), stride=stride, padding=padding, mask=f(mask))

    monkeypatch.setattr(pisam_ref, "deform_conv2d", fp32)


def test_pi_decoder_as_accurate_as_autocast(deform_conv_in_fp32):
    """Pi-SAM's decoder (stage 1) on random features at a small geometry (64^2 embedding -> E 64^2 -> head 256^2):
    the Object Embedder's E, the 256^2 logits and the head's logits. The deformable branches get non-zero offsets."""
    torch.manual_seed(0)
    ref = pisam_ref.perturb_(pisam_ref.MaskDecoderAE(64, interact=False)).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, pisam_ref.DeformableConv2d):
                for conv in (m.offset_conv, m.modulator_conv):
                    conv.weight.normal_(0.0, 0.3)
                    conv.bias.normal_(0.0, 0.5)
    rgb_embed = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1))
    model = models.abstract_model(models.ModelConfig.preset("vit_b", "pi", **{**TINY_PI, "image_size": 256}))
    load_torch_weights(model.mask_decoder, {**ref.state_dict(),
                                            **{f"rgb_embed.{k}": v for k, v in rgb_embed.state_dict().items()}})
    models.set_dtype(model, "bfloat16")
    rng = np.random.default_rng(0)
    emb, pe, dense = (rng.standard_normal((1, 16, 16, 256), dtype=np.float32) for _ in range(3))
    sparse = rng.standard_normal((1, 2, 256), dtype=np.float32)
    vit = rng.standard_normal((1, 16, 16, 64), dtype=np.float32)
    rgb = rng.standard_normal((1, 256, 256, 8), dtype=np.float32)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    runs = []
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast(**AUTOCAST, enabled=autocast):
            e, _, low = ref.base(nchw(emb), nchw(pe), torch.from_numpy(sparse), nchw(dense), torch.from_numpy(vit))
            large = ref.head(e, nchw(rgb))
            runs.append([e.float().numpy().transpose(0, 2, 3, 1), low.float().numpy(), large.float().numpy()])
    graphdef, state = nnx.split(model.mask_decoder)

    @jax.jit
    def ours(state):
        d = nnx.merge(graphdef, state)
        base = d.base(emb, pe, sparse, dense, d.hq_features(emb, vit))
        return base.embedding, base.low_res, d.refine(base, rgb)

    for name, o, exact, auto in zip(("E", "256^2 logits", "1024-side logits"), ours(state), *runs):
        assert_as_accurate(f"Pi-SAM bf16 {name}", o, auto, exact)


def test_interactor_as_accurate_as_autocast():
    """The Precise Interactor on a 64^2 E with three clicks (E' = E + out_cov(T))."""
    torch.manual_seed(1)
    ref = pisam_interactor.PointInteract(hw_size=64).eval()
    with torch.no_grad():  # out_cov is zero-initialised: give it weights, or E' = E hides everything
        ref.out_cov.weight.normal_(0.0, 0.05)
    ours = nnx.eval_shape(lambda: PointInteract(hw_size=64, rngs=nnx.Rngs(0)))
    load_torch_weights(ours, ref.state_dict())
    models.precision.set_compute_dtype(ours, "bfloat16")
    rng = np.random.default_rng(1)
    e = rng.standard_normal((1, 64, 64, 32), dtype=np.float32)
    hyper_in = rng.standard_normal((1, 1, 32), dtype=np.float32)
    points, flags = rng.uniform(size=(1, 3, 2)).astype(np.float32), np.array([[1, 0, 1]])
    runs = []
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast(**AUTOCAST, enabled=autocast):
            out = ref(torch.from_numpy(e.transpose(0, 3, 1, 2).copy()), torch.from_numpy(hyper_in),
                      torch.from_numpy(points), torch.from_numpy(flags), None)
            runs.append(out.float().numpy().transpose(0, 2, 3, 1) - e)  # the interactor's change to E
    graphdef, state = nnx.split(ours)
    got = jax.jit(lambda s: nnx.merge(graphdef, s)(e, hyper_in, points, flags))(state)
    assert_as_accurate("interactor bf16 E' - E", np.asarray(got) - e, runs[1], runs[0])
