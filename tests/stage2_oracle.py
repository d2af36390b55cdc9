"""An independent oracle for Pi-SAM stage-2 training inputs (PISAM_SPEC.md section 6), and a driver that runs
train.py with spies at the stage-2 boundary to capture what the model is fed.

The oracle follows the spec's description of the reference's ``PointInteract.get_points_coor``, in torch and cv2,
without using ``pisam_jax.data.clicks``:

  1. P = the 256^2 (here h x w) low-resolution prediction > 0 (spec: sigmoid > 0.5, "equivalently logit > 0");
  2. L = labels_low / 255 with labels_low = F.interpolate(mask, (h, w), bilinear) of the float 0..255 target;
     missed foreground L - P == +1, false positive L - P == -1 (soft values never qualify);
  3. boundary removal by the reference's mechanics: a Laplacian (8 centre, -1 around) on the zero-padded map,
     / 9, clamped at 0, > 0.1 is boundary, subtracted from the region;
  4. cv2.connectedComponentsWithStats, 8-connectivity, area >= 2; FG components flag 1, BG flag 0;
  5. none: the sample is invalid (valid_mask 0); otherwise training takes n ~ U{1..min(10, k)} of the largest
     components (torch.topk: sorted, largest first) and one uniformly random pixel in each.

What the oracle can check of one random draw: validity, 1 <= n <= min(10, k), the chosen components are n largest
ones (ties: any of the tied), largest first, distinct, each click's pixel inside its component and its flag its
error type, padding a suffix. (The distribution of n and of the pixel is checked over many draws in
test_train_stage2_oracle.py.)

Where this project decides otherwise (PISAM_SPEC decisions), the official behaviour is converted as follows:

  * D3 (fixes B4, B5): the official point is (row, col) / 256, transposed and half a pixel off; ours is
    (x, y) = ((col + 0.5) / w, (row + 0.5) / h). The oracle expects ours: x * w - 0.5 and y * h - 0.5 integral.
  * D5 (fixes B6): the official pads with point (0, 0), flag 0 and a kv mask that its final image->token
    attention ignores; an invalid sample has an all-False kv mask (all 11 tokens attended). Ours marks padded
    slots with label -1, which the model turns into flag 0 and a padding mask applied in every image->token
    attention (an invalid sample: all 10 click slots padded; its loss weight is 0 either way).
  * Loss weights: the official weight is valid_mask; ours is valid * has_object, where has_object (some pixel of
    the augmented mask > 128) is False when the random crop lost the object (the official trains that sample
    with a (1e8, 1e8, 0, 0) box and an empty target).
  * The click grid (README decision): the official clicks on its 256^2 grid, where its low-resolution mask lives at
    1024 input. Ours keeps that 256^2 grid for any model size: the low-resolution logits are first resized to it
    bilinearly (``on_click_grid``; the identity at 1024 input), then steps 1-5 run there.
  * Randomness: the official uses Python's ``random`` and ``torch.topk`` (ties arbitrary); ours a numpy generator
    per global batch row, seeded by (seed, step, row). Draws cannot be compared, only their support and law.

Driver: ``python -m tests.stage2_oracle OUT.npz <train.py flags>`` runs train.py with three spies and saves what
they saw: ``Stage2.prepare``'s input mask and output batch (the train step's input), the interactor's points, flags
and padding mask (inside the jitted step), and the weights ``losses.stage2_loss`` applies.
"""

from __future__ import annotations

import dataclasses
import sys

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MAX_POINTS = 10


@dataclasses.dataclass
class Component:
    area: int
    flag: int  # 1: missed foreground, 0: false positive
    pixels: np.ndarray  # (h, w) bool


