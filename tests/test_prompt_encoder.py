"""Parity of the prompt encoder with segment_anything's PromptEncoder (random weights, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from segment_anything.modeling import PromptEncoder as TorchPromptEncoder
from segment_anything.modeling.common import LayerNorm2d as TorchLayerNorm2d

from convert.keymap import load_torch_weights
from pisam_jax.modeling.prompt_encoder import PromptEncoder
from tests.parity import assert_close

RTOL = 1e-5  # single module; atol = RTOL * max|reference| (tests/parity.py)


def _compare(name, ours, ref):
    assert_close(name, ours, ref, rtol=RTOL)


def _build(embed_dim, emb_size, in_size, mask_in_chans, seed=0):
    torch.manual_seed(seed)
    ref = TorchPromptEncoder(embed_dim, emb_size, in_size, mask_in_chans).eval()
    with torch.no_grad():  # LayerNorms default to 1/0: make them non-trivial
        for m in ref.modules():
            if isinstance(m, (torch.nn.LayerNorm, TorchLayerNorm2d)):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    ours = nnx.eval_shape(lambda: PromptEncoder(embed_dim, emb_size, in_size, mask_in_chans, rngs=nnx.Rngs(0)))
    load_torch_weights(ours, ref.state_dict())
    return ref, ours


def _jitted(module):
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, points, boxes, masks):
        return nnx.merge(graphdef, state)(points, boxes, masks)

    return lambda points=None, boxes=None, masks=None: run(state, points, boxes, masks)


def _run_both(ref, ours, points, boxes, masks):
    """points (coords, labels) numpy, boxes numpy, masks NCHW numpy -> (ours, reference), NHWC dense."""
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    with torch.no_grad():
        tp = None if points is None else (t(points[0]), t(points[1]))
        sparse_ref, dense_ref = ref(tp, t(boxes), t(masks))
    j = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    jp = None if points is None else (j(points[0]), j(points[1]))
    jm = None if masks is None else jnp.asarray(masks.transpose(0, 2, 3, 1))
    sparse, dense = _jitted(ours)(jp, j(boxes), jm)
    return (sparse, dense), (sparse_ref.detach().numpy(), dense_ref.detach().permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def sam_size():
    """The configuration real SAM uses: 256 channels, 64x64 embedding, 1024x1024 input, 16 mask channels."""
    return _build(256, (64, 64), (1024, 1024), 16)


def _points(rng, b, n, w, h):
    coords = (rng.uniform(0, 1, (b, n, 2)) * np.array([w, h])).astype(np.float32)
    labels = rng.integers(-1, 2, (b, n)).astype(np.int64)
    labels[0, :3] = [-1, 0, 1]  # every label present
    return coords, labels


def _boxes(rng, b, w, h):
    xy0 = rng.uniform(0, 0.5, (b, 2)) * np.array([w, h])
    xy1 = xy0 + rng.uniform(0.1, 0.5, (b, 2)) * np.array([w, h])
    return np.concatenate([xy0, xy1], axis=1).astype(np.float32)


def test_dense_pe(sam_size):
    ref, ours = sam_size
    with torch.no_grad():
        pe_ref = ref.get_dense_pe().permute(0, 2, 3, 1).numpy()
    pe = ours.get_dense_pe()
    assert pe.shape == (1, 64, 64, 256)
    _compare("dense_pe", pe, pe_ref)


def test_points_only_pads(sam_size):
    ref, ours = sam_size
    rng = np.random.default_rng(0)
    points = _points(rng, 3, 5, 1024, 1024)
    (sparse, dense), (sparse_ref, dense_ref) = _run_both(ref, ours, points, None, None)
    assert sparse.shape == (3, 6, 256)  # 5 points + the padding point
    _compare("points_only.sparse", sparse, sparse_ref)
    _compare("points_only.dense", dense, dense_ref)


def test_box_only(sam_size):
    ref, ours = sam_size
    rng = np.random.default_rng(1)
    boxes = _boxes(rng, 4, 1024, 1024)
    (sparse, dense), (sparse_ref, dense_ref) = _run_both(ref, ours, None, boxes, None)
    assert sparse.shape == (4, 2, 256)
    _compare("box_only.sparse", sparse, sparse_ref)
    _compare("box_only.dense", dense, dense_ref)


def test_box_and_points(sam_size):
    ref, ours = sam_size
    rng = np.random.default_rng(2)
    points = _points(rng, 2, 4, 1024, 1024)
    boxes = _boxes(rng, 2, 1024, 1024)
    (sparse, dense), (sparse_ref, dense_ref) = _run_both(ref, ours, points, boxes, None)
    assert sparse.shape == (2, 6, 256)  # no padding point when a box is given
    _compare("box_and_points.sparse", sparse, sparse_ref)
    _compare("box_and_points.dense", dense, dense_ref)


def test_masks_and_points(sam_size):
    ref, ours = sam_size
    rng = np.random.default_rng(3)
    points = _points(rng, 2, 3, 1024, 1024)
    masks = rng.normal(0, 5, (2, 1, 256, 256)).astype(np.float32)
    (sparse, dense), (sparse_ref, dense_ref) = _run_both(ref, ours, points, None, masks)
    assert dense.shape == (2, 64, 64, 256)
    _compare("masks.sparse", sparse, sparse_ref)
    _compare("masks.dense", dense, dense_ref)


def test_no_prompt(sam_size):
    ref, ours = sam_size
    (sparse, dense), (sparse_ref, dense_ref) = _run_both(ref, ours, None, None, None)
    assert sparse.shape == (1, 0, 256) and dense.shape == (1, 64, 64, 256)
    _compare("no_prompt.dense", dense, dense_ref)


def test_non_square_small():
    """A small non-square configuration: catches any swap of (x, y) against (H, W)."""
    ref, ours = _build(32, (12, 20), (48, 80), 16, seed=1)
    rng = np.random.default_rng(4)
    points = _points(rng, 2, 3, 80, 48)
    boxes = _boxes(rng, 2, 80, 48)
    masks = rng.normal(0, 5, (2, 1, 48, 80)).astype(np.float32)
    (sparse, dense), (sparse_ref, dense_ref) = _run_both(ref, ours, points, boxes, masks)
    _compare("non_square.sparse", sparse, sparse_ref)
    _compare("non_square.dense", dense, dense_ref)
    with torch.no_grad():
        pe_ref = ref.get_dense_pe().permute(0, 2, 3, 1).numpy()
    _compare("non_square.dense_pe", ours.get_dense_pe(), pe_ref)
