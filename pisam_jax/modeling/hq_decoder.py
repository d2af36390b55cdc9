"""HQ-SAM's mask decoder: SAM's decoder plus a High-Quality output token whose mask is read off
fused "HQ features" (early ViT features + the image embedding + SAM's upscaled mask features).

A port of ``segment_anything_hq/modeling/mask_decoder_hq.py`` (``segment_anything_hq==0.3``)
with the same module tree, so the official ``sam_hq_vit_*.pth`` keys map one to one:
``mask_decoder.hf_token``, ``hf_mlp``, ``compress_vit_feat``, ``embedding_encoder``,
``embedding_maskfeature``. Everything SAM's decoder already does is inherited from
:class:`MaskDecoder`; this file adds only the HQ pieces, each as its own method so that
Pi-SAM's decoder (which subclasses this one) can reuse the HQ feature path and the HQ token:

    hq_features(image_embeddings, vit_features)     -> (B, 4H, 4W, C/8)   step A of PISAM_SPEC 3.1
    hq_mask_features(upscaled_sam, hq_features)     -> (B, 4H, 4W, C/8)
    predict_masks(...)                              -> SAM's M masks + the HQ mask, and M IoUs
    select_hq(masks, iou, multimask, hq_token_only) -> HQ-SAM's output selection

Unlike the torch module, ``num_mask_tokens`` stays SAM's count (4); the HQ token is the one after
them (index ``1 + num_mask_tokens`` of the output tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pisam_jax.modeling.common import MLP, Conv2d, ConvTranspose2x2, LayerNorm2d, Sequential, gelu
from pisam_jax.modeling.mask_decoder import MaskDecoder, _embed_init


class MaskDecoderHQ(MaskDecoder):
    """SAM's mask decoder with HQ-SAM's output token and HQ features.

    ``vit_dim`` is the ViT width (768 / 1024 / 1280 for vit_b / l / h): the channels of the first
    global-attention block's output that ``compress_vit_feat`` upsamples.
    """

    def __init__(self, *, vit_dim: int, rngs: nnx.Rngs, **sam_decoder_kwargs):
        super().__init__(rngs=rngs, **sam_decoder_kwargs)
        d = self.transformer_dim
        self.hf_token = nnx.Embed(1, d, embedding_init=_embed_init, rngs=rngs)
        self.hf_mlp = MLP(d, d, d // 8, 3, rngs=rngs)
        self.compress_vit_feat = Sequential(
            [
                ConvTranspose2x2(vit_dim, d, rngs=rngs),
                LayerNorm2d(d, rngs=rngs),
                gelu,
                ConvTranspose2x2(d, d // 8, rngs=rngs),
            ]
        )
        self.embedding_encoder = Sequential(
            [
                ConvTranspose2x2(d, d // 4, rngs=rngs),
                LayerNorm2d(d // 4, rngs=rngs),
                gelu,
                ConvTranspose2x2(d // 4, d // 8, rngs=rngs),
            ]
        )
        self.embedding_maskfeature = Sequential(
            [
                Conv2d(d // 8, d // 4, 3, padding=1, rngs=rngs),
                LayerNorm2d(d // 4, rngs=rngs),
                gelu,
                Conv2d(d // 4, d // 8, 3, padding=1, rngs=rngs),
            ]
        )

    # -- HQ pieces -------------------------------------------------------------------------

    def _output_tokens(self) -> jax.Array:
        """(M + 2, C): [iou, mask_0 .. mask_{M-1}, hf]."""
        return jnp.concatenate([super()._output_tokens(), self.hf_token.embedding[...]], axis=0)

    def hq_features(self, image_embeddings: jax.Array, vit_features: jax.Array) -> jax.Array:
        """The fused HQ features: ``embedding_encoder(image) + compress_vit_feat(vit)``.

        image_embeddings (B, H, W, C) from the encoder's neck; vit_features (B, H, W, C_vit), the
        output of the first global-attention block (``interm[0]``) -> (B, 4H, 4W, C/8), e.g.
        (B, 256, 256, 32). Depends only on the image: compute it once per image, not per prompt.
        """
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(vit_features)

    def hq_mask_features(self, upscaled_sam: jax.Array, hq_features: jax.Array) -> jax.Array:
        """The per-pixel features the HQ token reads: ``embedding_maskfeature(upscaled SAM) + hq_features``.

        upscaled_sam (B, 4H, 4W, C/8) (``_upscale`` of the transformer's image output), hq_features
        (B or 1, 4H, 4W, C/8) -> (B, 4H, 4W, C/8).
        """
        return self.embedding_maskfeature(upscaled_sam) + hq_features

    def predict_masks(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        hq_features: jax.Array,
        which: slice = slice(None),
    ) -> tuple[jax.Array, jax.Array]:
        """The SAM masks of the tokens ``which`` selects (all M by default), then the HQ mask: masks
        (B, m + 1, 4H, 4W) logits, iou_pred (B, M) of every token.

        As torch: the SAM masks are products with the upscaled embedding, the HQ mask with
        ``hq_mask_features``. hq_features: (B or 1, 4H, 4W, C/8) from :meth:`hq_features`.
        """
        m = self.num_mask_tokens
        tokens = self._tokens(sparse_prompt_embeddings)
        hs, src = self._run_transformer(image_embeddings, image_pe, tokens, dense_prompt_embeddings)
        upscaled = self._upscale(src)
        masks_sam = self._hyper_masks(self._hyper_in(hs[:, 1 : 1 + m], which), upscaled)
        hq_in = self.hf_mlp(hs[:, 1 + m])[:, None]  # (B, 1, C/8)
        masks_hq = self._hyper_masks(hq_in, self.hq_mask_features(upscaled, hq_features))
        return jnp.concatenate([masks_sam, masks_hq], axis=1), self._iou(hs[:, 0])

    @staticmethod
    def select_hq(
        masks: jax.Array, iou_pred: jax.Array, multimask_output: bool, hq_token_only: bool
    ) -> tuple[jax.Array, jax.Array]:
        """HQ-SAM 0.3's output: always one mask and one score per prompt.

        masks (B, M + 1, h, w) (SAM's M masks, then the HQ mask; single: mask 0 and the HQ mask are enough),
        iou_pred (B, M) ->
        masks (B, 1, h, w), iou_pred (B, 1):
          * multimask: the SAM mask among 1..M-1 with the highest predicted IoU, and that IoU;
          * single: SAM mask 0 and its IoU;
          * the HQ mask alone with ``hq_token_only``, else the chosen SAM mask plus the HQ mask.
        The score is always the chosen SAM mask's predicted IoU (the HQ token has no IoU head).
        """
        masks_hq = masks[:, -1:]
        if multimask_output:
            ious = iou_pred[:, 1:]
            best = jnp.argmax(ious, axis=1)  # first maximum on ties, as torch.max
            iou_pred = jnp.take_along_axis(ious, best[:, None], axis=1)
            masks_sam = jnp.take_along_axis(masks[:, 1:-1], best[:, None, None, None], axis=1)
        else:
            iou_pred, masks_sam = iou_pred[:, :1], masks[:, :1]
        return (masks_hq if hq_token_only else masks_sam + masks_hq), iou_pred

    # -- forward ---------------------------------------------------------------------------

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
        hq_token_only: bool = False,
        *,
        interm_embeddings: tuple[jax.Array, ...] | None = None,
        hq_features: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Predicts one mask per prompt, as ``MaskDecoderHQ.forward``.

        Args:
          image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings: as
            :meth:`MaskDecoder.__call__` (B prompts; image rows B or 1).
          multimask_output, hq_token_only: static; see :meth:`select_hq`.
          interm_embeddings: the encoder's global-block outputs, each (B or 1, H, W, C_vit); only
            the first is used. Or give ``hq_features`` (B or 1, 4H, 4W, C/8) computed beforehand.

        Returns:
          masks (B, 1, 4H, 4W) logits and iou_pred (B, 1).
        """
        if (interm_embeddings is None) == (hq_features is None):
            raise ValueError("give exactly one of interm_embeddings and hq_features")
        if hq_features is None:
            hq_features = self.hq_features(image_embeddings, interm_embeddings[0])
        which = slice(None) if multimask_output else slice(0, 1)  # one mask: only token 0's is computed
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, hq_features, which
        )
        return self.select_hq(masks, iou_pred, multimask_output, hq_token_only)
