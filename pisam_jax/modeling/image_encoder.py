"""SAM's ViT image encoder (ViTDet backbone + neck), NHWC, with HQ-SAM's intermediate outputs.

Mirrors ``segment_anything.modeling.image_encoder`` module for module, so torch key
``blocks.3.attn.qkv.weight`` is our path ``('blocks', 3, 'attn', 'qkv', 'kernel')``.
The forward also returns the outputs of the global-attention blocks, as
``segment_anything_hq``'s encoder does (HQ-SAM and Pi-SAM decoders consume them).

Shapes (g = img_size // patch_size, C = embed_dim):
  image (B, img_size, img_size, in_chans) -> patch_embed (B, g, g, C) -> blocks -> neck (B, g, g, out_chans)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pisam_jax.modeling import common
from pisam_jax.modeling.common import Conv2d, LayerNorm, LayerNorm2d, Linear, MLPBlock, Sequential, cast

# Presets of the official checkpoints; the rest of the arguments are the defaults below.
ENCODER_CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}

# ViT norms are nn.LayerNorm(eps=1e-6) in SAM (norm_layer=partial(nn.LayerNorm, eps=1e-6)).
VIT_LN_EPS = 1e-6


# --------------------------------------------------------------------------------------
# Relative positions (static index/weight tables computed with numpy at trace time)
# --------------------------------------------------------------------------------------


def _linear_resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of ``F.interpolate(mode="linear", size=out_size)`` (align_corners=False).

    Reproduces PyTorch's CPU kernel in float32: ``src = max(scale * (dst + 0.5) - 0.5, 0)`` with
    ``scale = in / out``, ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, ``w1 = src - i0``, ``w0 = 1 - w1``.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=f32)
    src = np.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.minimum(src - i0.astype(f32), f32(1.0))
    w0 = f32(1.0) - w1
    return i0, i1, np.stack([w0, w1], axis=-1)


def interpolate_linear(table: jax.Array, size: int) -> jax.Array:
    """Resizes ``table`` (L, C) along L to ``size`` as ``F.interpolate(table.T[None], size, mode="linear")``."""
    i0, i1, w = _linear_resize_weights(table.shape[0], size)
    w = jnp.asarray(w, table.dtype)
    return w[:, 0:1] * table[i0] + w[:, 1:2] * table[i1]


def _relative_index(q_size: int, k_size: int) -> np.ndarray:
    """``relative_coords.long()`` of the reference ``get_rel_pos``: (q_size, k_size) int indices, float32 math."""
    f32 = np.float32
    q_coords = np.arange(q_size, dtype=f32)[:, None] * f32(max(k_size / q_size, 1.0))
    k_coords = np.arange(k_size, dtype=f32)[None, :] * f32(max(q_size / k_size, 1.0))
    relative = (q_coords - k_coords) + f32((k_size - 1) * max(q_size / k_size, 1.0))
    return np.trunc(relative).astype(np.int64)  # .long() truncates toward zero


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings (q_size, k_size, C) from the table ``rel_pos`` (L, C).

    The table is linearly resized to ``2 * max(q_size, k_size) - 1`` rows when its length differs.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = interpolate_linear(rel_pos, max_rel_dist)
    return rel_pos[_relative_index(q_size, k_size)]


# --------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------


def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, ws, ws, C), zero-padding H and W (bottom/right) to multiples of ws."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: jax.Array, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> jax.Array:
    """(B * nWindows, ws, ws, C) -> (B, H, W, C), dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Image to patch embedding: (B, H, W, in_chans) -> (B, H/p, W/p, embed_dim)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, rngs: nnx.Rngs):
        self.proj = Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


