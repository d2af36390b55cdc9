"""SAM's mask decoder: output tokens + prompt tokens through the two-way transformer, then
hypernetwork masks on the upscaled image embedding and an IoU head.

A port of ``segment_anything/modeling/mask_decoder.py`` with the same module tree.
The forward pass is split into small methods (token assembly, transformer run,
upscaling, hypernetwork inputs, mask product, IoU head) so that HQ-SAM's and
Pi-SAM's decoders reuse them instead of copying the whole function.

Batch convention: B is the *prompt* batch. Every prompt has its own row of the image
embedding (or a single row, broadcast to all prompts); the reference's
``repeat_interleave`` of one image over its prompts is the caller's job.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pisam_jax.modeling.common import MLP, ConvTranspose2x2, LayerNorm2d, Sequential, gelu

_embed_init = jax.nn.initializers.normal(stddev=1.0)  # torch.nn.Embedding


class MaskDecoder(nnx.Module):
    """Predicts masks (and their IoU) from image and prompt embeddings."""

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: nnx.Module,
        num_multimask_outputs: int = 3,
        activation: Callable = gelu,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        rngs: nnx.Rngs,
    ):
        d = transformer_dim
        self.transformer_dim = d
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nnx.Embed(1, d, embedding_init=_embed_init, rngs=rngs)
        self.mask_tokens = nnx.Embed(self.num_mask_tokens, d, embedding_init=_embed_init, rngs=rngs)
        self.output_upscaling = Sequential(
            [
                ConvTranspose2x2(d, d // 4, rngs=rngs),
                LayerNorm2d(d // 4, rngs=rngs),
                activation,
                ConvTranspose2x2(d // 4, d // 8, rngs=rngs),
                activation,
            ]
        )
        self.output_hypernetworks_mlps = nnx.List(
            MLP(d, d, d // 8, 3, rngs=rngs) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, rngs=rngs)

    # -- reusable pieces -------------------------------------------------------------------

    def _output_tokens(self) -> jax.Array:
        """The learned output tokens, (T, C): [iou, mask_0 .. mask_{M-1}]. HQ-SAM appends ``hf_token``."""
        return jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]], axis=0)

    def _tokens(self, sparse_prompt_embeddings: jax.Array) -> jax.Array:
        """Output tokens then prompt tokens: (B, N, C) -> (B, T + N, C)."""
        out = self._output_tokens()
        b = sparse_prompt_embeddings.shape[0]
        out = jnp.broadcast_to(out[None], (b,) + out.shape).astype(sparse_prompt_embeddings.dtype)
        return jnp.concatenate([out, sparse_prompt_embeddings], axis=1)

    def _run_transformer(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        tokens: jax.Array,
        dense_prompt_embeddings: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Adds the dense prompt to the image and runs the transformer.

        image_embeddings (B or 1, H, W, C), image_pe (B or 1, H, W, C), tokens (B, T+N, C),
        dense (B, H, W, C) -> hs (B, T+N, C), src (B, H, W, C).
        """
        src = image_embeddings + dense_prompt_embeddings
        b, h, w, c = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        return hs, src.reshape(b, h, w, c)

    def _upscale(self, src: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, 4H, 4W, C/8)."""
        return self.output_upscaling(src)

    def _hyper_in(self, mask_tokens_out: jax.Array, which: slice = slice(None)) -> jax.Array:
        """Mask-token outputs (B, M, C) -> hypernetwork weights (B, m, C/8) of the tokens ``which`` selects (all
        by default), one MLP per token."""
        mlps = list(self.output_hypernetworks_mlps)
        return jnp.stack([mlps[i](mask_tokens_out[:, i]) for i in range(len(mlps))[which]], axis=1)

    @staticmethod
    def _hyper_masks(hyper_in: jax.Array, upscaled: jax.Array) -> jax.Array:
        """Per-pixel dot product: hyper_in (B, M, c) . upscaled (B, h, w, c) -> mask logits (B, M, h, w), float32
        (bfloat16 operands, float32 sums in a bfloat16 model)."""
        dtype = jnp.promote_types(hyper_in.dtype, upscaled.dtype)
        return jnp.einsum("bmc,bhwc->bmhw", hyper_in.astype(dtype), upscaled.astype(dtype),
                          preferred_element_type=jnp.float32)

    def _iou(self, iou_token_out: jax.Array) -> jax.Array:
        """(B, C) -> predicted IoU per mask token, (B, M), float32."""
        return self.iou_prediction_head(iou_token_out).astype(jnp.float32)

    @staticmethod
    def _selected(multimask_output: bool) -> slice:
        """The mask tokens SAM outputs: 1.. (multimask) or 0 (single)."""
        return slice(1, None) if multimask_output else slice(0, 1)

    # -- forward ---------------------------------------------------------------------------

    def predict_masks(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        which: slice = slice(None),
    ) -> tuple[jax.Array, jax.Array]:
        """The masks of the mask tokens ``which`` selects (all by default): masks (B, m, 4H, 4W) logits, and
        iou_pred (B, M) of every token."""
        tokens = self._tokens(sparse_prompt_embeddings)
        hs, src = self._run_transformer(image_embeddings, image_pe, tokens, dense_prompt_embeddings)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        masks = self._hyper_masks(self._hyper_in(mask_tokens_out, which), self._upscale(src))
        return masks, self._iou(iou_token_out)

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
    ) -> tuple[jax.Array, jax.Array]:
        """Predicts masks.

        Args:
          image_embeddings: (B or 1, H, W, C) image-encoder output, one row per prompt (or one for all).
          image_pe: (B or 1, H, W, C), the prompt encoder's ``get_dense_pe()``.
          sparse_prompt_embeddings: (B, N, C) point and box tokens.
          dense_prompt_embeddings: (B, H, W, C) mask-prompt embedding.
          multimask_output: static; True -> the 3 ambiguity masks, False -> the single mask.

        Returns:
          masks (B, 3 or 1, 4H, 4W) logits (channel-first, SAM's output contract) and iou_pred (B, 3 or 1).
        """
        which = self._selected(multimask_output)  # only these masks are computed
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, which
        )
        return masks, iou_pred[:, which]
