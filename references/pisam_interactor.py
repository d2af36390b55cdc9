"""PyTorch reference of Pi-SAM's Precise Interactor (``interact_2``), written from PISAM_SPEC.md 3.2 and 6.

The official code is not available, so this is the spec transcribed module by module, with the
reference's state_dict names and order (spec appendix, ``interact_2.*`` without the prefix) and its
numerics, bugs included:

* B7: the values of the token->image attention include the image PE (v = Q + Q_pe).
* B6: ``kv_mask`` reaches only the image->token attentions inside the layers; the final
  image->token attention ignores it (``TwoWayTransformerNew.mask_final_attn = False``, the official
  behaviour; setting it True is this project's D5 fix, used by the tests to pin down our JAX port).

Layouts are torch's: E is (B, 32, H, W), points (B, P, 2) as (x, y) normalised to [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn


class MaskedAttention(nn.Module):
    """SAM's ``Attention`` (same q/k/v/out_proj names) with an optional key mask: True = masked (-inf)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        assert self.internal_dim % num_heads == 0, "num_heads must divide embedding_dim."
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x):
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q, k, v, mask=None):
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        attn = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        if mask is not None:
            attn = attn.masked_fill(mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(attn, dim=-1)
        out = attn @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlockNew(nn.Module):
    """Image->token attention, conv-MLP on the image, token->image attention; residual + LN after each."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, activation=nn.ReLU,
                 attention_downsample_rate: int = 1):
        super().__init__()
        self.cross_attn_image_to_token = MaskedAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.mlp = nn.Sequential(
            nn.Conv2d(embedding_dim, mlp_dim, 3, padding=1),
            LayerNorm2d(mlp_dim),
            activation(),
            nn.Conv2d(mlp_dim, embedding_dim, 3, padding=1),
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = MaskedAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm3 = nn.LayerNorm(embedding_dim)

    def forward(self, queries, keys, query_pe, hw, kv_mask=None):
        """queries (B, HW, C) image stream, keys (B, N, C) tokens, query_pe (1 or B, HW, C)."""
        q = queries + query_pe
        queries = self.norm1(queries + self.cross_attn_image_to_token(q, keys, keys, kv_mask))

        b, n, c = queries.shape
        img = queries.transpose(1, 2).reshape(b, c, *hw)
        img = img + self.mlp(img)
        queries = self.norm2(img.flatten(2).transpose(1, 2))

        qk = queries + query_pe
        keys = self.norm3(keys + self.cross_attn_token_to_image(keys, qk, qk))  # B7: v includes the PE
        return queries, keys


class TwoWayTransformerNew(nn.Module):
    """Pi-SAM's interactor transformer: the dense image is the query stream, the click tokens the keys."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, activation=nn.ReLU,
                 attention_downsample_rate: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlockNew(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate)
            for _ in range(depth)
        )
        self.final_attn_image_to_token = MaskedAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)
        self.mask_final_attn = False  # B6 as in the reference; True = this project's D5

    def forward(self, image_embedding, image_pe, point_embedding, kv_mask=None):
        """image_embedding (B, C, H, W), image_pe (C, H, W) or (1|B, C, H, W), point_embedding (B, N, C).

        Returns the image stream (B, HW, C); the updated tokens are discarded.
        """
        b, c, h, w = image_embedding.shape
        queries = image_embedding.flatten(2).permute(0, 2, 1)
        if image_pe.dim() == 3:
            image_pe = image_pe[None]
        query_pe = image_pe.flatten(2).permute(0, 2, 1)
        keys = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe, (h, w), kv_mask)
        q = queries + query_pe
        final_mask = kv_mask if self.mask_final_attn else None
        return self.norm_final_attn(queries + self.final_attn_image_to_token(q, keys, keys, final_mask))


class BlockTargetGenerator(nn.Module):
    """1-px erosion of binary maps (image border = outside) via a Laplacian, as the reference does it."""

    def __init__(self, boundary_width: int = 1):
        super().__init__()
        self.boundary_width = boundary_width
        kernel = -torch.ones(1, 1, 3, 3)
        kernel[0, 0, 1, 1] = 8.0
        self.laplacian_kernel = nn.Parameter(kernel, requires_grad=False)

    def forward(self, region):
        """region (B, 1, H, W) in {0, 1} -> region minus its inner boundary."""
        x = region.float()
        for _ in range(self.boundary_width):
            lap = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.laplacian_kernel) / 9.0
            x = x - (lap.clamp(min=0) > 0.1).float()
        return x


def point_sample(features, points):
    """features (B, C, H, W), points (B, P, 2) (x, y) in [0, 1] -> (B, P, C); bilinear, zeros, align_corners=False."""
    out = F.grid_sample(features, 2.0 * points[:, :, None, :] - 1.0, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out[..., 0].transpose(1, 2)


class PointInteract(nn.Module):
    """The Precise Interactor: E' = E + out_cov(TwoWayTransformerNew(E, img_pe, [hyper_in, click tokens]))."""

    def __init__(self, embedding_dim: int = 32, hw_size: int = 256, max_points: int = 10, min_area_thr: int = 2):
        super().__init__()
        self.hw_size = hw_size
        self.max_points = max_points
        self.min_area_thr = min_area_thr
        self.points_flag = nn.Embedding(2, embedding_dim)  # 1 = foreground click, 0 = background click
        self.pe_layer = PositionEmbeddingRandom(embedding_dim // 2)
        self.register_buffer("img_pe", self.pe_layer((hw_size, hw_size)))  # (C, H, W), saved
        self.token_embed = nn.Sequential(
            nn.LayerNorm(embedding_dim * 3),
            MLP(embedding_dim * 3, 256, embedding_dim, 3),
            nn.LayerNorm(embedding_dim),
        )
        self.transformer = TwoWayTransformerNew(depth=2, embedding_dim=embedding_dim, num_heads=1,
                                                mlp_dim=embedding_dim, attention_downsample_rate=1)
        self.out_cov = nn.Conv2d(embedding_dim, embedding_dim, 3, padding=1)
        nn.init.zeros_(self.out_cov.weight)
        nn.init.zeros_(self.out_cov.bias)
        self.bnd_op = BlockTargetGenerator(boundary_width=1)

    def forward(self, up_embeddings, hyper_in, points, flags, kv_mask=None):
        """up_embeddings E (B, C, H, W), hyper_in (B, 1, C), points (B, P, 2) (x, y) in [0, 1],
        flags (B, P) long, kv_mask (B, 1+P) bool (True = padded) or None -> E' (B, C, H, W)."""
        feat = point_sample(up_embeddings, points)
        flag = self.points_flag(flags.long())
        pe = self.pe_layer._pe_encoding(points.to(up_embeddings.dtype))
        tokens = self.token_embed(torch.cat([feat, flag, pe], dim=-1))
        tokens = torch.cat([hyper_in, tokens], dim=1)
        b, c, h, w = up_embeddings.shape
        t = self.transformer(up_embeddings, self.img_pe, tokens, kv_mask)
        t = t.transpose(1, 2).reshape(b, c, h, w)
        return self.out_cov(t) + up_embeddings
