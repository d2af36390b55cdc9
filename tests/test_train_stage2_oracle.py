"""Stage-2 training clicks (``stages.pisam.simulate_clicks``, what ``Stage2.prepare`` feeds the step) against the
independent spec-6 oracle of tests/stage2_oracle.py, on synthetic data masks at the spec's 256^2 grid; the law of
the random draws; and independence from how the global batch is split over processes.

The end-to-end check, on what the training loop feeds the jitted step (real low-resolution predictions of a
trained stage-1 model), is test_train_loop.py::test_stage2_training_inputs_match_the_spec_oracle.
"""

import numpy as np
import pytest
from scipy import ndimage, stats

from pisam_jax import transforms
from pisam_jax.data import synthetic
from pisam_jax.training.stages.pisam import simulate_clicks
from tests import stage2_oracle as oracle

GRID = 256


def _cases():
    """(logits (B, 256, 256), target (B, 256, 256) 0..255): synthetic data masks at 1024 (float, soft edges),
    resized as the reference's labels_256, and predictions with the errors a low-resolution decoder makes: the
    target shifted, thinned (thin structures lost), thickened, with holes, spurious blobs, or exactly right."""
    rng = np.random.default_rng(0)
    logits, targets = [], []
    for i in range(8):
        _, mask, _ = synthetic.generate_sample(0, i, size=768, detail=3)
        mask = transforms.pad_to_square(transforms.resize_bilinear(mask, transforms.longest_side_shape(
            *mask.shape, 1024)), 1024, 0)
        low = oracle.labels_low(mask, (GRID, GRID))
        fg = low > 127.5
        variants = [
            np.roll(fg, (rng.integers(-6, 7), rng.integers(-6, 7)), axis=(0, 1)),
            ndimage.binary_erosion(fg, iterations=2),
            ndimage.binary_dilation(fg, iterations=3),
            fg & (rng.random(fg.shape) > 0.02) | (ndimage.gaussian_filter(rng.random(fg.shape), 6) > 0.53),
            fg,  # no error anywhere: an invalid sample
        ]
        for v in variants:
            logits.append(np.where(v, 1.0, -1.0).astype(np.float32) * rng.uniform(0.1, 5.0, fg.shape))
            targets.append(low)
    return np.stack(logits), np.stack(targets)


@pytest.fixture(scope="module")
def cases():
    return _cases()


@pytest.fixture(scope="module")
def components(cases):
    return [oracle.error_components(lo, t) for lo, t in zip(*cases)]


def test_oracle_on_a_known_case():
    """The oracle itself: a 7x7 missed square erodes to a 5x5 component, a 1 px line vanishes, a 2x3 false
    positive erodes to nothing, and an error touching the border loses its border row (the border is outside)."""
    target = np.zeros((32, 32), np.float32)
    target[4:11, 4:11] = 255  # missed foreground 7x7
    target[20, 2:30] = 255  # missed thin line
    target[0:4, 20:28] = 255  # missed, at the top border: rows 0..3 -> eroded to rows 1..2
    logits = -np.ones((32, 32), np.float32)
    logits[25:27, 10:13] = 1  # false positive 2x3
    comps = oracle.error_components(logits, target)
    assert [(c.area, c.flag) for c in comps] == [(12, 1), (25, 1)]  # raster order of the first pixel
    assert comps[0].pixels[1:3, 21:27].all() and comps[1].pixels[5:10, 5:10].all()


def test_training_clicks_follow_the_spec(cases, components):
    clicks = simulate_clicks(*cases, seed=0, step=3, first_row=0)
    seen = [oracle.check_sample(c, p, lab, v)
            for c, p, lab, v in zip(components, clicks["points"], clicks["labels"], clicks["valid"])]
    # the cases exercise what matters: invalid samples, many clicks, both click kinds, padding
    ns = [s["n"] for s in seen]
    assert ns.count(0) >= 8 and max(ns) >= 5 and {0, 1} <= {f for s in seen for f in s["flags"]}
    assert max(s["k"] for s in seen) > 10  # more components than click slots


@pytest.mark.parametrize("bug", ["B4 transposed", "B5 no half pixel", "flags swapped"])
def test_the_oracle_sees_the_reference_bugs(cases, components, bug):
    """The official clicks' conventions (B4, B5) and swapped flags, planted in our clicks, fail the oracle."""
    c = simulate_clicks(*cases, seed=0, step=3, first_row=0)
    used = c["labels"] >= 0
    if bug == "B4 transposed":
        c["points"] = c["points"][..., ::-1]
    elif bug == "B5 no half pixel":
        c["points"] = np.where(used[..., None], c["points"] - 0.5 / GRID, 0.0)
    else:
        c["labels"] = np.where(used, 1 - c["labels"], -1)
    failed = 0
    for comps, p, lab, v in zip(components, c["points"], c["labels"], c["valid"]):
        try:
            oracle.check_sample(comps, p, lab, v)
        except AssertionError:
            failed += 1
    assert failed == int(c["valid"].sum())  # every sample with a click (measured: 28 of 40)


def test_the_law_of_the_draws():
    """n ~ U{1..min(10, k)} and the pixel ~ uniform over its component, over 3000 draws (chi-square, p > 1e-3;
    the seeds are fixed, so this is deterministic)."""
    target = np.zeros((GRID, GRID), np.float32)
    for r, (h, w) in enumerate([(12, 12), (9, 7), (6, 6), (5, 4)]):  # four missed rectangles
        target[20 + 40 * r:20 + 40 * r + h, 30:30 + w] = 255
    logits = -np.ones((1, GRID, GRID), np.float32)
    comps = oracle.error_components(logits[0], target)
    assert [c.area for c in comps] == [100, 35, 16, 6]
    ns, pixels = [], []
    for s in range(3000):
        c = simulate_clicks(logits, target[None], seed=1, step=s, first_row=0)
        ns.append(int((c["labels"][0] >= 0).sum()))
        x, y = c["points"][0, 0]
        pixels.append(int(round(y * GRID - 0.5)) * GRID + int(round(x * GRID - 0.5)))
    assert stats.chisquare(np.bincount(ns, minlength=5)[1:]).pvalue > 1e-3
    biggest = np.flatnonzero(comps[0].pixels.ravel())
    assert set(pixels) <= set(biggest)  # slot 0 is always in the largest component
    counts = np.array([pixels.count(p) for p in biggest])
    assert stats.chisquare(counts).pvalue > 1e-3


def test_clicks_do_not_depend_on_the_process_split(cases):
    """A row's clicks depend on (seed, step, global row) only: 1, 2 or 4 processes, each simulating its rows with
    ``first_row = process * rows``, as Stage2.prepare does, give the same clicks."""
    logits, targets = cases[0][:8], cases[1][:8]
    whole = simulate_clicks(logits, targets, seed=5, step=7, first_row=0)
    for parts in (2, 4):
        rows = len(logits) // parts
        split = [simulate_clicks(logits[p * rows:(p + 1) * rows], targets[p * rows:(p + 1) * rows], seed=5, step=7,
                                 first_row=p * rows) for p in range(parts)]
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([s[k] for s in split]), whole[k])
    other = simulate_clicks(logits, targets, seed=5, step=8, first_row=0)
    assert not np.array_equal(other["points"], whole["points"])  # the step does enter the seed
