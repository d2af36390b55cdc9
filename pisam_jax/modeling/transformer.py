"""SAM's two-way transformer: prompt tokens and image embedding attend to each other.

A port of ``segment_anything/modeling/transformer.py`` with the same module tree
(``layers[i].cross_attn_token_to_image.q_proj`` ...). The image side is NHWC at
the interface and (B, HW, C) inside, flattened in row-major (h, w) order as torch's
``flatten(2).permute(0, 2, 1)`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pisam_jax.modeling.common import LayerNorm, Linear, MLPBlock, relu


class Attention(nnx.Module):
    """Multi-head attention whose projections may shrink the width to ``embedding_dim // downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, *, rngs: nnx.Rngs):
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the internal dim ({self.internal_dim}).")
        self.q_proj = Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.k_proj = Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.v_proj = Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.out_proj = Linear(self.internal_dim, embedding_dim, rngs=rngs)

    def _separate_heads(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)  # (B, heads, N, c)

    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None
    ) -> jax.Array:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).

        ``key_mask`` (B, Nk) bool, True = this key is masked out (a padded token). Masked keys
        get zero weight; a row whose keys are all masked falls back to uniform weights (no NaN).
        Logits and softmax are float32 whatever the projections' compute dtype.
        """
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))

        attn = jnp.einsum("bhqc,bhkc->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            attn = jnp.where(key_mask[:, None, None, :], jnp.finfo(attn.dtype).min, attn)
        attn = jax.nn.softmax(attn, axis=-1)

        out = jnp.einsum("bhqk,bhkc->bhqc", attn.astype(v.dtype), v)
        b, _, n, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, n, self.internal_dim)
        return self.out_proj(out)


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention; each + residual + LN."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Callable = relu,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        self.self_attn = Attention(embedding_dim, num_heads, rngs=rngs)
        self.norm1 = LayerNorm(embedding_dim, rngs=rngs)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.norm2 = LayerNorm(embedding_dim, rngs=rngs)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation, rngs=rngs)
        self.norm3 = LayerNorm(embedding_dim, rngs=rngs)
        self.norm4 = LayerNorm(embedding_dim, rngs=rngs)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """queries (B, N, C), keys (B, HW, C), query_pe like queries, key_pe (B or 1, HW, C)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """``depth`` two-way blocks, then a final token->image attention and LayerNorm."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Callable = relu,
        attention_downsample_rate: int = 2,
        *,
        rngs: nnx.Rngs,
    ):
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nnx.List(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
                rngs=rngs,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.norm_final_attn = LayerNorm(embedding_dim, rngs=rngs)

    def __call__(
        self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the transformer.

        Args:
          image_embedding: (B, H, W, C).
          image_pe: (B or 1, H, W, C) positional encoding of the image.
          point_embedding: (B, N, C) prompt and output tokens (also their positional encoding).

        Returns:
          queries (B, N, C) and keys (B, H*W, C), the processed tokens and image.
        """
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
        queries = point_embedding

        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)

        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
