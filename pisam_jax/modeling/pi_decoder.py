"""Pi-SAM's High-Resolution Mask Decoder (the reference's ``MaskDecoderAE``, PISAM_SPEC.md section 3).

HQ-SAM's decoder (inherited: SAM's transformer with the extra HQ token, the HQ features) plus:

  * ``embedding_act``: LN2d -> 3x3 conv -> GELU on the HQ mask features, giving the mask feature M;
  * ``mask_aspp``, the Object Embedder: [M, 256^2 logits] -> 1x1/3x3 embedding X, two modulated deformable
    branches (3x3 and 7x7), concatenated with X and fused by a 1x1 conv into E (B, 256, 256, 32);
  * ``interact_2`` (stage 2 only): the Precise Interactor, E -> E' from clicks;
  * the HR conv head: ``output_upscaling_2`` (two 2x2 transposed convs, 256 -> 1024) plus the RGB embedding,
    then ``out_act`` (two 3x3 convs) -> 1024^2 logits;
  * ``rgb_embed``: two convs on the normalised 1024 image (D2: a decoder submodule here, trained in stage 1 and
    saved; converted reference checkpoints get the reference's seed-42 weights).

The forward is split by cost, so that clicks re-run only what they change:

    rgb_embedding(images)                                  once per image     (B, 1024, 1024, 8)
    hq_features(image_embeddings, vit_features)            once per image     (B, 256, 256, 32)
    base(image_embeddings, image_pe, sparse, dense, hq)    once per box       PiBase(E, hyper_in, low_res)
    refine(base, rgb, points, flags, pad_mask)             once per click set (B, 1, 1024, 1024) logits

NHWC inside; mask logits are channel-first (B, 1, h, w), SAM's output contract. The batch is the prompt axis
(one box per row), as in the reference.

The HR head runs on every click, so on XLA:CPU (``common.cpu_paths``) it has its own functional forward (the
modules only hold its parameters), where the plain layer-by-layer form spends most of its time on 1024^2 x 8
tensors: it runs in bands of output rows (see :meth:`MaskDecoderPi.head`), its LayerNorms take their means as
matrix-vector products and its last conv (8 -> 1) is one small matmul plus shifted sums. Same maths, fp32 rounding
differences only. Elsewhere the head is the plain layer-by-layer form, which XLA fuses whole.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pisam_jax.modeling import common
from pisam_jax.modeling.common import Conv2d, ConvTranspose2x2, LayerNorm2d, Sequential, cast, gelu
from pisam_jax.modeling.deformable_conv import DeformableConv2d
from pisam_jax.modeling.hq_decoder import MaskDecoderHQ
from pisam_jax.modeling.interactor import PointInteract

RGB_EMBED_DIM = 8

# On XLA:CPU the HR head runs in bands of this many output rows: a band's intermediates stay in cache and are
# reused, whereas whole-image ones are fresh 32 MiB buffers whose page faults cost as much as the maths.
HEAD_BAND_ROWS = 64


def _layer_norm(ln: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """``ln`` over the last axis with torch's maths (the mean, then the mean of squared deviations).

    Both means are matrix-vector products: XLA:CPU reduces a minor axis of 8 or 16 several times slower. Computed
    and returned in float32 (at least) whatever the input's dtype, as flax's LayerNorm.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    avg = jnp.full((x.shape[-1],), 1.0 / x.shape[-1], x.dtype)
    y = x - jnp.matmul(x, avg, precision="highest")[..., None]
    var = jnp.matmul(y * y, avg, precision="highest")[..., None]
    return y * (jax.lax.rsqrt(var + ln.epsilon) * ln.scale[...]) + ln.bias[...]