def labels_low(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The reference's ``labels_256``: the float 0..255 target (S, S) resized bilinearly to hw, as float32."""
    t = torch.from_numpy(np.ascontiguousarray(mask, np.float32))[None, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def on_click_grid(low_res_logits: np.ndarray, grid: int = 256) -> np.ndarray:
    """Low-resolution logits (h, w) resized bilinearly (align_corners=False) to the grid x grid click grid."""
    t = torch.from_numpy(np.asarray(low_res_logits, np.float32))[None, None]
    if t.shape[-2:] == (grid, grid):
        return t[0, 0].numpy()
    return F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False)[0, 0].numpy()


def _remove_boundary(region: torch.Tensor) -> torch.Tensor:
    """The reference's BlockTargetGenerator on a (h, w) 0/1 float map."""
    kernel = -torch.ones(1, 1, 3, 3)
    kernel[0, 0, 1, 1] = 8.0
    lap = F.conv2d(F.pad(region[None, None], (1, 1, 1, 1)), kernel)[0, 0] / 9.0
    return region - (lap.clamp(min=0) > 0.1).float()


def error_components(low_res_logits: np.ndarray, target_low: np.ndarray) -> list[Component]:
    """Spec 6 steps 1-4 for one sample: logits (h, w), target_low (h, w) on 0..255 -> components, FG first."""
    pred = torch.from_numpy(np.asarray(low_res_logits, np.float32)) > 0
    diff = torch.from_numpy(np.asarray(target_low, np.float32)) / 255.0 - pred.float()
    out = []
    for flag, region in ((1, diff == 1), (0, diff == -1)):
        eroded = _remove_boundary(region.float()).numpy().astype(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(eroded, connectivity=8)
        for i in range(1, n):
            if stats[i, cv2.CC_STAT_AREA] >= 2:
                out.append(Component(int(stats[i, cv2.CC_STAT_AREA]), flag, lab == i))
    return out


def check_sample(comps: list[Component], points: np.ndarray, labels: np.ndarray, valid) -> dict:
    """Asserts that one sample's training clicks are a possible outcome of spec 6 (with D3, D5).

    points (10, 2) (x, y) normalised; labels (10,) 1 / 0 / -1 (padding). -> {"k", "n", "flags"}.
    """
    h, w = comps[0].pixels.shape if comps else (None, None)
    k = len(comps)
    assert bool(valid) == (k > 0), f"valid={valid} but {k} error components"
    used = labels >= 0
    n = int(used.sum())
    assert (labels[n:] == -1).all() and used[:n].all(), f"padding is not a suffix: {labels}"
    np.testing.assert_array_equal(points[n:], 0.0)  # padded slots at (0, 0), as the reference's
    if k == 0:
        assert n == 0
        return dict(k=0, n=0, flags=[])
    assert 1 <= n <= min(MAX_POINTS, k), f"n={n} with {k} components"
    chosen = []
    for i in range(n):
        col, row = points[i, 0] * w - 0.5, points[i, 1] * h - 0.5  # D3: pixel centres, (x, y)
        assert col == int(col) and row == int(row), f"slot {i}: {points[i]} is not a pixel centre of {h}x{w}"
        row, col = int(row), int(col)
        hit = [j for j, c in enumerate(comps) if c.pixels[row, col]]
        assert len(hit) == 1, f"slot {i}: pixel (row {row}, col {col}) is in no error component"
        assert comps[hit[0]].flag == labels[i], f"slot {i}: flag {labels[i]}, error type {comps[hit[0]].flag}"
        chosen.append(hit[0])
    assert len(set(chosen)) == n, f"two clicks in one component: {chosen}"
    areas = [comps[j].area for j in chosen]
    assert areas == sorted(areas, reverse=True), f"not largest first: {areas}"
    assert areas == sorted((c.area for c in comps), reverse=True)[:n], "not the n largest components"
    return dict(k=k, n=n, flags=[int(x) for x in labels[:n]])


# -- the driver -------------------------------------------------------------------------------------


def _capture(records: dict):
    """Installs the spies; ``records`` gets lists per key."""
    import jax
    import numpy as np

    from pisam_jax.modeling import interactor
    from pisam_jax.training import losses
    from pisam_jax.training import step as step_lib
    from pisam_jax.training.stages import pisam

    prepare = pisam.Stage2.prepare

    def spy_prepare(self, train_state, frozen_state, batch, step):
        out, metrics = prepare(self, train_state, frozen_state, batch, step)
        rows = lambda x: step_lib.local_rows(x)  # noqa: E731
        records.setdefault("step", []).append(np.full(rows(out["valid"]).shape, step))
        for k in ("mask", "has_object"):
            records.setdefault(k, []).append(rows(batch[k]))
        for k in ("points", "labels", "valid"):
            records.setdefault(k, []).append(rows(out[k]))
        records.setdefault("low_res", []).append(rows(out["low_res"])[:, 0])
        return out, metrics

    call = interactor.PointInteract.__call__

    def spy_interactor(self, embeddings, hyper_in, points, flags, pad_mask=None):
        def record(p, f, m):
            for k, v in (("model_points", p), ("model_flags", f), ("model_pad", m)):
                records.setdefault(k, []).append(np.asarray(v))
        jax.debug.callback(record, points, flags, pad_mask)
        return call(self, embeddings, hyper_in, points, flags, pad_mask)

    stage2_loss = losses.stage2_loss

    def spy_loss(key, pred_high, targets, valid, **kw):
        jax.debug.callback(lambda v: records.setdefault("loss_weights", []).append(np.asarray(v)), valid)
        return stage2_loss(key, pred_high, targets, valid, **kw)

    pisam.Stage2.prepare = spy_prepare
    interactor.PointInteract.__call__ = spy_interactor
    losses.stage2_loss = spy_loss


def main(out: str, argv: list[str]) -> int:
    import train
    from absl import app

    records: dict = {}
    _capture(records)
    code = 0
    try:
        app.run(train.main, argv=["train.py", *argv], flags_parser=train._parse_flags)
    except SystemExit as e:
        code = e.code or 0
    np.savez(out, **{k: np.concatenate(v) for k, v in records.items()})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
