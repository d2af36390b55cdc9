"""The mutation table: plant a classic porting mistake, run the parity tests that guard it, show that one fails.

    python -m tests.mutations                   # every mutation, then the table (several minutes on 2 cores)
    python -m tests.mutations gelu_tanh ...     # some of them
    python -m tests.mutations --list

Each mutation runs in its own pytest process with this module as a plugin (``-p tests.mutations``): the mistake is
planted with ``pytest.MonkeyPatch`` at ``pytest_configure``, before any test module is imported or any model is
built, and never on disk. A control run of the same tests without a mutation must pass first, so each failure is
the mutation's doing. The exit status is 1 if the control fails or a mutation survives.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ENV_MUTATION = "PISAM_MUTATION"
ENV_REPORT = "PISAM_MUTATION_REPORT"
ROOT = Path(__file__).resolve().parent.parent


class _Override:
    """A stand-in for a module (``jnp``, ``math``) in one of our modules' globals: some attributes replaced."""

    def __init__(self, base, **replaced):
        self._base, self._replaced = base, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._base, name)


def _layer_norm_2d_eps_1e5(dim, *, rngs):
    from pisam_jax.modeling.common import LayerNorm

    return LayerNorm(dim, eps=1e-5, rngs=rngs)


# -- the plantings: each takes a pytest.MonkeyPatch ------------------------------------------------------------


def _ln2d_eps_in(module_name: str) -> Callable:
    def plant(mp):
        mp.setattr(f"pisam_jax.modeling.{module_name}.LayerNorm2d", _layer_norm_2d_eps_1e5)

    return plant


