"""How our fp32 results are judged against a PyTorch reference.

The bound of a parity test is what fp32 can do for that computation, measured on the computation itself: the
reference runs twice, in float32 (what a user of the reference gets) and in float64 (the exact values, to fp32's
eyes), and ours must be about as close to the exact values as the reference's own fp32 result is:

    max |ours - exact| <= FACTOR * max |reference - exact|     (the worst element)
    rms (ours - exact) <= FACTOR * rms (reference - exact)     (every element: systematic errors show here)

Everything that makes fp32 inaccurate for this particular computation (sin/cos of large arguments, long
accumulations, softmax of large logits, LayerNorms of near-constant inputs, cancellation) enlarges both sides
alike, on whatever CPU, math library or ISA path the test runs: the bound is derived from the arithmetic at run
time instead of being one machine's measurement. Two correct fp32 implementations of the same maths land at
about the same distance from the exact values: over this suite's ~320 comparisons on AMD EPYC, ours / the
reference has median 1.00 and is at most 2.0 (under XLA's and torch's AVX-512, AVX2 and SSE4.2 paths alike; the
one exception, 3.1, is explained where it occurs), and it is far below 1 where torch's fp32 is the weaker, e.g.
its conv backward summing 131072 pixels in order. So FACTOR = 4 is sharp: a porting mistake that moves the output
by a few times fp32's own error fails, e.g. a LayerNorm epsilon, a GELU form or a pixel-centre shift (``python -m
tests.mutations`` plants them one by one; each is caught at 80 to 500000 times the bound).

Outputs of a handful of values (IoU scores, losses) are too small a sample for the reference's error to be a
scale: their floor counts the roundings of the last reduction (``roundings``). Rows whose float64 reference is too
costly are held to a sibling row's scale (:func:`assert_near`). Comparisons with no reference at all (ours against
ours) use :func:`assert_close` with a bound derived in a comment at the call.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

U = 2.0**-24  # fp32 unit roundoff: round-to-nearest moves a value x by at most U * |x|
FACTOR = 4.0


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


def _summary(name: str, measured: float, bound: float, what: str) -> str:
    times = f" ({measured / bound:.1f}x the bound)" if bound else ""
    return f"{name}: {what} {measured:.3e} > bound {bound:.3e}{times}"


def assert_as_accurate(name: str, ours, reference, exact, *, factor: float = FACTOR, roundings: float = 1.0) -> dict:
    """Asserts that ``ours`` is within ``factor`` of the fp32 reference's own error, in max and in RMS.

    ours, reference: fp32 results of the same computation; exact: the reference evaluated in float64.
    Each error scale is at least ``roundings`` fp32 roundings of the result (U * max|exact| for the max,
    U * rms(exact) for the RMS): 1, storing it, by default. Outputs of a handful of values (IoU scores, a loss)
    are too small a sample for the reference's error to be a scale by itself; there the caller counts the
    roundings of the last reduction: ~sqrt(n) for n terms accumulated in order (random-sign errors), ~log2(n) for
    a pairwise or tree sum. Prints the errors; returns them.
    """
    ours, reference, exact = (np.asarray(a, np.float64) for a in (ours, reference, exact))
    assert ours.shape == reference.shape == exact.shape, (
        f"{name}: shapes ours {ours.shape}, reference {reference.shape}, exact {exact.shape}")
    assert np.isfinite(ours).all(), f"{name}: ours has non-finite values"
    floor_max, floor_rms = roundings * U * float(np.abs(exact).max(initial=0.0)), roundings * U * _rms(exact)
    ours_err, ref_err = np.abs(ours - exact), np.abs(reference - exact)
    e = dict(ours_max=float(ours_err.max(initial=0.0)), ref_max=float(ref_err.max(initial=0.0)),
             ours_rms=_rms(ours_err), ref_rms=_rms(ref_err),
             vs_reference=float(np.abs(ours - reference).max(initial=0.0)))
    scale_max, scale_rms = max(e["ref_max"], floor_max), max(e["ref_rms"], floor_rms)
    e.update(scale_max=scale_max, scale_rms=scale_rms)
    ratio = lambda err, scale: f"{err / scale:.2f}" if scale else "-"  # noqa: E731
    print(f"{name}: from exact: ours max {e['ours_max']:.2e} rms {e['ours_rms']:.2e}, reference fp32 max "
          f"{e['ref_max']:.2e} rms {e['ref_rms']:.2e} (ratios {ratio(e['ours_max'], scale_max)}, "
          f"{ratio(e['ours_rms'], scale_rms)}); |ours - reference| max {e['vs_reference']:.2e}")
    bound_max, bound_rms = factor * scale_max, factor * scale_rms
    assert e["ours_max"] <= bound_max, _summary(name, e["ours_max"], bound_max, "max |ours - exact|")
    assert e["ours_rms"] <= bound_rms, _summary(name, e["ours_rms"], bound_rms, "rms (ours - exact)")
    return e


def assert_near(name: str, ours, reference, errors: dict, *, factor: float = FACTOR) -> None:
    """Asserts |ours - reference| within what :func:`assert_as_accurate` allows, for another input of the same
    computation whose float64 reference is too costly to run: ``errors`` are that function's measurements on a
    sibling input (same model, another box or image), and (factor + 1) times its error scale bounds the distance
    between two results that are each within it of the exact values (max and RMS)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"{name}: shape {ours.shape} vs reference {reference.shape}"
    assert np.isfinite(ours).all(), f"{name}: ours has non-finite values"
    diff = np.abs(ours - reference)
    bound_max, bound_rms = (factor + 1) * errors["scale_max"], (factor + 1) * errors["scale_rms"]
    print(f"{name}: |ours - reference| max {diff.max(initial=0.0):.2e} rms {_rms(diff):.2e} (bounds {bound_max:.2e}, "
          f"{bound_rms:.2e}, from the sibling's errors)")
    assert diff.max(initial=0.0) <= bound_max, _summary(name, float(diff.max()), bound_max, "max |ours - reference|")
    assert _rms(diff) <= bound_rms, _summary(name, _rms(diff), bound_rms, "rms (ours - reference)")