def _conv_band(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """A 3x3 ``conv`` (padding 1) on a band that carries its row above and below: (B, R + 2, W, Ci) -> (B, R, W, Co)."""
    y = jax.lax.conv_general_dilated(cast(x, conv.dtype), cast(conv.kernel[...], conv.dtype), (1, 1),
                                     ((0, 0), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + cast(conv.bias[...], conv.dtype)


def _conv_band_to_one(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """:func:`_conv_band` for a conv with one output channel: (B, R + 2, W, C) -> (B, R, W).

    XLA:CPU's convolution is slow with one output channel: instead one small matmul gives each of the 9 taps'
    contribution as a plane, and the planes are summed shifted. The output (logits) is float32.
    """
    _, r, w, c = x.shape
    kernel = cast(conv.kernel[...][..., 0].reshape(9, c), conv.dtype)
    taps = jnp.einsum("nhwc,tc->nthw", cast(x, conv.dtype), kernel, preferred_element_type=jnp.float32)  # t = 3dy+dx
    taps = jnp.pad(taps, ((0, 0), (0, 0), (0, 0), (1, 1)))
    out = sum(taps[:, 3 * dy + dx, dy:dy + r - 2, dx:dx + w] for dy in range(3) for dx in range(3))
    return out + conv.bias[...][0]


@dataclasses.dataclass
class PiBase:
    """What one box costs, cached so that clicks re-run only the interactor and the HR head.

    embedding: E, the Object Embedder's output (B, 256, 256, 32); hyper_in: the HQ token after ``hf_mlp``
    (B, 1, 32); low_res: the 256^2 HQ-token mask logits (B, 1, 256, 256).
    """

    embedding: jax.Array
    hyper_in: jax.Array
    low_res: jax.Array


jax.tree_util.register_dataclass(PiBase, data_fields=["embedding", "hyper_in", "low_res"], meta_fields=[])


class ASPPModule(nnx.Module):
    """One Object Embedder branch: ``atrous_conv`` = DeformableConv2d (no bias) -> LN2d -> GELU."""

    def __init__(self, dim: int, kernel_size: int, padding: int, *, rngs: nnx.Rngs):
        self.atrous_conv = Sequential(
            [
                DeformableConv2d(dim, dim, kernel_size, stride=1, padding=padding, use_bias=False, rngs=rngs),
                LayerNorm2d(dim, rngs=rngs),
                gelu,
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.atrous_conv(x)


class MaskASPPDeformable(nnx.Module):
    """The Object Embedder (spec 3.1 step D): (B, H, W, dim + 1) [M, logits] -> E (B, H, W, dim).

    ``deformable=False`` (an ablation, paper Table 5) keeps only the skip branch X: no deformable branches.
    """

    def __init__(self, dim: int = 32, *, deformable: bool = True, rngs: nnx.Rngs):
        self.mask_embedding = Sequential(
            [
                Conv2d(dim + 1, dim, 1, rngs=rngs),
                LayerNorm2d(dim, rngs=rngs),
                gelu,
                Conv2d(dim, dim, 3, padding=1, rngs=rngs),
                LayerNorm2d(dim, rngs=rngs),
                gelu,
            ]
        )
        self.aspp1 = ASPPModule(dim, 3, 1, rngs=rngs) if deformable else None
        self.aspp2 = ASPPModule(dim, 7, 3, rngs=rngs) if deformable else None
        branches = 3 if deformable else 1
        self.conv_out = Sequential(
            [Conv2d(branches * dim, dim, 1, use_bias=False, rngs=rngs), LayerNorm2d(dim, rngs=rngs), gelu]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.mask_embedding(x)  # X, the "skip" branch
        if self.aspp1 is None:
            return self.conv_out(x)
        return self.conv_out(jnp.concatenate([x, self.aspp1(x), self.aspp2(x)], axis=-1))


class MaskDecoderPi(MaskDecoderHQ):
    """Pi-SAM's decoder. ``vit_dim``: the ViT width; ``interactor``: whether ``interact_2`` exists (stage 2).

    Parameters mirror the reference's state_dict (spec appendix) plus ``rgb_embed.{0,1}`` (D2).

    Ablations (paper Table 5; the defaults are the published model): ``rgb_embedding=False``, no RGB embedding
    (the head sees only the upscaled E); ``deformable=False``, an Object Embedder without its deformable
    branches; ``high_res=False``, no Object Embedder, HR head nor RGB embedding: the output is the 256^2
    HQ-token mask, upsampled bilinearly to 1024^2.
    """

    def __init__(
        self,
        *,
        vit_dim: int,
        interactor: bool,
        rngs: nnx.Rngs,
        interactor_hw: int = 256,
        rgb_embedding: bool = True,
        deformable: bool = True,
        high_res: bool = True,
        **sam_decoder_kwargs,
    ):
        super().__init__(vit_dim=vit_dim, rngs=rngs, **sam_decoder_kwargs)
        if interactor and not high_res:
            raise ValueError("the Precise Interactor refines the Object Embedder's E: it needs high_res=True")
        d = self.transformer_dim // 8  # 32
        r = RGB_EMBED_DIM
        self.embedding_act = Sequential([LayerNorm2d(d, rngs=rngs), Conv2d(d, d, 3, padding=1, rngs=rngs), gelu])
        self.high_res = high_res
        if not high_res:
            self.rgb_embed = self.interact_2 = None
            return
        self.mask_aspp = MaskASPPDeformable(d, deformable=deformable, rngs=rngs)
        self.output_upscaling_2 = Sequential(
            [
                ConvTranspose2x2(d, d // 2, rngs=rngs),
                LayerNorm2d(d // 2, rngs=rngs),
                gelu,
                ConvTranspose2x2(d // 2, r, rngs=rngs),
            ]
        )
        self.out_act = Sequential(
            [
                LayerNorm2d(r, rngs=rngs),
                Conv2d(r, r, 3, padding=1, rngs=rngs),
                LayerNorm2d(r, rngs=rngs),
                gelu,
                Conv2d(r, 1, 3, padding=1, rngs=rngs),
            ]
        )
        self.rgb_embed = (
            Sequential([Conv2d(3, r, 1, rngs=rngs), Conv2d(r, r, 3, padding=1, rngs=rngs)]) if rgb_embedding else None
        )
        self.interact_2 = PointInteract(d, interactor_hw, rngs=rngs) if interactor else None

    @property
    def has_interactor(self) -> bool:
        return self.interact_2 is not None

    # -- per image -------------------------------------------------------------------------

    def rgb_embedding(self, images: jax.Array) -> jax.Array | None:
        """The normalised input image (B, 1024, 1024, 3) -> (B, 1024, 1024, 8). One linear map.

        None for a decoder without it (the ablations).
        """
        return None if self.rgb_embed is None else self.rgb_embed(images)

    # -- per box ---------------------------------------------------------------------------

    def base(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        hq_features: jax.Array,
    ) -> PiBase:
        """Steps B-D of spec 3.1: SAM's transformer with the HQ token, the mask feature M, the 256^2 logits,
        and the Object Embedder's E.

        image_embeddings (B or 1, 64, 64, 256), image_pe (1, 64, 64, 256), sparse (B, N, 256) (the box tokens),
        dense (B, 64, 64, 256), hq_features (B or 1, 256, 256, 32) from :meth:`hq_features`.
        """
        tokens = self._tokens(sparse_prompt_embeddings)
        hs, src = self._run_transformer(image_embeddings, image_pe, tokens, dense_prompt_embeddings)
        mask_feature = self.embedding_act(self.hq_mask_features(self._upscale(src), hq_features))
        hyper_in = self.hf_mlp(hs[:, 1 + self.num_mask_tokens])[:, None]  # the HQ token, (B, 1, 32)
        low_res = self._hyper_masks(hyper_in, mask_feature)  # (B, 1, 256, 256)
        if not self.high_res:
            return PiBase(None, hyper_in, low_res)
        # The logits enter the Object Embedder undetached (B14): stage 1's 1024^2 loss also trains the 256^2 path.
        x = jnp.concatenate([mask_feature, low_res.transpose(0, 2, 3, 1)], axis=-1)
        return PiBase(self.mask_aspp(x), hyper_in, low_res)

    # -- per click set ---------------------------------------------------------------------

    def head(self, embedding: jax.Array, rgb: jax.Array | None, *, banded: bool = True) -> jax.Array:
        """Step F: E (B, 256, 256, 32) and the RGB embedding (B or 1, 1024, 1024, 8) or None (the ablation without
        it) -> logits (B, 1, 1024, 1024).

        On CPU in bands of ``HEAD_BAND_ROWS`` output rows (with ``banded=False``, or when the height is not a
        multiple, one band). The two 3x3 convs need two more rows each side, so a band upscales one more row of E
        each side (4 output rows) and zeroes the rows that fall outside the image before each conv, as its zero
        padding would. Bands speed up the forward pass; differentiated, they are about 10x slower than one band on
        XLA:CPU, so training asks for one. Elsewhere the plain layers (:meth:`_head_layers`).
        """
        if not common.cpu_paths():
            return self._head_layers(embedding, rgb)
        b, h, w, _ = embedding.shape
        height = 4 * h
        band = HEAD_BAND_ROWS if banded and height % HEAD_BAND_ROWS == 0 else height
        ln1, conv1, ln2, _, conv2 = self.out_act
        padded = jnp.pad(embedding, ((0, 0), (1, 1), (0, 0), (0, 0)))

        def rows(i):  # -> logits rows [i * band, (i + 1) * band), (B, band, 4w)
            e = jax.lax.dynamic_slice_in_dim(padded, i * (band // 4), band // 4 + 2, axis=1)
            y = i * band - 2 + jnp.arange(band + 4)  # the image rows of x
            x = self._hr_upscale(e)[:, 2:-2]
            if rgb is not None:
                x = x + jnp.take(rgb, jnp.clip(y, 0, height - 1), axis=1)
            inside = ((y >= 0) & (y < height))[:, None, None]
            x = _conv_band(conv1, jnp.where(inside, _layer_norm(ln1, x), 0.0))
            x = jnp.where(inside[1:-1], gelu(_layer_norm(ln2, x)), 0.0)
            return _conv_band_to_one(conv2, x)

        out = rows(0)[None] if band == height else jax.lax.map(rows, jnp.arange(height // band))
        return out.transpose(1, 0, 2, 3).reshape(b, 1, height, 4 * w)

    def _head_layers(self, embedding: jax.Array, rgb: jax.Array | None) -> jax.Array:
        """:meth:`head` as the reference computes it, layer by layer: (B, h, w, 32) -> (B, 1, 4h, 4w) float32."""
        x = self.output_upscaling_2(embedding)
        if rgb is not None:
            x = x + rgb
        ln1, conv1, ln2, _, conv2 = self.out_act
        x = gelu(ln2(conv1(ln1(x))))
        y = jax.lax.conv_general_dilated(cast(x, conv2.dtype), cast(conv2.kernel[...], conv2.dtype), (1, 1),
                                         ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         preferred_element_type=jnp.float32)
        return (y + conv2.bias[...])[..., 0][:, None]

    def _hr_upscale(self, embedding: jax.Array) -> jax.Array:
        """``output_upscaling_2``: (B, h, w, 32) -> (B, 4h, 4w, 8).

        Everything up to the last transposed conv is per E pixel, and each E pixel owns a 4x4 block of the output:
        two plain matmuls, then one interleave of the blocks.
        """
        t1, ln, _, t2 = self.output_upscaling_2
        b, h, w, c = embedding.shape
        c1, c2 = t1.kernel.shape[-1], t2.kernel.shape[-1]
        y = cast(embedding.reshape(-1, c), t1.dtype) @ cast(t1.kernel[...].reshape(c, -1), t1.dtype)  # (Bhw, a1 b1 c1)
        y = gelu(_layer_norm(ln, y.reshape(-1, c1) + cast(t1.bias[...], t1.dtype)))
        y = cast(y, t2.dtype) @ cast(t2.kernel[...].reshape(c1, -1), t2.dtype)
        y = y.reshape(b, h, w, 2, 2, 2, 2, c2)  # (..., a1, b1, a2, b2, c2)
        # Output pixel (4i + 2 a1 + a2, 4j + 2 b1 + b2).
        y = y.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, 4 * h, 4 * w, c2)
        return y + cast(t2.bias[...], t2.dtype)

    def refine(
        self,
        base: PiBase,
        rgb: jax.Array,
        points: jax.Array | None = None,
        flags: jax.Array | None = None,
        pad_mask: jax.Array | None = None,
        *,
        banded: bool = True,
    ) -> jax.Array:
        """The interactor (when ``points`` is given) then the HR head: -> 1024^2 logits (B, 1, 1024, 1024).

        points (B, P, 2): clicks as (x, y) normalised with pixel centres (D3); flags (B, P): 1 foreground,
        0 background; pad_mask (B, P): True for padded slots (masked everywhere, D5) or None. ``banded``: see
        :meth:`head` (False when differentiated).
        The interactor always starts from the box's E, never from a previous refinement (spec 6).
        """
        if not self.high_res:  # the ablation: SAM-style upsampling of the 256^2 mask
            b, _, h, w = base.low_res.shape
            return jax.image.resize(base.low_res, (b, 1, 4 * h, 4 * w), "linear", antialias=False)
        embedding = base.embedding
        if points is not None and points.shape[1] > 0:
            if self.interact_2 is None:
                raise ValueError("clicks need a stage-2 Pi-SAM decoder (one with interact_2); this one has none")
            if flags is None:
                raise ValueError("points need flags (1 = foreground, 0 = background)")
            embedding = self.interact_2(embedding, base.hyper_in, points, flags, pad_mask)
        return self.head(embedding, rgb, banded=banded)

    # -- forward ---------------------------------------------------------------------------

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        *,
        rgb: jax.Array,
        interm_embeddings: tuple[jax.Array, ...] | None = None,
        hq_features: jax.Array | None = None,
        points: jax.Array | None = None,
        flags: jax.Array | None = None,
        pad_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """The reference's forward: -> (pred_masks (B, 1, 256, 256), pred_masks_large (B, 1, 1024, 1024)) logits.

        rgb: :meth:`rgb_embedding` of the image (B or 1, 1024, 1024, 8). Give ``interm_embeddings`` (the
        encoder's global-block outputs; the first is used) or precomputed ``hq_features``. Clicks as
        :meth:`refine`; without them the interactor does not run (the reference's ``interactive=False``).
        """
        if (interm_embeddings is None) == (hq_features is None):
            raise ValueError("give exactly one of interm_embeddings and hq_features")
        if hq_features is None:
            hq_features = self.hq_features(image_embeddings, interm_embeddings[0])
        base = self.base(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, hq_features)
        return base.low_res, self.refine(base, rgb, points, flags, pad_mask)
