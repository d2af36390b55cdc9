"""Sample predictions during training: a fixed set of K images, predicted every N steps, to TensorBoard.

The samples are the first ``count`` training images (the loop has no validation split), read once with the
deterministic training transform (long side to the model's size, padded; no flip, no jitter), so the panels of
one run are comparable across steps. At a logging step the current parameters predict them in one jitted
forward (compiled once, on the first logging step; outside the train step, no gradient): the stage's
``preview`` from the tight GT box (SAM and HQ-SAM: the single mask, upsampled; Pi-SAM: the 1024^2 head's
logits > 0). Pi-SAM stage 2 adds clicks: simulated once, with a fixed seed, from the frozen 256^2 prediction as
the training step simulates them (the base is frozen in stage 2, so they stay the same all run), then given to
the Precise Interactor at every logging step.

One panel a sample, tag ``samples/<i>``, tiles at most ``size`` px on their long side, cropped to the image
(padding dropped):

    image (+ box in yellow, clicks: green foreground, red background) | ground truth | prediction

Masks are shown white on black and downscaled by area averaging, so a structure thinner than a tile pixel shows
as grey instead of vanishing.

Multi-host: every process runs the forward (the parameters are global arrays, the forward is SPMD); only a
writer that is enabled (process 0's) composes and writes the panels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pisam_jax.data import clicks as clicks_lib
from pisam_jax.data import pipeline
from pisam_jax.data.datasets import Dataset
from pisam_jax.overlay import draw_overlay
from pisam_jax.training import step as step_lib

TAG = "samples"
GAP = 4  # white pixels between the tiles of a panel
CLICK_SEED = 0x5A4D  # with config.seed: the stage-2 sample clicks


def fixed_samples(datasets: Sequence[Dataset], count: int, image_size: int) -> dict[str, np.ndarray]:
    """The first ``count`` images of ``datasets`` (in order) as the un-augmented training transform gives them.

    Returns numpy arrays with a leading K axis (K = min(count, images)): ``image`` (K, S, S, 3) float32 0..255,
    ``mask`` (K, S, S) float32 0..255, ``box`` (K, 4) float32, ``input_size`` (K, 2) int32 (the unpadded part),
    and ``name`` (K,) str.
    """
    chosen = [s for d in datasets for s in d.samples][:count]
    if not chosen:
        raise ValueError("no training images to take samples from")
    augment = pipeline.TrainAugment(size=image_size, scale_range=(1.0, 1.0), flip_p=0.0)
    rows = [augment(pipeline.load(s), np.random.default_rng(0)) for s in chosen]  # deterministic: rng unused
    out = {k: np.stack([r[k] for r in rows]) for k in ("image", "mask", "box", "input_size")}
    out["name"] = np.array([s.name for s in chosen])
    return out


def make_predict(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, stage):
    """Jitted ``(train_state, frozen_state, batch, clicks) -> {"mask", "low_res", "low_gt"}``, replicated outputs.

    batch: ``image`` (B, S, S, 3), ``mask`` (B, S, S), ``box`` (B, 4), sharded over ``"data"``; clicks: None or
    (points (B, N, 2) normalised, labels (B, N) 1 / 0 / -1 padding). Outputs: ``mask`` (B, S, S) bool, the stage's
    prediction from the tight box (``stage.preview``); for a stage with clicks also what its training step
    simulates them from (``stage.click_inputs``): ``low_res`` (B, g, g) the low-resolution logits and ``low_gt``
    (B, g, g) the mask, on the click grid. Compiled once a run: a stage gives clicks always or never, of one shape.
    """
    def predict(train_state, frozen_state, batch, clicks):
        model = nnx.merge(graphdef, train_state, frozen_state)
        mask, low_res = stage.preview(model, batch, clicks)
        if not stage.uses_clicks:
            return dict(mask=mask)
        low_res, low_gt = stage.click_inputs(low_res, batch["mask"])
        return dict(mask=mask, low_res=low_res, low_gt=low_gt)

    return jax.jit(predict, out_shardings=NamedSharding(mesh, P()))


def _host(x: jax.Array) -> np.ndarray:
    """A replicated global array on this host (also when it spans processes)."""
    return np.asarray(x.addressable_data(0))


def _tile_shape(input_size: Sequence[int], size: int) -> tuple[int, int]:
    h, w = (int(v) for v in input_size)
    f = min(1.0, size / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def _shrink(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if x.shape[:2] == shape:
        return x
    return cv2.resize(x, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def compose_panel(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    input_size: Sequence[int] | None = None,
    box: np.ndarray | None = None,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    size: int = 256,
) -> np.ndarray:
    """One sample's panel, (h, 3 * w + 2 * GAP, 3) uint8: image (with box, clicks) | ground truth | prediction.

    image (S, S, 3) 0..255; gt (S, S) 0..255 (soft values rounded for display); pred (S, S) bool; input_size
    (h, w): the unpadded part shown (default: all); box (4,) x0 y0 x1 y1 in pixels; points (N, 2) (x, y) normalised with pixel centres, as the
    model takes them ((x_px + 0.5) / S), labels (N,) 1 foreground / 0 background / -1 padding (not drawn).
    Each tile is the shown part scaled to at most ``size`` px on its long side (never up).
    """
    s = image.shape[0]
    ih, iw = (int(v) for v in (input_size if input_size is not None else image.shape[:2]))
    th, tw = _tile_shape((ih, iw), size)
    fy, fx = th / ih, tw / iw
    small = _shrink(np.ascontiguousarray(image[:ih, :iw]), (th, tw))
    pts = lbl = None
    if points is not None and labels is not None:
        keep = np.asarray(labels) >= 0
        px = np.asarray(points, np.float32)[keep] * s  # pixel-centre frame: edges at 0 .. S
        pts = np.stack([px[:, 0] * fx - 0.5, px[:, 1] * fy - 0.5], axis=-1)
        lbl = np.asarray(labels)[keep]
    scaled_box = None
    if box is not None:
        scaled_box = np.asarray(box, np.float32) * np.array([fx, fy, fx, fy], np.float32)
    first = np.asarray(draw_overlay(small, np.zeros((th, tw), bool), box=scaled_box, points=pts, labels=lbl))
    tiles = [first]
    gt_u8 = np.clip(np.rint(np.asarray(gt, np.float32)), 0, 255).astype(np.uint8)
    for m in (gt_u8, np.asarray(pred, bool).astype(np.uint8) * 255):
        tiles.append(np.repeat(_shrink(np.ascontiguousarray(m[:ih, :iw]), (th, tw))[..., None], 3, axis=-1))
    gap = np.full((th, GAP, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


class SampleLogger:
    """Predicts the fixed samples with the current parameters and writes one panel each (see the module doc).

        samples = SampleLogger(graphdef, mesh, fixed_samples(datasets, 4, 1024), stage=stage, seed=0, size=256)
        samples.log(step, train_state, frozen_state, writer)   # on every process
    """

    def __init__(self, graphdef, mesh, samples: dict[str, np.ndarray], *, stage, seed: int, size: int):
        self.samples = samples
        self.count = len(samples["name"])
        self.stage = stage
        self.seed = seed
        self.size = size
        self.predict = make_predict(graphdef, mesh, stage)
        self.mesh = mesh
        # rows padded (repeating the samples) to a multiple of the device count; each process places its rows
        n_dev, n_proc, rank = jax.device_count(), jax.process_count(), jax.process_index()
        rows = -(-self.count // n_dev) * n_dev
        self._take = np.arange(rows) % self.count
        per = rows // n_proc
        self._local = self._take[rank * per:(rank + 1) * per]
        self.batch = step_lib.shard_batch({k: samples[k][self._local] for k in ("image", "mask", "box")}, mesh)
        self.points = self.labels = None  # stages with clicks: the simulated clicks, (K, N, 2) and (K, N)
        self._clicks = None  # what the forward gets: None, or the clicks as sharded arrays

    def _stage2_clicks(self, train_state, frozen_state) -> None:
        """The stage-2 clicks of the samples, once: from the frozen box-only 256^2 prediction, a fixed rng.

        The box-only forward gets all-padding clicks: its 256^2 logits do not depend on them, and the one
        compiled forward serves both calls.
        """
        n = clicks_lib.MAX_POINTS
        none = (np.zeros((len(self._local), n, 2), np.float32), np.full((len(self._local), n), -1, np.int32))
        out = self.predict(train_state, frozen_state, self.batch, step_lib.shard_batch(none, self.mesh))
        low, low_gt = _host(out["low_res"]), _host(out["low_gt"])
        rng = np.random.default_rng((self.seed, CLICK_SEED))
        sim = clicks_lib.simulate_clicks_batch(low[: self.count] > 0, low_gt[: self.count], rng, mode="train")
        self.points = sim["points"]
        self.labels = np.where(sim["pad"], -1, sim["flags"]).astype(np.int32)
        self._clicks = step_lib.shard_batch((self.points[self._local], self.labels[self._local]), self.mesh)

    def log(self, step: int, train_state, frozen_state, writer) -> None:
        """Every process calls this at the same steps; ``writer.image`` writes where the writer is enabled."""
        if self.stage.uses_clicks and self._clicks is None:
            self._stage2_clicks(train_state, frozen_state)
        out = self.predict(train_state, frozen_state, self.batch, self._clicks)
        if not writer.writes_images:  # another process writes (or no tensorboardX)
            return
        pred = _host(out["mask"])
        s = self.samples
        for i in range(self.count):
            panel = compose_panel(
                s["image"][i], s["mask"][i], pred[i], input_size=s["input_size"][i], box=s["box"][i],
                points=None if self.points is None else self.points[i],
                labels=None if self.labels is None else self.labels[i], size=self.size,
            )
            writer.image(step, f"{TAG}/{i}", panel)
