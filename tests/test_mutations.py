"""The mutation table's plumbing (the table itself runs in CI: ``python -m tests.mutations``, minutes long).

Each mutation must still find the code it plants into (a renamed function would silently plant nothing) and the
tests meant to catch it, and leave everything as it was once undone.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests import mutations

ROOT = Path(__file__).resolve().parent.parent


def _watched():
    """Everything a planting may replace, by identity: module attributes, class attributes, code objects."""
    from convert import keymap
    from pisam_jax import predictor, transforms
    from pisam_jax.modeling import common, deformable_conv, image_encoder, interactor, mask_decoder, pi_decoder
    from pisam_jax.ops import deform_conv

    return {
        "image_encoder.LayerNorm2d": lambda: image_encoder.LayerNorm2d,
        "mask_decoder.LayerNorm2d": lambda: mask_decoder.LayerNorm2d,
        "interactor.LayerNorm2d": lambda: interactor.LayerNorm2d,
        "MaskDecoderPi.__init__": lambda: pi_decoder.MaskDecoderPi.__init__,
        "gelu code": lambda: common.gelu.__code__,
        "DeformableConv2d.__call__": lambda: deformable_conv.DeformableConv2d.__call__,
        "deform_conv.jnp": lambda: deform_conv.jnp,
        "transforms.postprocess_masks": lambda: transforms.postprocess_masks,
        "image_encoder.interpolate_linear": lambda: image_encoder.interpolate_linear,
        "Predictor._click_arrays": lambda: predictor.Predictor._click_arrays,
        "PointInteract.click_tokens": lambda: interactor.PointInteract.click_tokens,
        "transformer.math": lambda: importlib.import_module("pisam_jax.modeling.transformer").math,
        "interactor.math": lambda: interactor.math,
        "image_encoder.Attention.__init__": lambda: image_encoder.Attention.__init__,
        "ConvTranspose2x2 rule": lambda: keymap._RULES[(common.ConvTranspose2x2, "kernel")],
    }


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_planting_changes_the_code_and_undoing_restores_it(mutation):
    watched = _watched()
    before = {k: get() for k, get in watched.items()}
    mp = pytest.MonkeyPatch()
    try:
        mutation.plant(mp)  # raises if what it plants into has gone
        changed = [k for k, get in watched.items() if get() is not before[k]]
        assert changed, f"{mutation.name} planted nothing that the table watches"
    finally:
        mp.undo()
    assert [k for k, get in watched.items() if get() is not before[k]] == []


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_the_catching_tests_exist(mutation):
    for node in mutation.tests:
        path, _, name = node.partition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert (ROOT / path).is_file() and callable(getattr(module, name.split("[")[0], None)), node


def test_unknown_mutation_is_a_usage_error(capsys):
    assert mutations.main(["no_such_mutation"]) == 2
    assert "unknown mutation" in capsys.readouterr().err