def _attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, rh: jax.Array | None, rw: jax.Array | None, scale: float):
    """Attention of a band of query rows over the whole key grid (the CPU path).

    q (B, n, r, W, d): r query rows; k, v (B, n, Hk*Wk, d); rh (r, Hk, d) and rw (W, Wk, d) the
    relative-position embeddings of those rows (None without relative positions). Returns (B, n, r*W, d).
    Same operations, in the same order, as the reference: softmax((q*scale) k^T + rel_h + rel_w) v; the logits
    and the softmax in float32 whatever the compute dtype of q, k, v.
    """
    b, n, r, w, d = q.shape
    f32 = jnp.float32
    attn = jnp.einsum("bnrwd,bnkd->bnrwk", q * scale, k, preferred_element_type=f32)  # (B, n, r, W, Hk*Wk)
    if rh is not None:
        hk, wk = rh.shape[1], rw.shape[1]
        rel_h = jnp.einsum("bnrwd,rkd->bnrwk", q, rh.astype(q.dtype), preferred_element_type=f32)
        rel_w = jnp.einsum("bnrwd,wkd->bnrwk", q, rw.astype(q.dtype), preferred_element_type=f32)
        attn = attn.reshape(b, n, r, w, hk, wk) + rel_h[..., :, None] + rel_w[..., None, :]
        attn = attn.reshape(b, n, r, w, hk * wk)
    attn = jax.nn.softmax(attn, axis=-1).astype(v.dtype)
    return jnp.einsum("bnrwk,bnkd->bnrwd", attn, v).reshape(b, n, r * w, d)


def _attend_fused(q: jax.Array, k: jax.Array, v: jax.Array, rh: jax.Array | None, rw: jax.Array | None,
                  scale: float) -> jax.Array:
    """All queries at once through ``jax.nn.dot_product_attention`` (the accelerator path), the decomposed
    relative positions as its bias: cuDNN's fused attention on NVIDIA GPUs in bfloat16, XLA's otherwise.

    q, k, v (B, H, W, n, d) -> (B, H*W, n, d). The bias rel_h + rel_w (B, n, H*W, H*W) is computed in float32
    and given in the compute dtype (cuDNN takes it in q's); logits and softmax are float32 in both kernels.
    """
    b, h, w, n, d = q.shape
    q, k, v = (t.reshape(b, h * w, n, d) for t in (q, k, v))
    bias = None
    if rh is not None:
        qg = q.reshape(b, h, w, n, d)
        rel_h = jnp.einsum("bhwnd,hkd->bnhwk", qg, rh.astype(q.dtype), preferred_element_type=jnp.float32)
        rel_w = jnp.einsum("bhwnd,wkd->bnhwk", qg, rw.astype(q.dtype), preferred_element_type=jnp.float32)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, h * w, -1).astype(q.dtype)
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, bias, scale=scale, implementation="cudnn")
        except (NotImplementedError, RuntimeError):  # outside cuDNN's limits (GPU, head dim, version): XLA's
            pass
    return jax.nn.dot_product_attention(q, k, v, bias, scale=scale, implementation="xla")


