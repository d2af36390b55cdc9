"""Parity of the two-way transformer and its Attention with segment_anything's (random weights, fp32), judged
against the reference's own fp32 error (a float64 copy gives the exact values; tests/parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything.modeling import TwoWayTransformer as TorchTwoWayTransformer
from segment_anything.modeling.transformer import Attention as TorchAttention

from convert.keymap import load_torch_weights
from pisam_jax.modeling.transformer import Attention, TwoWayTransformer
from tests.parity import assert_as_accurate, float64


def _perturb_layernorms(module):
    """LayerNorms default to weight 1, bias 0, which would hide a mislaid scale or bias."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


def _apply(module, *args, **kwargs):
    """Runs ``module`` as a pure function of its state under jit (the way hot paths run)."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


@pytest.fixture(scope="module")
def sam_size():
    """SAM's decoder transformer: depth 2, dim 256, 8 heads, MLP 2048, downsample 2."""
    torch.manual_seed(0)
    ref = TorchTwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048).eval()
    _perturb_layernorms(ref)
    ours = nnx.eval_shape(lambda: TwoWayTransformer(2, 256, 8, 2048, rngs=nnx.Rngs(0)))
    load_torch_weights(ours, ref.state_dict())
    return ref, float64(ref), ours


def test_module_tree_mirrors_torch(sam_size):
    _, _, ours = sam_size
    assert ours.layers[0].skip_first_layer_pe and not ours.layers[1].skip_first_layer_pe
    assert ours.layers[0].cross_attn_token_to_image.internal_dim == 128
    assert ours.layers[0].self_attn.internal_dim == 256


@pytest.mark.parametrize("pe_batch", [1, 2])
def test_two_way_transformer_sam_size(sam_size, pe_batch):
    """64x64 image, 2 prompts of 7 tokens; the image PE either per row or broadcast from one row.

    Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: ours up to 2.9e-6, the reference 3.0e-6 (|values|
    up to 9; ratios <= 1.08).
    """
    ref, ref64, ours = sam_size
    rng = np.random.default_rng(pe_batch)
    b, n, c, h, w = 2, 7, 256, 64, 64
    image = rng.normal(size=(b, c, h, w)).astype(np.float32)
    pe = rng.normal(size=(pe_batch, c, h, w)).astype(np.float32)
    tokens = rng.normal(size=(b, n, c)).astype(np.float32)
    with torch.no_grad():
        (q_ref, k_ref), (q_exact, k_exact) = (
            (o.numpy() for o in r(torch.from_numpy(image).to(dt), torch.from_numpy(pe).to(dt).expand(b, -1, -1, -1),
                                  torch.from_numpy(tokens).to(dt)))
            for r, dt in ((ref, torch.float32), (ref64, torch.float64)))
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    queries, keys = _apply(ours, nhwc(image), nhwc(pe), jnp.asarray(tokens))
    assert queries.shape == (b, n, c) and keys.shape == (b, h * w, c)
    assert_as_accurate(f"transformer(pe_batch={pe_batch}).queries", queries, q_ref, q_exact)
    assert_as_accurate(f"transformer(pe_batch={pe_batch}).keys", keys, k_ref, k_exact)


def test_attention_key_mask_equals_dropping_keys():
    """A masked key contributes exactly nothing: same as the reference Attention run without those keys."""
    torch.manual_seed(1)
    ref = TorchAttention(64, 4, downsample_rate=2).eval()
    ref64 = float64(ref)
    ours = nnx.eval_shape(lambda: Attention(64, 4, downsample_rate=2, rngs=nnx.Rngs(0)))
    load_torch_weights(ours, ref.state_dict())
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 50, 64)).astype(np.float32)
    k = rng.normal(size=(2, 9, 64)).astype(np.float32)
    v = rng.normal(size=(2, 9, 64)).astype(np.float32)
    keep = [np.array([0, 1, 2, 3, 4, 5]), np.array([0, 2, 3, 5, 6, 7, 8])]
    key_mask = np.ones((2, 9), bool)
    for i, kept in enumerate(keep):
        key_mask[i, kept] = False

    def reference(q, k, v):
        """(fp32, exact) outputs of the reference attention."""
        with torch.no_grad():
            return [r(*(torch.from_numpy(np.ascontiguousarray(a)).to(dt) for a in (q, k, v))).numpy()
                    for r, dt in ((ref, torch.float32), (ref64, torch.float64))]

    # Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: ours up to 1.3e-7, the reference 1.1e-7 (ratios
    # <= 1.28).
    out = _apply(ours, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(key_mask))
    for i, kept in enumerate(keep):
        rows = slice(i, i + 1)
        expected = reference(q[rows], k[rows][:, kept], v[rows][:, kept])
        assert_as_accurate(f"attention.key_mask[{i}]", out[rows], *expected)

    # No mask and an all-False mask are the reference's unmasked attention.
    expected = reference(q, k, v)
    assert_as_accurate("attention.no_mask", _apply(ours, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)), *expected)
    none_masked = jnp.zeros((2, 9), bool)
    assert_as_accurate("attention.all_false_mask",
                       _apply(ours, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), none_masked), *expected)
