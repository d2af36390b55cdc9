"""Pi-SAM mask losses (PISAM_SPEC.md 5.1) against a PyTorch reference written from the spec
(``references/losses.py``).

The reference is Mask2Former's ``point_sample``, ``calculate_uncertainty``,
``get_uncertain_point_coords_with_randomness``, ``sigmoid_ce_loss`` and ``dice_loss``, and HQ-SAM/Pi-SAM's
``loss_masks`` with the ``valid_mask`` weighting. Its ``torch.rand`` draws are replaced by ours, so both sides
score the same points. Values and gradients are judged against the reference's own fp32 error, measured by
running it in float64 (tests/parity.py).

Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: gradients ours 1.2e-11 to 6.6e-11, the reference alike
(ratios <= 1.42); the scalar losses within 2e-7 (bound: 4 x log2(n) roundings of the loss, ~3e-6 relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pisam_jax.training import losses
from references.losses import (
    ref_calculate_uncertainty,
    ref_get_uncertain_point_coords_with_randomness,
    ref_loss_masks,
    ref_point_sample,
)
from tests.parity import U, assert_as_accurate, assert_close

# --- helpers ---------------------------------------------------------------------------------


def injected(*arrays):
    """A ``torch.rand`` stand-in returning our draws, in order."""
    it = iter([torch.from_numpy(np.array(a)) for a in arrays])

    def rand(*shape):
        out = next(it)
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out

    return rand


def soft_target(rng, b, size):
    """A soft mask in [0, 1] with exact 0s and 1s, like GT/255 after bilinear resizes."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.stack([np.clip(4.0 * (0.3 + 0.1 * i - np.hypot(xx - 0.5, yy - 0.5)), 0, 1) for i in range(b)])
    return (t * (rng.random((b, size, size)) > 0.02)).astype(np.float32)


def assert_same_selection(ours, ref, logits, cand, nu):
    """Same chosen set up to near-ties: fp32 rounding may swap candidates whose uncertainties differ by < tol.

    A candidate's uncertainty is -|bilinear sample of the logits|: 4 products and 3 sums of values up to
    max|logits|, with weights themselves rounded from the coordinates, so each side's sample is within ~8 U
    max|logits| of exact, and two candidates can only trade places when their exact uncertainties are closer
    than twice that.
    """
    tol = 16 * U * float(np.abs(logits).max())
    ours, ref = np.asarray(ours), np.asarray(ref)
    np.testing.assert_array_equal(ours[:, nu:], ref[:, nu:])  # the fresh points
    unc = -np.abs(
        ref_point_sample(torch.from_numpy(logits)[:, None], torch.from_numpy(np.array(cand)), align_corners=False)
    )[:, 0].numpy()
    cand = np.asarray(cand)
    for i in range(ours.shape[0]):
        key = lambda a: set(map(tuple, a.tolist()))  # noqa: E731
        mine, theirs = key(ours[i, :nu]), key(ref[i, :nu])
        assert len(mine) == nu
        if mine == theirs:
            continue
        chosen = np.array([tuple(c) in mine for c in cand[i].tolist()])
        assert len(mine ^ theirs) <= 4, f"{len(mine ^ theirs)} points differ"
        assert unc[i][chosen].min() >= unc[i][~chosen].max() - tol


def jax_loss_with_draws(logits, targets, draws, num_uncertain, weights=None):
    cand, fresh = draws
    coords = losses.select_uncertain_points(logits, cand, fresh, num_uncertain)
    out = losses.mask_losses_at(logits, targets, coords, weights=weights)
    return out["bce"] + out["dice"], (out, coords)


def in_float64(*tensors):
    """float64 leaf copies of fp32 tensors (same values), collecting their own gradients where the original does."""
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


# --- tests -----------------------------------------------------------------------------------


def test_point_sample_matches_grid_sample(h=7, w=11):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, h, w)).astype(np.float32)
    coords = rng.random((2, 500, 2)).astype(np.float32)
    coords[:, :8] = np.array([[0, 0], [1, 1], [0, 1], [1, 0], [0.5, 0], [0, 0.5], [1, 0.3], [1e-4, 1 - 1e-4]])
    ours = losses.point_sample(jnp.asarray(x), jnp.asarray(coords))
    ref, exact = (ref_point_sample(torch.from_numpy(x)[:, None].to(dt), torch.from_numpy(coords).to(dt),
                                   align_corners=False)[:, 0].numpy() for dt in (torch.float32, torch.float64))
    assert_as_accurate("point_sample", ours, ref, exact)