class Attention(nnx.Module):
    """Multi-head attention over a (B, H, W, C) grid with decomposed relative positions (MViTv2).

    On CPU (``common.cpu_paths``), grids of more than ``8 * query_chunk`` tokens (SAM's global blocks:
    64x64 = 4096) are processed in bands of at most ``query_chunk`` query tokens (whole rows, ``lax.map``),
    so the (heads, queries, keys) score matrix is never materialised whole: the same arithmetic per query,
    with a working set that stays in cache instead of multi-GB buffers (4x faster on CPU). Windows (14x14)
    are not chunked; ``query_chunk=0`` disables chunking. Elsewhere every attention is one
    ``jax.nn.dot_product_attention`` (:func:`_attend_fused`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
        *,
        query_chunk: int = 128,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.query_chunk = query_chunk
        self.qkv = Linear(dim, dim * 3, use_bias=qkv_bias, rngs=rngs)
        self.proj = Linear(dim, dim, rngs=rngs)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("Attention(use_rel_pos=True) needs input_size to size the relative position tables.")
            # Zero-initialised, as the reference (rel_pos_zero_init=True).
            self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, head_dim)))
            self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, head_dim)))

    def _rows_per_chunk(self, h: int, w: int) -> int:
        """Largest divisor of h whose band holds at most query_chunk tokens (at least one row)."""
        if self.query_chunk <= 0 or h * w <= 8 * self.query_chunk:
            return h
        return max(r for r in range(1, h + 1) if h % r == 0 and (r * w <= self.query_chunk or r == 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        n = self.num_heads
        rh = rw = None
        if self.use_rel_pos:
            rh = get_rel_pos(h, h, self.rel_pos_h[...])  # (H, Hk, d)
            rw = get_rel_pos(w, w, self.rel_pos_w[...])  # (W, Wk, d)
        if not common.cpu_paths():
            qkv = self.qkv(x).reshape(b, h, w, 3, n, -1)  # (B, H, W, 3, n, d)
            out = _attend_fused(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], rh, rw, self.scale)
            return self.proj(out.reshape(b, h, w, -1))

        # (B, H*W, 3, n, d) -> (3, B, n, H*W, d)
        qkv = self.qkv(x).reshape(b, h * w, 3, n, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        d = q.shape[-1]
        q = q.reshape(b, n, h, w, d)
        r = self._rows_per_chunk(h, w)
        if r == h:
            out = _attend_rows(q, k, v, rh, rw, self.scale)
        else:
            c = h // r
            q_bands = q.reshape(b, n, c, r, w, d).transpose(2, 0, 1, 3, 4, 5)  # (c, B, n, r, W, d)
            if rh is None:
                out = jax.lax.map(lambda qb: _attend_rows(qb, k, v, None, None, self.scale), q_bands)
            else:
                rh_bands = rh.reshape(c, r, h, d)
                out = jax.lax.map(lambda a: _attend_rows(a[0], k, v, a[1], rw, self.scale), (q_bands, rh_bands))
            out = out.transpose(1, 2, 0, 3, 4).reshape(b, n, h * w, d)  # (B, n, H*W, d), bands in order

        out = out.reshape(b, n, h, w, d).transpose(0, 2, 3, 1, 4).reshape(b, h, w, n * d)
        return self.proj(out)


class Block(nnx.Module):
    """Pre-norm transformer block with windowed (window_size > 0) or global (window_size == 0) attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        *,
        attn_query_chunk: int = 128,
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(dim, eps=VIT_LN_EPS, rngs=rngs)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            query_chunk=attn_query_chunk,
            rngs=rngs,
        )
        self.norm2 = LayerNorm(dim, eps=VIT_LN_EPS, rngs=rngs)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), rngs=rngs)
        self.window_size = window_size

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = cast(self.norm1(x), self.attn.qkv.dtype)  # cut into windows in the compute dtype (bf16: half the bytes)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nnx.Module):
    """SAM's ViT encoder. ``__call__(x)`` with the normalised image (B, img_size, img_size, in_chans) returns

    * ``image_embeddings`` (B, g, g, out_chans), g = img_size // patch_size;
    * ``interm_embeddings``: tuple of the outputs of the global-attention blocks (in block order),
      each (B, g, g, embed_dim), taken after the MLP residual.

    ``attn_query_chunk`` (not in the reference; no parameters) bounds the query band of the global
    attention, see ``Attention``; 0 computes each attention in one piece.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        attn_query_chunk: int = 128,
        rngs: nnx.Rngs,
    ):
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, rngs=rngs)
        # Absolute position embedding at the pretraining size; zero-initialised as the reference.
        self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, embed_dim)))
        self.blocks = nnx.List(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                attn_query_chunk=attn_query_chunk,
                rngs=rngs,
            )
            for i in range(depth)
        )
        self.neck = Sequential(
            [
                Conv2d(embed_dim, out_chans, 1, use_bias=False, rngs=rngs),
                LayerNorm2d(out_chans, rngs=rngs),
                Conv2d(out_chans, out_chans, 3, padding=1, use_bias=False, rngs=rngs),
                LayerNorm2d(out_chans, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        x = self.patch_embed(x) + self.pos_embed[...]
        interm = []
        for blk in self.blocks:
            x = blk(x)
            if blk.window_size == 0:
                interm.append(x)
        return self.neck(x), tuple(interm)
