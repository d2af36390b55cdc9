"""What trains: one predicate over parameter paths (PISAM_SPEC.md 1, 3.3, 5.4, D2, D4).

Stage 1 (HR Mask Decoder) trains every new Pi-SAM decoder module except the interactor; stage 2 (Precise
Interactor) trains only ``mask_decoder.interact_2``. SAM (image encoder, prompt encoder, SAM's own mask decoder
layers) never trains, and neither does anything that is not an ``nnx.Param``: ``Buffer`` variables (the interactor's
``img_pe``, its PE Gaussian matrix and Laplacian kernel) are frozen by type.

The filter works wherever Flax takes one:

    trainable = trainable_filter(stage=1)
    graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

# Modules directly under the decoder that each stage trains (spec 3.3; ``rgb_embed`` per D2).
STAGE_MODULES: dict[int, tuple[str, ...]] = {
    1: (
        "hf_token",
        "hf_mlp",
        "compress_vit_feat",
        "embedding_encoder",
        "embedding_maskfeature",
        "embedding_act",
        "mask_aspp",
        "output_upscaling_2",
        "out_act",
        "rgb_embed",
    ),
    2: ("interact_2",),
}

DECODER_PATH = ("mask_decoder",)


def trainable_filter(stage: int, *, root: Sequence[str] = DECODER_PATH) -> nnx.filterlib.Filter:
    """The nnx filter selecting the ``nnx.Param`` variables that train in ``stage`` (1 or 2).

    ``root``: the path of the decoder inside the model: ``("mask_decoder",)`` for the whole ``Sam`` model,
    ``()`` when the filter is applied to the decoder itself. A parameter trains when its path is
    ``root + (module, ...)`` with ``module`` in ``STAGE_MODULES[stage]``.
    """
    if stage not in STAGE_MODULES:
        raise ValueError(f"stage must be 1 (HR mask decoder) or 2 (precise interactor), got {stage!r}")
    root = tuple(root)
    modules = frozenset(STAGE_MODULES[stage])
    n = len(root)

    def in_stage(path: tuple, _value) -> bool:
        return len(path) > n and tuple(path[:n]) == root and path[n] in modules

    return nnx.All(nnx.Param, in_stage)


def param_counts(model: nnx.Module, filter_: nnx.filterlib.Filter = nnx.Param, *, depth: int = 2) -> dict[str, int]:
    """Number of parameters selected by ``filter_``, grouped by the first ``depth`` path components.

    Returns an insertion-ordered {"mask_decoder.hf_mlp": 139808, ...} plus a "total" entry.
    """
    state = nnx.state(model, filter_)
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        keys = tuple(_key_name(k) for k in path)
        keys = tuple(k for k in keys if k != "value")
        group = ".".join(keys[:depth])
        counts[group] = counts.get(group, 0) + int(np.prod(np.shape(leaf)))
    counts["total"] = sum(counts.values())
    return counts


def format_counts(counts: dict[str, int]) -> str:
    """A small aligned table of ``param_counts`` for logs."""
    width = max(len(k) for k in counts)
    return "\n".join(f"{k:<{width}}  {v:>12,}" for k, v in counts.items())


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
