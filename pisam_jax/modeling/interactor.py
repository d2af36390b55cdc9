"""Pi-SAM's Precise Interactor (``interact_2``): clicks refine the Object Embedder's feature map.

E' = E + out_cov(T), where T is ``TwoWayTransformerNew`` run with the 256x256 feature map E as
the query stream and [hyper_in, one token per click] as the keys (PISAM_SPEC.md 3.2). Each click
token is token_embed([E sampled at the click, flag embedding, PE of the click]).

The module tree mirrors the reference's (``transformer.layers[0].cross_attn_image_to_token.q_proj``,
``token_embed[1].layers[0]``, ...), so ``convert.keymap.load_torch_weights`` converts an
``interact_2.*`` state_dict with its generic rules. NHWC: E is (B, H, W, 32).

Decisions (spec D3, D5, D6):
  * clicks are (x, y) normalised with pixel centres: pixel (row, col) is ((col+0.5)/W, (row+0.5)/H);
  * padded clicks are masked in every image->token attention, the final one included (D5; the
    reference forgets the final one, bug B6). Without padding this is exactly the reference;
  * the values of token->image attention include the image PE, as the reference (B7);
  * ``img_pe`` is kept in the checkpoint's layout (C, H, W) and transposed in the forward,
    so the converter's identity rule for buffers holds.

The attentions between the 65536 pixels and the few tokens are computed reassociated (same maths, fp32
rounding differences only): :func:`attend_to_tokens` and :func:`attend_to_image` apply the per-pixel C x C
projections to the tokens instead of the pixels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pisam_jax.modeling.common import MLP, Buffer, Conv2d, LayerNorm, LayerNorm2d, Sequential, cast, relu
from pisam_jax.modeling.prompt_encoder import PositionEmbeddingRandom, _embedding
from pisam_jax.modeling.transformer import Attention


def point_sample(features: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinear samples of ``features`` at ``points``: torch's ``grid_sample(features, 2p - 1)``.

    Same semantics as grid_sample with align_corners=False and zero padding: a normalised
    coordinate u lands on pixel u * size - 0.5, and each of the 4 neighbours outside the map
    contributes 0. Implemented with gathers (P is small; the map is not touched elsewhere).

    Args:
      features: (B, H, W, C).
      points: (B, P, 2) as (x, y) normalised to [0, 1].

    Returns:
      (B, P, C).
    """
    b, h, w, c = features.shape
    grid = 2.0 * points.astype(jnp.float32) - 1.0
    # torch's unnormalisation, ((g + 1) * size - 1) / 2 == u * size - 0.5, in its rounding order.
    px = ((grid[..., 0] + 1.0) * w - 1.0) / 2.0
    py = ((grid[..., 1] + 1.0) * h - 1.0) / 2.0
    x0, y0 = jnp.floor(px), jnp.floor(py)
    fx, fy = px - x0, py - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

    flat = features.reshape(b, h * w, c)
    out = jnp.zeros((b, points.shape[1], c), features.dtype)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)  # (B, P)
            value = jnp.take_along_axis(flat, idx[..., None], axis=1)  # (B, P, C)
            out = out + jnp.where(inside, wx * wy, 0.0)[..., None] * value
    return out


def attend_to_tokens(attn: Attention, image: jax.Array, tokens: jax.Array,
                     key_mask: jax.Array | None = None) -> jax.Array:
    """``attn(image, tokens, tokens, key_mask)``: many queries (the pixels), few keys (the tokens).

    q_proj is folded into the keys and out_proj into the values, so a pixel costs two thin matmuls
    (C -> T logits, T -> C output) instead of two C x C projections on top.
    image (B, N, C), tokens (B, T, C), key_mask (B, T) True = masked, as :class:`Attention` -> (B, N, C).
    The per-pixel products run in the projections' compute dtype; logits and softmax in float32.
    """
    h = attn.num_heads
    dtype = attn.q_proj.dtype
    wq = attn.q_proj.kernel[...]
    c, d = wq.shape[0], wq.shape[1] // h
    k = attn.k_proj(tokens).reshape(*tokens.shape[:2], h, d).astype(jnp.float32) / math.sqrt(d)
    v = attn.v_proj(tokens).reshape(*tokens.shape[:2], h, d).astype(jnp.float32)
    wk = jnp.einsum("chd,bthd->bcht", wq.reshape(c, h, d), k)  # (B, C, h, T)
    bk = jnp.einsum("hd,bthd->bht", attn.q_proj.bias[...].reshape(h, d), k)
    logits = jnp.einsum("bnc,bcht->bhnt", cast(image, dtype), cast(wk, dtype), preferred_element_type=jnp.float32)
    logits = logits + bk[:, :, None]
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], jnp.finfo(logits.dtype).min, logits)
    vo = jnp.einsum("bthd,hdc->bhtc", v, attn.out_proj.kernel[...].reshape(h, d, -1))  # (B, h, T, C)
    weights = cast(jax.nn.softmax(logits, axis=-1), dtype)
    return jnp.einsum("bhnt,bhtc->bnc", weights, cast(vo, dtype)) + cast(attn.out_proj.bias[...], dtype)


