"""Mixed precision: the compute dtype of a model's layers (float32, the default, or bfloat16).

Parameters stay float32 and are cast where they are used, so one checkpoint serves both dtypes and training
updates float32 weights. In bfloat16 the matrix products and convolutions take bfloat16 operands and accumulate
in float32; what needs the range or the resolution stays float32 (PISAM_SPEC's numerics, issue 15):

  * LayerNorm statistics and outputs (flax computes the statistics in float32; the output follows the float32
    scale and bias), hence the residual streams, the image embeddings and the encoder's intermediate outputs;
  * attention logits and softmax (the products accumulate in float32 and the softmax runs there; the
    probabilities meet the values in bfloat16);
  * positional encodings (sin/cos of random projections of coordinates) and the prompt embeddings;
  * the deformable convolution's offsets and modulation, its bilinear blend and its sum over the taps;
  * the output logits (masks, IoU predictions, the HR head's 1024^2 logits).

float32 (``dtype=None`` on every layer) is the code path of the parity tests, untouched by this module.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pisam_jax.modeling.common import ConvTranspose2x2

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def check_dtype(name) -> str:
    """A compute dtype's canonical name ("float32" or "bfloat16"); a ValueError names the choices otherwise."""
    key = jnp.dtype(name).name if name is not None and not isinstance(name, str) else (name or "float32")
    if key not in DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return key


def set_compute_dtype(module: nnx.Module, name) -> None:
    """Runs every matrix product and convolution under ``module`` in the compute dtype ``name``, in place.

    Sets ``dtype`` on the linear and convolution layers (flax's ``Linear`` and ``Conv``, our ``ConvTranspose2x2``);
    code that reads a layer's kernel itself casts with that layer's ``dtype``. The deformable convolutions'
    offset and modulator convs keep float32 outputs (``preferred_element_type``): sample positions need them.
    """
    from pisam_jax.modeling.deformable_conv import DeformableConv2d

    dtype = DTYPES[check_dtype(name)]
    for _, m in nnx.iter_modules(module):
        if isinstance(m, (nnx.Linear, nnx.Conv, ConvTranspose2x2)):
            m.dtype = dtype
        if isinstance(m, DeformableConv2d):
            for conv in (m.offset_conv, m.modulator_conv):
                conv.preferred_element_type = None if dtype is None else jnp.float32
