"""SAM's prompt encoder: points, boxes and low-resolution masks -> sparse and dense embeddings.

A port of ``segment_anything/modeling/prompt_encoder.py`` (NHWC, same module
tree, same numerics). Everything is static-shape and jit-friendly: the label
logic uses ``jnp.where`` instead of boolean indexing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pisam_jax.modeling.common import Buffer, Conv2d, LayerNorm2d, Sequential, gelu

# torch.nn.Embedding initialises N(0, 1).
_embed_init = jax.nn.initializers.normal(stddev=1.0)


def _embedding(num: int, dim: int, rngs: nnx.Rngs) -> nnx.Embed:
    """``torch.nn.Embedding(num, dim)``; parameter ``embedding`` (num, dim) = torch ``weight``."""
    return nnx.Embed(num, dim, embedding_init=_embed_init, rngs=rngs)


class PositionEmbeddingRandom(nnx.Module):
    """Random-Fourier positional encoding: [sin, cos](2*pi*(2c - 1) @ G), G ~ scale * N(0, 1) of shape (2, F).

    Coordinates are (x, y). Output has 2F channels.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None, *, rngs: nnx.Rngs):
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.positional_encoding_gaussian_matrix = Buffer(
            scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
        )

    def encode(self, coords: jax.Array) -> jax.Array:
        """(..., 2) coordinates in [0, 1] -> (..., 2F)."""
        coords = 2 * coords.astype(jnp.float32) - 1
        coords = coords @ self.positional_encoding_gaussian_matrix[...]
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> jax.Array:
        """Encoding of the pixel centres of an (h, w) grid: (h, w, 2F)."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)  # (h, w, 2) as (x, y)
        return self.encode(grid)

    def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """(..., 2) pixel coordinates (x, y) in an image of size (H, W) -> (..., 2F)."""
        coords = coords.astype(jnp.float32)
        coords = jnp.stack([coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], axis=-1)
        return self.encode(coords)


class PromptEncoder(nnx.Module):
    """Encodes prompts for SAM's mask decoder.

    Sparse: each point becomes PE(point) + a label embedding (label -1 = "not a point":
    zero PE + ``not_a_point_embed``; 0 = negative, 1 = positive click; 2 / 3 = a box corner,
    SAM 2's convention, which training uses to give boxes and points one static shape), each box
    its two corners with ``point_embeddings[2]`` / ``[3]``. Dense: the mask prompt through
    ``mask_downscaling``, or ``no_mask_embed`` everywhere.
    """

    num_point_embeddings = 4  # pos/neg point + 2 box corners

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
        *,
        rngs: nnx.Rngs,
    ):
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])

        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        self.point_embeddings = nnx.List(_embedding(1, embed_dim, rngs) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = _embedding(1, embed_dim, rngs)
        c = mask_in_chans
        self.mask_downscaling = Sequential(
            [
                Conv2d(1, c // 4, 2, stride=2, rngs=rngs),
                LayerNorm2d(c // 4, rngs=rngs),
                gelu,
                Conv2d(c // 4, c, 2, stride=2, rngs=rngs),
                LayerNorm2d(c, rngs=rngs),
                gelu,
                Conv2d(c, embed_dim, 1, rngs=rngs),
            ]
        )
        self.no_mask_embed = _embedding(1, embed_dim, rngs)

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid: (1, H, W, C)."""
        return self.pe_layer(self.image_embedding_size)[None]

    def _embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """coords (B, N, 2) in the input frame, labels (B, N) -> (B, N (+1 if pad), C)."""
        coords = coords.astype(jnp.float32) + 0.5  # shift to the pixel centre
        labels = labels.astype(jnp.int32)
        if pad:
            b = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), jnp.int32)], axis=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, self.not_a_point_embed.embedding[0], emb)
        for i, point_embedding in enumerate(self.point_embeddings):  # 2, 3: box corners given as points
            emb = emb + jnp.where(lab == i, point_embedding.embedding[0], 0.0)
        return emb

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """boxes (B, 4) as (x0, y0, x1, y1) in the input frame -> (B, 2, C)."""
        boxes = boxes.astype(jnp.float32) + 0.5  # shift to the pixel centre
        corners = self.pe_layer.forward_with_coords(boxes.reshape(-1, 2, 2), self.input_image_size)
        corner_embed = jnp.concatenate([self.point_embeddings[2].embedding, self.point_embeddings[3].embedding])
        return corners + corner_embed

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks (B, 4H, 4W, 1) -> (B, H, W, C)."""
        return self.mask_downscaling(masks)

    def __call__(
        self,
        points: tuple[jax.Array, jax.Array] | None = None,
        boxes: jax.Array | None = None,
        masks: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Embeds prompts.

        Args:
          points: (coords (B, N, 2) as (x, y) in the ``input_image_size`` frame, labels (B, N) int).
            Without boxes a padding point (label -1) is appended, as in SAM.
          boxes: (B, 4) as (x0, y0, x1, y1) in the same frame.
          masks: (B, 4H, 4W, 1) low-resolution mask logits.

        Returns:
          sparse (B, n_tokens, C) and dense (B, H, W, C) embeddings.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        sparse = [jnp.zeros((bs, 0, self.embed_dim), jnp.float32)]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse = jnp.concatenate(sparse, axis=1)

        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(self.no_mask_embed.embedding[0], (bs, h, w, self.embed_dim))
        return sparse, dense