def assert_close(name: str, ours, reference, *, rtol: float, atol) -> None:
    """Elementwise |ours - reference| <= atol + rtol * |reference|; the caller derives atol (a number, or an array
    of per-element bounds) and rtol."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"{name}: shape {ours.shape} vs reference {reference.shape}"
    err = np.abs(ours - reference)
    allowed = np.broadcast_to(atol + rtol * np.abs(reference), err.shape)
    worst = int(np.argmax(err / np.maximum(allowed, 1e-300))) if err.size else 0
    share = err.flat[worst] / max(allowed.flat[worst], 1e-300) if err.size else 0.0
    print(f"{name}: max abs err {err.max(initial=0.0):.3e}; at most {share:.2f} of its bound")
    assert (err <= allowed).all(), (
        f"{name}: {int((err > allowed).sum())} of {err.size} elements beyond the bound; worst |ours - reference| "
        f"{err.flat[worst]:.3e} where the bound is {allowed.flat[worst]:.3e}")


def assert_same_masks(name: str, ours_masks, reference_logits, band: float) -> None:
    """Thresholded masks agree (ours > 0 vs reference > 0) wherever the reference logit is farther than ``band``
    from 0: ``band`` is the bound on the logits' error, so only pixels that fp32 cannot decide are exempt."""
    ours_masks, reference_logits = np.asarray(ours_masks), np.asarray(reference_logits)
    decided = np.abs(reference_logits) > band
    ours_binary = ours_masks if ours_masks.dtype == bool else ours_masks > 0
    wrong = int((ours_binary != (reference_logits > 0))[decided].sum())
    print(f"{name}: {wrong} of {int(decided.sum())} decided pixels differ "
          f"({int((~decided).sum())} within {band:.1e} of 0)")
    assert wrong == 0, f"{name}: {wrong} mask pixels differ where the reference logit is beyond {band:.1e} of 0"


def logit_band(errors: dict) -> float:
    """A bound on |ours - reference| at every element, from :func:`assert_as_accurate`'s errors (triangle
    inequality through the exact values): the band around 0 where fp32 cannot decide a mask pixel."""
    return errors["ours_max"] + errors["ref_max"]


# --- the reference in float64 -----------------------------------------------------------------------------


def float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a reference module (buffers included: a saved buffer is an input, its fp32 values stay)."""
    return copy.deepcopy(module).double()


def _pe_encoding_in_matrix_dtype(original):
    def pe_encoding(self, coords):
        return original(self, coords.to(self.positional_encoding_gaussian_matrix.dtype))

    return pe_encoding


def _masks_in_weight_dtype(original):
    def embed_masks(self, masks):
        return original(self, masks.to(self.mask_downscaling[0].weight.dtype))

    return embed_masks


@contextlib.contextmanager
def reference_in_float64():
    """segment_anything(_hq) with its two hard-coded float32 casts lifted, so a float64 copy runs in float64.

    ``PositionEmbeddingRandom`` casts coordinates to float32 before the encoding (``forward_with_coords``) and
    builds its grid in float32; ``SamPredictor`` passes prompts and mask inputs as float32. Coordinates that
    are inputs (the grid's pixel centres, a prompt's pixel coordinates) keep their fp32 values, which ours
    computes identically; what follows them (the matmul, 2 pi, sin/cos; the mask convs) runs in float64.
    """
    import segment_anything.modeling.prompt_encoder as sam_pe
    import segment_anything_hq.modeling.prompt_encoder as hq_pe

    saved = []
    try:
        for mod in (sam_pe, hq_pe):
            for cls, attr, wrap in ((mod.PositionEmbeddingRandom, "_pe_encoding", _pe_encoding_in_matrix_dtype),
                                    (mod.PromptEncoder, "_embed_masks", _masks_in_weight_dtype)):
                original = cls.__dict__[attr]
                saved.append((cls, attr, original))
                setattr(cls, attr, wrap(original))
        yield
    finally:
        for cls, attr, original in reversed(saved):
            setattr(cls, attr, original)