def _ln2d_eps_hr_head(mp):
    """The HR head's three LayerNorm2ds (output_upscaling_2[1], out_act[0], out_act[2]): its functional forward
    (``_layer_norm``) reads their epsilon, so setting it is planting it in the code that runs."""
    from pisam_jax.modeling import pi_decoder

    init = pi_decoder.MaskDecoderPi.__init__

    def mutated(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for ln in (self.output_upscaling_2[1], self.out_act[0], self.out_act[2]):
            ln.epsilon = 1e-5

    mp.setattr(pi_decoder.MaskDecoderPi, "__init__", mutated)


def _gelu_tanh(mp):
    """Every GELU of the models is ``common.gelu`` (imported by name, and a default argument): swap its code."""
    from pisam_jax.modeling import common

    def tanh_gelu(x):
        import jax  # (the code runs with common's globals: bind jax here)

        return jax.nn.gelu(x, approximate=True)

    mp.setattr(common.gelu, "__code__", tanh_gelu.__code__)


def _dcn_sigmoid(mp):
    import jax

    from pisam_jax.modeling.deformable_conv import DeformableConv2d
    from pisam_jax.ops.deform_conv import deform_conv2d

    def call(self, x):
        mask = jax.nn.sigmoid(self.modulator_conv(x))  # the mistake: sigmoid, not 2 * sigmoid
        bias = self.regular_conv.bias[...] if self.regular_conv.bias is not None else None
        return deform_conv2d(x, self.offset_conv(x), mask, self.regular_conv.kernel[...], bias,
                             stride=self.stride, padding=self.padding)

    mp.setattr(DeformableConv2d, "__call__", call)


def _dcn_corner_trunc(mp):
    """The bilinear cell's top-left corner by truncation toward zero (C's ``(int)``) instead of floor: wrong for
    samples in (-1, 0), the top and left border rows."""
    import jax.numpy as jnp

    from pisam_jax.ops import deform_conv

    mp.setattr(deform_conv, "jnp", _Override(jnp, floor=jnp.trunc))


def _mask_resize_align_corners(mp):
    """``postprocess_masks`` with align_corners=True resizes (corners mapped onto corners)."""
    import jax

    from pisam_jax import transforms

    def resize(x, shape):
        scales, shifts = [], []
        for n_in, n_out in zip(x.shape[-2:], shape[-2:]):
            s = (n_out - 1) / (n_in - 1)
            scales.append(s)
            shifts.append(0.5 * (1.0 - s))  # output o samples input o / s
        return jax.image.scale_and_translate(x, shape, (x.ndim - 2, x.ndim - 1), jax.numpy.asarray(scales),
                                             jax.numpy.asarray(shifts), "linear", antialias=False)

    def postprocess_masks(low_res, input_size, original_size, size=1024):
        lead = low_res.shape[:-2]
        x = resize(low_res, lead + (size, size))[..., : input_size[0], : input_size[1]]
        return resize(x, lead + tuple(original_size))

    mp.setattr(transforms, "postprocess_masks", postprocess_masks)


def _rel_pos_antialias(mp):
    """The relative-position table resized with ``jax.image.resize`` (which antialiases when shrinking)."""
    import jax

    def interpolate_linear(table, size):
        return jax.image.resize(table, (size, table.shape[1]), "linear")

    mp.setattr("pisam_jax.modeling.image_encoder.interpolate_linear", interpolate_linear)


def _click_centre_dropped(mp):
    """D3 dropped: a click at pixel (x, y) enters the model as (x, y) / size instead of (x + 0.5, y + 0.5) / size."""
    import numpy as np

    from pisam_jax.predictor import Predictor

    arrays = Predictor._click_arrays

    def mutated(self, per_box):
        points, labels = arrays(self, per_box)
        h, w = self.original_size
        half = 0.5 * np.array(self.input_size[::-1], np.float32) / np.array([w, h], np.float32) / self.image_size
        points[labels >= 0] -= half
        return points, labels

    mp.setattr(Predictor, "_click_arrays", mutated)


def _fg_bg_swapped(mp):
    from pisam_jax.modeling.interactor import PointInteract

    tokens = PointInteract.click_tokens
    mp.setattr(PointInteract, "click_tokens", lambda self, e, points, flags: tokens(self, e, points, 1 - flags))


def _attention_scale_in(module_name: str) -> Callable:
    """1/d instead of 1/sqrt(d): ``math.sqrt`` in that module's attention becomes the identity."""

    def plant(mp):
        mp.setattr(f"pisam_jax.modeling.{module_name}.math", _Override(math, sqrt=lambda d: d))

    return plant


def _attention_scale_vit(mp):
    from pisam_jax.modeling.image_encoder import Attention

    init = Attention.__init__

    def mutated(self, dim, num_heads=8, *args, **kwargs):
        init(self, dim, num_heads, *args, **kwargs)
        self.scale = 1.0 / (dim // num_heads)

    mp.setattr(Attention, "__init__", mutated)


def _conv_transpose_flipped(mp):
    """The converter's ConvTranspose2d layout with the kernel's spatial axes flipped (what flax's ConvTranspose
    needs, and our 2x2 block form must not get)."""
    from convert import keymap
    from pisam_jax.modeling.common import ConvTranspose2x2

    key = (ConvTranspose2x2, "kernel")
    mp.setitem(keymap._RULES, key, ("weight", lambda w: w.transpose(0, 2, 3, 1)[:, ::-1, ::-1, :]))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    mistake: str
    plant: Callable
    tests: tuple[str, ...]  # pytest node ids (or files) that should catch it


PI = "tests/test_pi_decoder.py"
MUTATIONS = [
    Mutation("ln2d_eps_neck", "LayerNorm2d eps 1e-6 -> 1e-5 in the image-encoder neck", _ln2d_eps_in("image_encoder"),
             ("tests/test_image_encoder.py::test_encoder_small_no_padding",)),
    Mutation("ln2d_eps_mask_decoder", "LayerNorm2d eps 1e-6 -> 1e-5 in the mask decoder (output_upscaling)",
             _ln2d_eps_in("mask_decoder"), ("tests/test_mask_decoder.py::test_decoder_one_image_per_prompt",)),
    Mutation("ln2d_eps_hr_head", "LayerNorm2d eps 1e-6 -> 1e-5 in Pi-SAM's HR head", _ln2d_eps_hr_head,
             (f"{PI}::test_head_matches_the_reference",)),
    Mutation("ln2d_eps_interactor", "LayerNorm2d eps 1e-6 -> 1e-5 in the interactor", _ln2d_eps_in("interactor"),
             ("tests/test_interactor.py::test_padding_changes_nothing",)),
    Mutation("gelu_tanh", "tanh-approximate GELU", _gelu_tanh,
             ("tests/test_image_encoder.py::test_block_matches_torch",)),
    Mutation("dcn_sigmoid", "DCN modulation sigmoid instead of 2 * sigmoid", _dcn_sigmoid,
             ("tests/test_deform_conv.py::test_module_matches_reference",)),
    Mutation("dcn_corner_trunc", "deformable-conv bilinear corner by truncation instead of floor", _dcn_corner_trunc,
             ("tests/test_deform_conv.py::test_op_matches_torchvision",)),
    Mutation("mask_resize_align_corners", "align_corners=True in the mask resize (postprocess_masks)",
             _mask_resize_align_corners, ("tests/test_sam_model.py::test_predictor_matches_sam_predictor",)),
    Mutation("rel_pos_antialias", "rel-pos table resized with jax.image.resize (antialiased)", _rel_pos_antialias,
             ("tests/test_image_encoder.py::test_interpolate_linear_matches_torch",
              "tests/test_image_encoder.py::test_encoder_rel_pos_interpolation")),
    Mutation("click_centre_dropped", "click pixel-centre shift (D3) dropped", _click_centre_dropped,
             (f"{PI}::test_predictor_refine_matches_the_reference_with_clicks",)),
    Mutation("fg_bg_swapped", "foreground/background click flags swapped", _fg_bg_swapped,
             ("tests/test_interactor.py::test_padding_changes_nothing",)),
    Mutation("attn_scale_two_way", "attention scale 1/d instead of 1/sqrt(d) (two-way transformer)",
             _attention_scale_in("transformer"),
             ("tests/test_transformer.py::test_attention_key_mask_equals_dropping_keys",)),
    Mutation("attn_scale_vit", "attention scale 1/d instead of 1/sqrt(d) (ViT)", _attention_scale_vit,
             ("tests/test_image_encoder.py::test_attention_matches_torch",)),
    Mutation("attn_scale_interactor", "attention scale 1/d instead of 1/sqrt(d) (interactor)",
             _attention_scale_in("interactor"), ("tests/test_interactor.py::test_padding_changes_nothing",)),
    Mutation("conv_transpose_flipped", "transposed-conv kernel flipped (converter layout)", _conv_transpose_flipped,
             ("tests/test_mask_decoder.py::test_decoder_one_image_per_prompt",)),
]
BY_NAME = {m.name: m for m in MUTATIONS}


# -- the pytest plugin -----------------------------------------------------------------------------------------

_monkeypatch: pytest.MonkeyPatch | None = None
_failures: list[dict] = []


def pytest_configure(config):
    global _monkeypatch
    name = os.environ.get(ENV_MUTATION)
    if name:
        _monkeypatch = pytest.MonkeyPatch()
        BY_NAME[name].plant(_monkeypatch)


def pytest_runtest_logreport(report):
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        _failures.append(dict(test=report.nodeid, when=report.when, error=lines[0] if lines else "(no message)"))


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(ENV_REPORT)
    if path:
        Path(path).write_text(json.dumps(dict(exitstatus=int(exitstatus), failures=_failures)))
    if _monkeypatch is not None:
        _monkeypatch.undo()


# -- the runner ------------------------------------------------------------------------------------------------


def _run(tests, mutation: str | None, stop_first: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, ENV_REPORT: str(report), "JAX_PLATFORMS": "cpu"}
        env.pop(ENV_MUTATION, None)
        if mutation:
            env[ENV_MUTATION] = mutation
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.mutations", "-p", "no:cacheprovider",
               *(["-x"] if stop_first else []), *tests]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if not report.exists():
            raise RuntimeError(f"pytest did not run ({' '.join(cmd)}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return json.loads(report.read_text())


def _short(error: str, width: int = 110) -> str:
    error = error.removeprefix("AssertionError: ")
    return error if len(error) <= width else error[: width - 3] + "..."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, then exit")
    parser.add_argument("--no-control", action="store_true", help="skip the unmutated run of the same tests")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.mistake}\n{'':28} {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        print(f"error: unknown mutation(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [BY_NAME[n] for n in args.names] if args.names else MUTATIONS
    status = 0
    if not args.no_control:
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        start = time.time()
        control = _run(tests, None, stop_first=False)
        print(f"control (no mutation): {len(control['failures'])} failures in {time.time() - start:.0f} s", flush=True)
        if control["exitstatus"] != 0:
            for f in control["failures"]:
                print(f"  {f['test']}: {f['error']}")
            return 1
    rows = []
    for i, m in enumerate(chosen, 1):
        start = time.time()
        result = _run(m.tests, m.name, stop_first=True)
        caught = result["failures"][0] if result["failures"] else None
        print(f"[{i}/{len(chosen)}] {m.name}: {'caught by ' + caught['test'] if caught else 'NOT CAUGHT'} "
              f"({time.time() - start:.0f} s)", flush=True)
        rows.append((m.mistake, caught["test"].removeprefix("tests/") if caught else "NOT CAUGHT",
                     _short(caught["error"]) if caught else "-"))
        status |= caught is None
    print("\n| mutation | caught by | error seen |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return status


if __name__ == "__main__":
    sys.exit(main())