def test_selection_picks_most_uncertain_and_matches_reference():
    rng = np.random.default_rng(1)
    b, n = 2, 400
    logits = rng.normal(scale=3.0, size=(b, 32, 32)).astype(np.float32)
    cand, fresh, nu = losses.draw_points(jax.random.key(0), b, num_points=n)
    ours = np.asarray(losses.select_uncertain_points(jnp.asarray(logits), cand, fresh, nu))
    ref = ref_get_uncertain_point_coords_with_randomness(
        torch.from_numpy(logits)[:, None], ref_calculate_uncertainty, n, 3.0, 0.75, rand=injected(cand, fresh)
    )
    assert nu == 300 and ours.shape == (b, n, 2) and cand.shape == (b, 1200, 2)
    np.testing.assert_array_equal(ours, ref.numpy())
    # the chosen candidates are the most uncertain ones: max |logit| chosen <= min |logit| not chosen
    sampled = np.abs(np.asarray(losses.point_sample(jnp.asarray(logits), cand)))
    for i in range(b):
        chosen = np.isin(np.asarray(cand[i]).view(np.complex64)[:, 0], ours[i, :nu].view(np.complex64)[:, 0])
        assert chosen.sum() == nu
        assert sampled[i][chosen].max() <= sampled[i][~chosen].min()
    np.testing.assert_array_equal(ours[:, nu:], np.asarray(fresh))


def test_selection_is_not_differentiated():
    logits = jax.random.normal(jax.random.key(1), (2, 16, 16))
    g = jax.jit(jax.grad(lambda l: losses.uncertain_point_coords(jax.random.key(2), l, num_points=64).sum()))(logits)
    assert not np.any(np.asarray(g))


def test_mask_losses_value_and_grad_match_reference():
    """Selection from the same draws, then BCE and Dice and their gradients at the same points."""
    rng = np.random.default_rng(3)
    b, n, h, size = 3, losses.NUM_POINTS, 64, 256
    logits = rng.normal(scale=4.0, size=(b, h, h)).astype(np.float32)
    targets = soft_target(rng, b, size)
    cand, fresh, nu = losses.draw_points(jax.random.key(3), b, num_points=n)
    assert (cand.shape, fresh.shape, nu) == ((b, 37632, 2), (b, 3136, 2), 9408)

    src = torch.from_numpy(logits)[:, None].requires_grad_(True)
    tt = torch.from_numpy(targets)[:, None]
    _, _, ref_coords = ref_loss_masks(src, tt, b, n, injected(cand, fresh))
    ours = jax.jit(losses.select_uncertain_points, static_argnums=3)(jnp.asarray(logits), cand, fresh, nu)
    assert_same_selection(ours, ref_coords.numpy(), logits, cand, nu)

    # values and gradients at the same points, the reference in fp32 and in float64
    coords = torch.from_numpy(np.array(ours))
    runs = []
    for s_, t_, c_ in ((src, tt, coords), in_float64(src, tt, coords)):
        bce, dice, _ = ref_loss_masks(s_, t_, b, n, None, point_coords=c_)
        (bce + dice).backward()
        runs.append((bce.item(), dice.item(), s_.grad[:, 0].numpy()))

    def total(lg):
        out = losses.mask_losses_at(lg, jnp.asarray(targets), ours)
        return out["bce"] + out["dice"], out

    (_, terms), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(logits))
    # bce and dice are means / ratios of sums of 3 x 12544 positive terms: scalars, whose rounding floor is that of
    # a tree sum (XLA's and torch's reductions), ~log2(n) roundings.
    assert_as_accurate("bce", terms["bce"], runs[0][0], runs[1][0], roundings=np.log2(b * n))
    assert_as_accurate("dice", terms["dice"], runs[0][1], runs[1][1], roundings=np.log2(b * n))
    assert_as_accurate("grad", grad, runs[0][2], runs[1][2])


