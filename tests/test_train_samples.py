"""Sample-prediction panels of training (pisam_jax/training/samples.py): panel composition, the fixed samples, and
a reader of the TensorBoard event files that the end-to-end tests (test_train_loop.py) use."""

import io
import struct
from pathlib import Path

import numpy as np
import pytest

from pisam_jax.overlay import BACKGROUND, BOX, FOREGROUND
from pisam_jax.training.samples import GAP, compose_panel, fixed_samples


def read_images(logdir) -> dict[tuple[str, int], np.ndarray]:
    """{(tag, step): (H, W, 3) uint8} of every image summary in the event files under ``logdir``.

    Event files are TFRecords: u64 length, u32 crc, the serialised ``Event``, u32 crc.
    """
    from PIL import Image
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    im = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)).convert("RGB"))
                    assert im.shape == (v.image.height, v.image.width, 3)
                    out[(v.tag, event.step)] = im
    return out


def split_panel(panel: np.ndarray) -> list[np.ndarray]:
    """The three tiles of a panel: image | ground truth | prediction."""
    w = (panel.shape[1] - 2 * GAP) // 3
    assert panel.shape[1] == 3 * w + 2 * GAP
    assert (panel[:, w:w + GAP] == 255).all() and (panel[:, 2 * w + GAP:2 * w + 2 * GAP] == 255).all()
    return [panel[:, j * (w + GAP):j * (w + GAP) + w] for j in range(3)]


def _scene(s=96, h=64, w=48):
    """An (s, s) padded frame holding an (h, w) image: GT = left half, prediction = right half of the image."""
    rng = np.random.default_rng(0)
    image = np.full((s, s, 3), 128, np.uint8)
    image[:h, :w] = rng.integers(0, 256, (h, w, 3))
    gt = np.zeros((s, s), np.uint8)
    gt[:h, : w // 2] = 255
    pred = np.zeros((s, s), bool)
    pred[:h, w // 2:w] = True
    pred[h:, :] = True  # in the padding: must not show
    return image, gt, pred


def test_panel_shape_and_tiles():
    image, gt, pred = _scene()
    panel = compose_panel(image, gt, pred, input_size=(64, 48), size=32)
    assert panel.dtype == np.uint8 and panel.shape == (32, 3 * 24 + 2 * GAP, 3)  # 64 x 48 -> 32 x 24
    img, g, p = split_panel(panel)
    for tile in (g, p):  # masks: grey, white on black
        assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 0] == tile[..., 2]).all()
    assert (g[:, :12] == 255).all() and (g[:, 12:] == 0).all()
    assert (p[:, :12] == 0).all() and (p[:, 12:] == 255).all()  # the prediction's padding rows are cut off
    assert not (img[..., 0] == img[..., 1]).all()  # the (colour) image, not a mask


def test_panel_draws_box_and_clicks_and_not_padding():
    image = np.zeros((128, 128, 3), np.uint8)
    gt = np.zeros((128, 128), np.uint8)
    box = np.array([8, 8, 100, 60], np.float32)
    points = np.array([[40.5 / 128, 30.5 / 128], [90.5 / 128, 100.5 / 128], [0.5, 0.5]], np.float32)
    labels = np.array([1, 0, -1], np.int32)
    img = split_panel(compose_panel(image, gt, gt > 0, box=box, points=points, labels=labels, size=64))[0]
    assert img.shape == (64, 64, 3)
    # pixel (col 40, row 30) at half scale: (20, 15); (90, 100) -> (45, 50)
    np.testing.assert_array_equal(img[15, 20], FOREGROUND)
    np.testing.assert_array_equal(img[50, 45], BACKGROUND)
    np.testing.assert_array_equal(img[32, 32], 0)  # the padded click at the centre is not drawn
    np.testing.assert_array_equal(img[4, 30], BOX)  # top edge of the box, y = 8 / 2
    bare = split_panel(compose_panel(image, gt, gt > 0, size=64))[0]
    assert (bare == 0).all()


def test_panel_keeps_thin_structures_and_never_upscales():
    s = 512
    gt = np.zeros((s, s), np.uint8)
    gt[:, 200] = 255  # one pixel wide: area-downscaled to grey, not dropped
    image = np.zeros((s, s, 3), np.uint8)
    g = split_panel(compose_panel(image, gt, gt > 0, size=128))[1]
    assert g.shape[:2] == (128, 128)
    assert g[:, 50, 0].min() > 0 and g[:, 50, 0].max() < 255 and g[:, :49].max() == 0
    small = compose_panel(image[:40, :40], gt[:40, :40], gt[:40, :40] > 0, size=128)
    assert small.shape == (40, 3 * 40 + 2 * GAP, 3)


def test_fixed_samples_are_the_first_images_unaugmented(tmp_path):
    from pisam_jax.data import datasets as datasets_lib
    from pisam_jax.data import synthetic

    synthetic.generate(str(tmp_path / "DIS5K" / "DIS-TR"), 3, size=96, seed=0, progress=False)
    ds = datasets_lib.open_datasets(["DIS5K-TR"], str(tmp_path))
    a = fixed_samples(ds, 2, 64)
    assert list(a["name"]) == [s.name for s in ds[0].samples[:2]]
    assert a["image"].shape == (2, 64, 64, 3) and a["mask"].shape == (2, 64, 64) and a["box"].shape == (2, 4)
    assert (a["input_size"] <= 64).all() and (a["input_size"].max(axis=1) == 64).all()  # long side to 64
    b = fixed_samples(ds, 2, 64)
    for k in ("image", "mask", "box", "input_size"):
        np.testing.assert_array_equal(a[k], b[k])
    assert len(fixed_samples(ds, 10, 64)["name"]) == 3
    with pytest.raises(ValueError):
        fixed_samples([], 2, 64)