def attend_to_image(attn: Attention, tokens: jax.Array, image: jax.Array) -> jax.Array:
    """``attn(tokens, image, image)``: few queries (the tokens), many keys = values (the pixels).

    k_proj is folded into the queries, and v_proj is applied after the weighted sum over the pixels (the
    weights of a query sum to 1, so its bias passes through).
    tokens (B, T, C), image (B, N, C) -> (B, T, C). The per-pixel products run in the projections' compute
    dtype with float32 sums; logits and softmax in float32.
    """
    h = attn.num_heads
    dtype = attn.k_proj.dtype
    wk = attn.k_proj.kernel[...]
    c, d = wk.shape[0], wk.shape[1] // h
    q = attn.q_proj(tokens).reshape(*tokens.shape[:2], h, d).astype(jnp.float32) / math.sqrt(d)
    qk = jnp.einsum("bthd,chd->bhtc", q, wk.reshape(c, h, d))
    qb = jnp.einsum("bthd,hd->bht", q, attn.k_proj.bias[...].reshape(h, d))
    image = cast(image, dtype)
    logits = jnp.einsum("bhtc,bnc->bhtn", cast(qk, dtype), image, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + qb[..., None], axis=-1)
    mixed = jnp.einsum("bhtn,bnc->bhtc", cast(weights, dtype), image, preferred_element_type=jnp.float32)
    v = jnp.einsum("bhtc,chd->bthd", mixed, attn.v_proj.kernel[...].reshape(c, h, d))
    return attn.out_proj((v + attn.v_proj.bias[...].reshape(h, d)).reshape(*tokens.shape[:2], h * d))


class TwoWayAttentionBlockNew(nnx.Module):
    """Image->token attention, conv-MLP on the image, token->image attention; residual + LN after each."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int = 1,
                 *, rngs: nnx.Rngs):
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, rngs=rngs)
        self.norm1 = LayerNorm(embedding_dim, rngs=rngs)
        self.mlp = Sequential(
            [
                Conv2d(embedding_dim, mlp_dim, 3, padding=1, rngs=rngs),
                LayerNorm2d(mlp_dim, rngs=rngs),
                relu,
                Conv2d(mlp_dim, embedding_dim, 3, padding=1, rngs=rngs),
            ]
        )
        self.norm2 = LayerNorm(embedding_dim, rngs=rngs)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, rngs=rngs)
        self.norm3 = LayerNorm(embedding_dim, rngs=rngs)

    def __call__(self, image: jax.Array, tokens: jax.Array, image_pe: jax.Array,
                 key_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """image (B, H, W, C) query stream, tokens (B, N, C), image_pe (1|B, H, W, C), key_mask (B, N)."""
        b, h, w, c = image.shape
        q = (image + image_pe).reshape(b, h * w, c)
        out = attend_to_tokens(self.cross_attn_image_to_token, q, tokens, key_mask)
        image = self.norm1(image + out.reshape(b, h, w, c))

        image = self.norm2(image + self.mlp(image))

        kv = (image + image_pe).reshape(b, h * w, c)
        tokens = self.norm3(tokens + attend_to_image(self.cross_attn_token_to_image, tokens, kv))  # B7: v has the PE
        return image, tokens


class TwoWayTransformerNew(nnx.Module):
    """Pi-SAM's interactor transformer: the dense image is the query stream, the tokens are the keys."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 1, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            TwoWayAttentionBlockNew(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, rngs=rngs)
            for _ in range(depth)
        )
        self.final_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, rngs=rngs)
        self.norm_final_attn = LayerNorm(embedding_dim, rngs=rngs)

    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array,
                 key_mask: jax.Array | None = None) -> jax.Array:
        """image (B, H, W, C), image_pe (1|B, H, W, C), tokens (B, N, C), key_mask (B, N) True = padded.

        Returns the image stream (B, H, W, C); the updated tokens are discarded. ``key_mask`` is applied
        in every image->token attention, the final one included (D5).
        """
        for layer in self.layers:
            image, tokens = layer(image, tokens, image_pe, key_mask)
        b, h, w, c = image.shape
        q = (image + image_pe).reshape(b, h * w, c)
        out = attend_to_tokens(self.final_attn_image_to_token, q, tokens, key_mask)
        return self.norm_final_attn(image + out.reshape(b, h, w, c))


