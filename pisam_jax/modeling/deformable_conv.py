"""Pi-SAM's ``DeformableConv2d`` (modulated DCN v2), used by the Object Embedder (PISAM_SPEC section 3.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pisam_jax.modeling.common import Conv2d, cast
from pisam_jax.ops.deform_conv import deform_conv2d


class DeformableConv2d(nnx.Module):
    """Modulated deformable convolution with offsets and modulation predicted from the input.

    Mirrors the reference's module tree (torch keys ``offset_conv.weight/bias``, ``modulator_conv.weight/bias``,
    ``regular_conv.weight`` and ``regular_conv.bias`` only with ``use_bias``). The offset and modulator convs
    start at zero, so the offsets are 0 and the modulation 2*sigmoid(0) = 1: at init the layer is the plain
    convolution ``regular_conv``. (B, H, W, in_channels) -> (B, Ho, Wo, out_channels).

    In a bfloat16 model (``modeling/precision.py``) the samples and ``regular_conv``'s kernel are bfloat16, the
    offsets and modulation float32, the blend and the sum over taps and channels float32.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        taps = kernel_size * kernel_size
        self.stride = stride
        self.padding = padding
        # Same kernel, stride and padding as the regular conv, so they predict one offset per output pixel.
        self.offset_conv = Conv2d(in_channels, 2 * taps, kernel_size, stride=stride, padding=padding, rngs=rngs)
        self.modulator_conv = Conv2d(in_channels, taps, kernel_size, stride=stride, padding=padding, rngs=rngs)
        for conv in (self.offset_conv, self.modulator_conv):
            conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
            conv.bias[...] = jnp.zeros_like(conv.bias[...])
        self.regular_conv = Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, use_bias=use_bias, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        offset = self.offset_conv(x)  # (B, Ho, Wo, 2*k*k), torchvision's [tap][dy, dx] order
        mask = 2.0 * jax.nn.sigmoid(self.modulator_conv(x))  # (B, Ho, Wo, k*k)
        dtype = self.regular_conv.dtype
        bias = cast(self.regular_conv.bias[...], dtype) if self.regular_conv.bias is not None else None
        return deform_conv2d(
            cast(x, dtype),
            offset,
            mask,
            cast(self.regular_conv.kernel[...], dtype),
            bias,
            stride=self.stride,
            padding=self.padding,
        )
