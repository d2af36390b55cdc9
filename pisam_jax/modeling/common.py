"""Building blocks shared by every model family, with PyTorch's default initialisation.

Conventions (see DESIGN.md):
  * NHWC everywhere inside the model.
  * Attribute names mirror the PyTorch module tree, so a torch key such as
    ``mask_decoder.output_upscaling.3.weight`` is the nnx path
    ``('mask_decoder', 'output_upscaling', 3, 'kernel')``; the converter
    (``convert/keymap.py``) derives keys from paths and owns every transpose.
  * ``Sequential`` keeps torch's indexing: activations occupy a slot, exactly as
    in ``torch.nn.Sequential``.
  * New (trainable) layers are initialised as PyTorch initialises them, so a
    freshly built model has the statistics of the reference at step 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


# Which code paths run where they differ: "cpu", written for XLA:CPU (work in cache-sized bands and sequential
# steps), or "accelerator" (whole arrays, fused kernels: cuDNN attention, all taps of a deformable conv at once).
# None picks by the default backend; the tests set "accelerator" to check those paths on the CPU.
CODE_PATHS: str | None = None


def cpu_paths() -> bool:
    """Whether the XLA:CPU code paths run (``CODE_PATHS``)."""
    if CODE_PATHS is not None:
        return CODE_PATHS == "cpu"
    return jax.default_backend() == "cpu"


def cast(x: jax.Array, dtype) -> jax.Array:
    """``x`` in a layer's compute dtype; None (the fp32 default) leaves it as it is (``modeling/precision.py``)."""
    return x if dtype is None else x.astype(dtype)


def gelu(x: jax.Array) -> jax.Array:
    """``torch.nn.GELU()``, the exact GELU, in torch's form x (1 + erf(x / sqrt 2)) / 2.

    Not ``jax.nn.gelu(approximate=False)``: its erfc form runs ~2.5x slower on XLA:CPU (same values to rounding).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


relu = jax.nn.relu


def torch_uniform(bound: float):
    """U(-bound, bound): PyTorch's default for Linear/Conv weights (kaiming_uniform a=sqrt(5)) and biases."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Buffer(nnx.Variable):
    """A saved, never-trained tensor (torch ``register_buffer`` or ``requires_grad=False``)."""


class Sequential(nnx.List):
    """``torch.nn.Sequential``: applies its items in order; indices match torch's state_dict keys."""

    def __call__(self, x):
        for layer in self:
            x = layer(x)
        return x


def Linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    """``torch.nn.Linear``; kernel (in, out)."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=torch_uniform(bound),
        bias_init=torch_uniform(bound),
        rngs=rngs,
    )


def Conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
) -> nnx.Conv:
    """``torch.nn.Conv2d`` on NHWC input; kernel (kh, kw, in, out)."""
    bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        kernel_init=torch_uniform(bound),
        bias_init=torch_uniform(bound),
        rngs=rngs,
    )


def LayerNorm(dim: int, eps: float = 1e-5, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """``torch.nn.LayerNorm`` over the last axis (eps 1e-5 by default, as torch).

    Variance as torch computes it, mean first: Flax's fast E[x^2] - E[x]^2 loses precision
    when the mean is large next to the spread (measured: 2e-2 error on a 2-channel LayerNorm2d).
    """
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def LayerNorm2d(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """SAM's ``LayerNorm2d``: normalises over channels, eps 1e-6. In NHWC that is a LayerNorm on the last axis."""
    return LayerNorm(dim, eps=1e-6, rngs=rngs)


class ConvTranspose2x2(nnx.Module):
    """``torch.nn.ConvTranspose2d(in, out, kernel_size=2, stride=2)``: each input pixel writes a 2x2 block.

    kernel (in, 2, 2, out): the torch weight (in, out, kh, kw) with axes (0, 2, 3, 1).
    (B, H, W, in) -> (B, 2H, 2W, out). ``dtype``: the compute dtype, as ``nnx.Conv``'s.
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        # torch's fan_in for ConvTranspose2d is weight.size(1) * kh * kw = out * 4.
        init = torch_uniform(1.0 / math.sqrt(out_channels * 4))
        self.kernel = nnx.Param(init(rngs.params(), (in_channels, 2, 2, out_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,)))
        self.dtype = None

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwi,iabo->nhawbo", cast(x, self.dtype), cast(self.kernel[...], self.dtype))
        return y.reshape(n, 2 * h, 2 * w, -1) + cast(self.bias[...], self.dtype)


class MLPBlock(nnx.Module):
    """SAM's ``MLPBlock``: ``lin2(act(lin1(x)))``; GELU (exact) as torch's default."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act=gelu, *, rngs: nnx.Rngs):
        self.lin1 = Linear(embedding_dim, mlp_dim, rngs=rngs)
        self.lin2 = Linear(mlp_dim, embedding_dim, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nnx.Module):
    """SAM's ``MLP``: ``num_layers`` Linear layers with ReLU between them, optional sigmoid on the output."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        *,
        rngs: nnx.Rngs,
        sigmoid_output: bool = False,
    ):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List(Linear(i, o, rngs=rngs) for i, o in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = relu(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x
