"""Parity of the ViT image encoder with ``segment_anything.modeling.image_encoder`` (fp32, random weights).

Every test builds the PyTorch reference with random weights (including the tensors the reference
zero-initialises: position embeddings, relative position tables, LayerNorm affine), converts its
state_dict with ``convert.keymap.load_torch_weights`` and compares outputs against the reference's own fp32
error, measured with a float64 copy (tests/parity.py); ``-s`` shows the errors.

Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: whole small encoders ours and the reference up to 3.3e-6
(|values| up to 4.5; ratios 0.8-1.2); single blocks and attentions up to 5.6e-7; interpolated tables 1.8e-5 for
both (the fp32 interpolation weights, which ours computes as torch does).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from segment_anything.modeling import image_encoder as ref_lib

from convert.keymap import load_torch_weights
from pisam_jax.modeling import image_encoder as ours_lib
from pisam_jax.modeling.image_encoder import ENCODER_CONFIGS, ImageEncoderViT
from references.sam import expose_layer_norm_2d_eps_
from tests.parity import assert_as_accurate, float64


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Gives every zero/one-initialised tensor (pos_embed, rel_pos, norms) random values, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "norm" in name or "neck.1" in name or "neck.3" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))


def torch_encoder(seed: int = 0, **cfg) -> ref_lib.ImageEncoderViT:
    """The reference built as ``segment_anything.build_sam`` builds it (LN eps 1e-6, rel pos), its neck's
    LayerNorm2d inputs scaled down so that their epsilon shows (``expose_layer_norm_2d_eps_``)."""
    torch.manual_seed(seed)
    cfg = {"window_size": 14, "out_chans": 256, **cfg}  # build_sam's values, where the torch defaults differ
    ref = ref_lib.ImageEncoderViT(
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, **cfg
    ).eval()
    randomise_(ref, seed + 1)
    assert expose_layer_norm_2d_eps_(ref) == ["neck.0", "neck.2"]
    return ref


def run_torch(ref: ref_lib.ImageEncoderViT, x: torch.Tensor):
    """Reference forward in the reference's dtype; returns (image_embeddings NHWC, [global-block outputs])."""
    interm = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: interm.append(o.detach().numpy()))
        for blk in ref.blocks
        if blk.window_size == 0
    ]
    try:
        with torch.no_grad():
            y = ref(x.to(ref.pos_embed.dtype))
    finally:
        for h in hooks:
            h.remove()
    return nchw_to_nhwc(y), interm


def torch_module(ref: torch.nn.Module, *args) -> list[np.ndarray]:
    """[fp32 output, exact output] of a reference module on fp32 tensors."""
    with torch.no_grad():
        return [r(*(a.to(dtype) for a in args)).numpy()
                for r, dtype in ((ref, torch.float32), (float64(ref), torch.float64))]


def ours_from(ref: torch.nn.Module, cfg: dict, prefix: str = "", resized_rel_pos: bool = False) -> ImageEncoderViT:
    """Our encoder with the reference's weights, through an official-format state_dict."""
    ours = nnx.eval_shape(lambda: ImageEncoderViT(**cfg, rngs=nnx.Rngs(0)))  # abstract: no random init
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    if resized_rel_pos:  # the interpolation test: our tables take the checkpoint's (non-default) lengths
        for i, blk in enumerate(ref.blocks):
            for name in ("rel_pos_h", "rel_pos_w"):
                shape = tuple(getattr(blk.attn, name).shape)
                setattr(ours.blocks[i].attn, name, nnx.Param(np.zeros(shape, np.float32)))
    load_torch_weights(ours, state, prefix=prefix)
    return ours


