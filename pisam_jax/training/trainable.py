"""What trains: one predicate over parameter paths (PISAM_SPEC.md 1, 3.3, 5.4, D2, D4).

A stage trains the ``nnx.Param`` variables under a few module paths of the model (dotted, as the module tree:
``"mask_decoder.hf_token"``, ``"image_encoder"``); everything else is frozen. Anything that is not an
``nnx.Param`` never trains: ``Buffer`` variables (the interactor's ``img_pe``, its PE Gaussian matrix and
Laplacian kernel) are frozen by type.

  * SAM: its own modules; from scratch all three, fine-tuning a converted SAM its mask decoder (or all);
  * HQ-SAM (its paper's recipe): the HQ token, its MLP and the feature-fusion layers;
  * Pi-SAM stage 1 (HR Mask Decoder): every new decoder module except the interactor, with the RGB embedding (D2);
  * Pi-SAM stage 2 (Precise Interactor): only ``interact_2``.

The filter works wherever Flax takes one:

    trainable = trainable_filter(TRAINABLE["stage1"])
    graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

_HQ = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
# Pi-SAM's new decoder modules (spec 3.3) besides HQ-SAM's, with ``rgb_embed`` (D2).
_PI = ("embedding_act", "mask_aspp", "output_upscaling_2", "out_act", "rgb_embed")

SAM_MODULES = ("image_encoder", "prompt_encoder", "mask_decoder")
TRAINABLE: dict[str, tuple[str, ...]] = {
    "sam": SAM_MODULES,
    "hq": tuple(f"mask_decoder.{m}" for m in _HQ),
    "stage1": tuple(f"mask_decoder.{m}" for m in _HQ + _PI),
    "stage2": ("mask_decoder.interact_2",),
}


def trainable_filter(modules: Sequence[str]) -> nnx.filterlib.Filter:
    """The nnx filter selecting the ``nnx.Param`` variables under any of ``modules`` (dotted module paths).

    A path names a module of the model (``"mask_decoder.interact_2"``) or, for a filter applied to a submodule,
    of that submodule (``"interact_2"`` on the decoder).
    """
    if isinstance(modules, str) or not modules:
        raise ValueError(f"modules must be a non-empty sequence of dotted module paths, got {modules!r}")
    prefixes = tuple(tuple(m.split(".")) for m in modules)

    def under(path: tuple, _value) -> bool:
        names = tuple(str(p) for p in path)
        return any(names[: len(p)] == p for p in prefixes)

    return nnx.All(nnx.Param, under)


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