@pytest.mark.parametrize("valid", [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
def test_weighted_losses_match_reference(valid):
    rng = np.random.default_rng(7)
    b, n = 3, 2000
    logits = rng.normal(scale=2.0, size=(b, 128, 128)).astype(np.float32)
    targets = soft_target(rng, b, 256)
    w = np.asarray(valid, np.float32)
    cand, fresh, nu = losses.draw_points(jax.random.key(4), b, num_points=n)

    (loss, (terms, coords)), grad = jax.jit(
        jax.value_and_grad(jax_loss_with_draws, has_aux=True), static_argnums=3
    )(jnp.asarray(logits), jnp.asarray(targets), (cand, fresh), nu, jnp.asarray(w))
    inputs = (torch.from_numpy(logits)[:, None].requires_grad_(True), torch.from_numpy(targets)[:, None],
              torch.from_numpy(w), torch.from_numpy(np.array(coords)))
    runs = []
    for src, t_, w_, c_ in (inputs, in_float64(*inputs)):
        bce, dice, _ = ref_loss_masks(src, t_, b, n, None, valid=w_, point_coords=c_)
        (bce + dice).backward()
        runs.append((bce.item(), dice.item(), src.grad[:, 0].numpy()))
    # Scalars from tree sums of 3 x 2000 positive terms: ~log2(n) roundings.
    assert_as_accurate("bce", terms["bce"], runs[0][0], runs[1][0], roundings=np.log2(b * n))
    assert_as_accurate("dice", terms["dice"], runs[0][1], runs[1][1], roundings=np.log2(b * n))
    ref_grad = runs[0][2]
    if w.sum() == 0:
        assert float(loss) == 0.0 and not np.any(np.asarray(grad)) and not np.any(ref_grad)
    else:
        assert_as_accurate("grad", grad, ref_grad, runs[1][2])
        assert not np.any(np.asarray(grad)[w == 0])
    if w.all():  # all-ones weights == the unweighted reduction with num_masks = B
        plain = losses.mask_losses_at(jnp.asarray(logits), jnp.asarray(targets), coords)
        # Two fp32 reductions of the same b * n positive terms, each within (b n) U of the exact sum (relative).
        assert_close("unweighted bce", plain["bce"], terms["bce"], rtol=2 * b * n * U, atol=0.0)


def test_keyed_losses_use_draw_points():
    """mask_losses(key) == mask_losses_at(points from draw_points(key)); stage totals are sums of their terms."""
    rng = np.random.default_rng(5)
    b, n = 2, 500
    low = jnp.asarray(rng.normal(size=(b, 1, 32, 32)).astype(np.float32))
    high = jnp.asarray(rng.normal(size=(b, 1, 128, 128)).astype(np.float32))
    targets = jnp.asarray(soft_target(rng, b, 128)[:, None])
    valid = jnp.asarray([1.0, 0.0])

    @jax.jit
    def run(key):
        got = losses.mask_losses(key, low, targets, num_points=n)
        cand, fresh, nu = losses.draw_points(key, b, num_points=n)
        want = losses.mask_losses_at(low, targets, losses.select_uncertain_points(low[:, 0], cand, fresh, nu))
        s1 = losses.stage1_loss(key, low, high, targets, num_points=n)
        k_low, k_high = jax.random.split(key)
        high_only = losses.mask_losses(k_high, high, targets, num_points=n)
        s2 = losses.stage2_loss(key, high, targets, valid, num_points=n)
        weighted = losses.mask_losses(key, high, targets, weights=valid, num_points=n)
        return got, want, s1, high_only, s2, weighted

    got, want, (total, terms), high_only, (total2, terms2), weighted = run(jax.random.key(9))
    # The same positive terms reduced in two compiled programs: a mean of 2 x 500 BCE terms, or Dice's ratio of
    # sums of 2 x 500, is within 2 (2 n) U of exact (relative) each; a total of 4 (or 2) positive scalars within 3 U.
    same_points = 2 * 2 * 2 * n * U
    for k in ("bce", "dice"):
        assert_close(f"mask_losses {k}", got[k], want[k], rtol=same_points, atol=0.0)
    assert set(terms) == {"bce_256", "dice_256", "bce_1024", "dice_1024"}
    assert_close("stage-1 total", total, sum(float(v) for v in terms.values()), rtol=2 * 3 * U, atol=0.0)
    assert_close("stage-1 dice_1024", terms["dice_1024"], high_only["dice"], rtol=same_points, atol=0.0)
    assert set(terms2) == {"bce_1024", "dice_1024"}
    assert_close("stage-2 total", total2, float(weighted["bce"]) + float(weighted["dice"]), rtol=2 * 3 * U, atol=0.0)


def test_stage1_total_matches_reference_at_full_resolution():
    """256^2 and 1024^2 predictions against the 1024^2 soft target, each with its own points."""
    rng = np.random.default_rng(11)
    b, n = 2, losses.NUM_POINTS
    low = rng.normal(scale=3.0, size=(b, 256, 256)).astype(np.float32)
    high = rng.normal(scale=3.0, size=(b, 1024, 1024)).astype(np.float32)
    targets = soft_target(rng, b, 1024)
    key = jax.random.key(12)

    @jax.jit
    def run(lo, hi, t):
        total, grads = jax.value_and_grad(lambda a, c: losses.stage1_loss(key, a, c, t)[0], argnums=(0, 1))(lo, hi)
        k_low, k_high = jax.random.split(key)
        pts = [losses.uncertain_point_coords(k, p) for k, p in ((k_low, lo), (k_high, hi))]
        return total, grads, pts

    total, grads, (p_low, p_high) = run(jnp.asarray(low), jnp.asarray(high), jnp.asarray(targets))
    inputs = (torch.from_numpy(low)[:, None].requires_grad_(True), torch.from_numpy(high)[:, None].requires_grad_(True),
              torch.from_numpy(targets)[:, None], torch.from_numpy(np.array(p_low)), torch.from_numpy(np.array(p_high)))
    runs = []
    for t_low, t_high, tt, c_low, c_high in (inputs, in_float64(*inputs)):
        b1, d1, _ = ref_loss_masks(t_low, tt, b, n, None, point_coords=c_low)
        b2, d2, _ = ref_loss_masks(t_high, tt, b, n, None, point_coords=c_high)
        ref_total = b1 + d1 + b2 + d2
        ref_total.backward()
        runs.append((ref_total.item(), t_low.grad[:, 0].numpy(), t_high.grad[:, 0].numpy()))
    assert_as_accurate("stage-1 total", total, runs[0][0], runs[1][0], roundings=np.log2(b * n))
    assert_as_accurate("grad 256", grads[0], runs[0][1], runs[1][1])
    assert_as_accurate("grad 1024", grads[1], runs[0][2], runs[1][2])