def jit_apply(module: nnx.Module, *args):
    """Runs ``module(*args)`` as one jitted pure function over its split state."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


def compare_encoders(name: str, cfg: dict, batch: int, seed: int, *, ref=None, prefix: str = "", ours_kw=None):
    """``ours_kw``: extra arguments for our encoder only (e.g. attn_query_chunk)."""
    resized = ref is not None
    ref = ref if ref is not None else torch_encoder(seed, **cfg)
    ours = ours_from(ref, {**cfg, **(ours_kw or {})}, prefix, resized_rel_pos=resized)
    torch.manual_seed(seed + 2)
    x = torch.randn(batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"])
    y_ref, interm_ref = run_torch(ref, x)
    y_exact, interm_exact = run_torch(float64(ref), x)
    y, interm = jit_apply(ours, nchw_to_nhwc(x))
    assert_as_accurate(f"{name} image_embeddings", y, y_ref, y_exact)
    assert len(interm) == len(interm_ref) == len(cfg["global_attn_indexes"])
    for i, (a, b, c) in enumerate(zip(interm, interm_ref, interm_exact)):
        assert_as_accurate(f"{name} interm[{i}]", a, b, c)


# --------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_size,out_size", [(13, 27), (27, 13), (5, 7), (127, 27), (7, 127), (9, 9)])
def test_interpolate_linear_matches_torch(in_size, out_size):
    table = torch.randn(in_size, 8, generator=torch.Generator().manual_seed(in_size * 1000 + out_size))
    ref, exact = (F.interpolate(table.T[None].to(dtype), size=out_size, mode="linear")[0].T.numpy()
                  for dtype in (torch.float32, torch.float64))
    ours = ours_lib.interpolate_linear(jnp.asarray(table.numpy()), out_size)
    assert_as_accurate(f"interpolate {in_size}->{out_size}", ours, ref, exact)


@pytest.mark.parametrize(
    "q_size,k_size,length",
    [(7, 7, 13), (14, 14, 27), (7, 7, 27), (14, 14, 13), (64, 64, 27), (4, 8, 15), (8, 4, 15), (5, 3, 7), (3, 7, 9)],
)
def test_get_rel_pos_matches_torch(q_size, k_size, length):
    table = torch.randn(length, 6, generator=torch.Generator().manual_seed(q_size * 100 + k_size * 10 + length))
    ref, exact = (ref_lib.get_rel_pos(q_size, k_size, table.to(dtype)).numpy()
                  for dtype in (torch.float32, torch.float64))
    ours = ours_lib.get_rel_pos(q_size, k_size, jnp.asarray(table.numpy()))
    assert_as_accurate(f"get_rel_pos q{q_size} k{k_size} L{length}", ours, ref, exact)


def test_window_partition_matches_torch():
    # H != W and both need padding, so a swapped pad order would show.
    x = torch.randn(2, 9, 11, 3, generator=torch.Generator().manual_seed(0))
    win_ref, pad_ref = ref_lib.window_partition(x, 4)
    win, pad = ours_lib.window_partition(jnp.asarray(x.numpy()), 4)
    assert pad == pad_ref == (12, 12)
    np.testing.assert_array_equal(np.asarray(win), win_ref.numpy())
    back = ours_lib.window_unpartition(win, 4, pad, (9, 11))
    np.testing.assert_array_equal(np.asarray(back), ref_lib.window_unpartition(win_ref, 4, pad_ref, (9, 11)).numpy())
    np.testing.assert_array_equal(np.asarray(back), x.numpy())


# --------------------------------------------------------------------------------------
# Single modules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,query_chunk,rows",
    [((6, 9), 128, 6), ((6, 9), 4, 1), ((20, 2), 4, 2)],  # rows: query rows per band (6 = not chunked)
)
def test_attention_matches_torch(size, query_chunk, rows):
    """Non-square grids, whole and in bands of query rows (lax.map)."""
    torch.manual_seed(3)
    ref = ref_lib.Attention(48, num_heads=3, use_rel_pos=True, input_size=size).eval()
    randomise_(ref, 4)
    ours = nnx.eval_shape(
        lambda: ours_lib.Attention(
            48, num_heads=3, use_rel_pos=True, input_size=size, query_chunk=query_chunk, rngs=nnx.Rngs(0)
        )
    )
    assert ours._rows_per_chunk(*size) == rows
    load_torch_weights(ours, ref.state_dict())
    x = torch.randn(2, *size, 48)
    assert_as_accurate(f"attention {size} chunk {query_chunk}", jit_apply(ours, x.numpy()), *torch_module(ref, x))


@pytest.mark.parametrize("size", [(6, 9), (20, 2)])
def test_fused_attention_matches_torch(size, accelerator_paths, monkeypatch):
    """The accelerator path: every query at once through ``jax.nn.dot_product_attention``, rel-pos as its bias."""
    calls = []
    fused = ours_lib._attend_fused
    monkeypatch.setattr(ours_lib, "_attend_fused", lambda *a: calls.append(a[0].shape) or fused(*a))
    torch.manual_seed(3)
    ref = ref_lib.Attention(48, num_heads=3, use_rel_pos=True, input_size=size).eval()
    randomise_(ref, 4)
    ours = nnx.eval_shape(lambda: ours_lib.Attention(48, num_heads=3, use_rel_pos=True, input_size=size,
                                                     rngs=nnx.Rngs(0)))
    load_torch_weights(ours, ref.state_dict())
    x = torch.randn(2, *size, 48)
    y = jit_apply(ours, x.numpy())
    assert calls == [(2, *size, 3, 16)]  # one call, every query
    assert_as_accurate(f"fused attention {size}", y, *torch_module(ref, x))


@pytest.mark.parametrize("window_size", [0, 4, 5])
def test_block_matches_torch(window_size):
    """Global, windowed without padding (12 = 3*4) and windowed with padding (12 -> 15)."""
    torch.manual_seed(5)
    kw = dict(dim=64, num_heads=4, use_rel_pos=True, window_size=window_size, input_size=(12, 12))
    ref = ref_lib.Block(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kw).eval()
    randomise_(ref, 6)
    ours = nnx.eval_shape(lambda: ours_lib.Block(**kw, rngs=nnx.Rngs(0)))
    load_torch_weights(ours, ref.state_dict())
    x = torch.randn(2, 12, 12, 64)
    assert_as_accurate(f"block window {window_size}", jit_apply(ours, x.numpy()), *torch_module(ref, x))


# --------------------------------------------------------------------------------------
# Whole encoder, small configurations
# --------------------------------------------------------------------------------------


def test_encoder_small_no_padding():
    """224 / 16 = 14 tokens a side, window 7 divides it; official-format keys under ``image_encoder.``."""
    cfg = dict(img_size=224, embed_dim=64, depth=3, num_heads=2, out_chans=32, window_size=7, global_attn_indexes=(1,))
    compare_encoders("224/w7", cfg, batch=2, seed=10, prefix="image_encoder.")


def test_encoder_small_padded_windows():
    """256 / 16 = 16 tokens, window 6 -> padded to 18; two global blocks, their attention in 16 bands of one row."""
    cfg = dict(img_size=256, embed_dim=96, depth=4, num_heads=4, out_chans=48, window_size=6, global_attn_indexes=(1, 3))
    compare_encoders("256/w6", cfg, batch=2, seed=20, ours_kw=dict(attn_query_chunk=16))


def test_encoder_small_accelerator_paths(accelerator_paths):
    """The configuration above on the accelerator path (one attention per block, windows and global alike)."""
    cfg = dict(img_size=256, embed_dim=96, depth=4, num_heads=4, out_chans=48, window_size=6, global_attn_indexes=(1, 3))
    compare_encoders("256/w6 accelerator", cfg, batch=2, seed=20)


def test_encoder_rel_pos_interpolation():
    """Tables whose length differs from 2*size-1 are linearly resized (down for some blocks, up for others)."""
    cfg = dict(
        img_size=128, patch_size=8, embed_dim=64, depth=3, num_heads=2, out_chans=32, window_size=5,
        global_attn_indexes=(1,),
    )
    ref = torch_encoder(30, **cfg)  # grid 16 (global table 31 rows), window 5 (table 9 rows)
    gen = torch.Generator().manual_seed(31)
    head_dim = 32
    sizes = {0: (13, 5), 1: (63, 17), 2: (27, 9)}  # block: (rel_pos_h rows, rel_pos_w rows); 9 = no resize
    for i, (lh, lw) in sizes.items():
        ref.blocks[i].attn.rel_pos_h = torch.nn.Parameter(0.5 * torch.randn(lh, head_dim, generator=gen))
        ref.blocks[i].attn.rel_pos_w = torch.nn.Parameter(0.5 * torch.randn(lw, head_dim, generator=gen))
    compare_encoders("128/p8/w5 resized rel-pos", cfg, batch=2, seed=30, ref=ref)


# --------------------------------------------------------------------------------------
# Real vit_b at 1024 x 1024
# --------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_vit_b_1024_matches_torch():
    cfg = dict(img_size=1024, window_size=14, **ENCODER_CONFIGS["vit_b"])
    compare_encoders("vit_b 1024", cfg, batch=1, seed=40, prefix="image_encoder.")