class BlockTargetGenerator(nnx.Module):
    """Holds the reference's frozen Laplacian kernel (1, 1, 3, 3), torch layout; erodes binary maps by 1 px."""

    def __init__(self, boundary_width: int = 1):
        self.boundary_width = boundary_width
        kernel = -np.ones((1, 1, 3, 3), np.float32)
        kernel[0, 0, 1, 1] = 8.0
        self.laplacian_kernel = Buffer(jnp.asarray(kernel))

    def __call__(self, region: jax.Array) -> jax.Array:
        """region (B, H, W) in {0, 1} -> region minus its inner boundary (image border counts as outside)."""
        x = region.astype(jnp.float32)
        k = self.laplacian_kernel[...][0, 0]
        for _ in range(self.boundary_width):
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1)))
            h, w = x.shape[1:]
            lap = sum(k[i, j] * padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
            x = x - (jnp.maximum(lap, 0.0) > 0.1).astype(jnp.float32)
        return x


class PointInteract(nnx.Module):
    """The Precise Interactor. Attribute tree = the reference's ``interact_2``.

    Parameters: ``points_flag`` (2, C) (index 1 = foreground click, 0 = background click),
    ``token_embed`` LN(3C) -> MLP 3C->256->256->C -> LN(C), ``transformer`` (depth 2, 1 head,
    conv-MLP width C), ``out_cov`` 3x3 conv, zero-initialised so that a fresh module is the identity.
    Buffers (saved, not trained): ``img_pe`` (C, H, W), ``pe_layer.positional_encoding_gaussian_matrix``
    (2, C/2), ``bnd_op.laplacian_kernel`` (1, 1, 3, 3).
    """

    def __init__(self, embedding_dim: int = 32, hw_size: int = 256, *, rngs: nnx.Rngs):
        c = embedding_dim
        self.hw_size = hw_size
        self.points_flag = _embedding(2, c, rngs)
        self.pe_layer = PositionEmbeddingRandom(c // 2, rngs=rngs)
        # The checkpoint's layout (C, H, W), so the converter's identity rule applies.
        self.img_pe = Buffer(self.pe_layer((hw_size, hw_size)).transpose(2, 0, 1))
        self.token_embed = Sequential(
            [LayerNorm(3 * c, rngs=rngs), MLP(3 * c, 256, c, 3, rngs=rngs), LayerNorm(c, rngs=rngs)]
        )
        self.transformer = TwoWayTransformerNew(2, c, 1, c, 1, rngs=rngs)
        self.out_cov = Conv2d(c, c, 3, padding=1, rngs=rngs)
        self.out_cov.kernel.set_value(jnp.zeros_like(self.out_cov.kernel[...]))
        self.out_cov.bias.set_value(jnp.zeros_like(self.out_cov.bias[...]))
        self.bnd_op = BlockTargetGenerator(boundary_width=1)

    def click_tokens(self, embeddings: jax.Array, points: jax.Array, flags: jax.Array) -> jax.Array:
        """One token per click: token_embed([E(p), points_flag[flag], PE(p)]) -> (B, P, C)."""
        feat = point_sample(embeddings, points)
        flag = self.points_flag(flags.astype(jnp.int32))
        pe = self.pe_layer.encode(points)  # points already in [0, 1]: no +0.5 here
        return self.token_embed(jnp.concatenate([feat, flag, pe], axis=-1))

    def __call__(
        self,
        embeddings: jax.Array,
        hyper_in: jax.Array,
        points: jax.Array,
        flags: jax.Array,
        pad_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Refines the feature map with clicks.

        Args:
          embeddings: E (B, H, W, C), the Object Embedder's output (H = W = ``hw_size``).
          hyper_in: (B, 1, C), the HQ token after ``hf_mlp``; token 0, never masked.
          points: (B, P, 2) clicks as (x, y) normalised with pixel centres (D3).
          flags: (B, P) int, 1 = foreground click, 0 = background click.
          pad_mask: (B, P) bool, True = padded slot (ignored entirely), or None (no padding).

        Returns:
          E' = E + out_cov(T), (B, H, W, C).
        """
        b, h, w, c = embeddings.shape
        if (h, w) != tuple(self.img_pe.shape[1:]):
            raise ValueError(f"embeddings are {h}x{w}, the interactor's img_pe is {self.img_pe.shape[1:]}.")
        points = points.astype(jnp.float32)
        key_mask = None
        if pad_mask is not None:
            pad_mask = pad_mask.astype(bool)
            # Padded slots carry arbitrary values: make them harmless (they are masked anyway).
            points = jnp.where(pad_mask[..., None], 0.5, points)
            flags = jnp.where(pad_mask, 0, flags)
            key_mask = jnp.concatenate([jnp.zeros((b, 1), bool), pad_mask], axis=1)
        tokens = jnp.concatenate([hyper_in.astype(embeddings.dtype), self.click_tokens(embeddings, points, flags)], 1)
        image_pe = self.img_pe[...].transpose(1, 2, 0)[None]  # (1, H, W, C)
        t = self.transformer(embeddings, image_pe, tokens, key_mask)
        return embeddings + self.out_cov(t)
