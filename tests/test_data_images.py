"""Reading images and masks: channels, bit depth, EXIF orientation, errors naming the file."""

import cv2
import numpy as np
import pytest
from PIL import Image

from pisam_jax.data import images


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_rgb_png_roundtrip(tmp_path, rgb):
    p = tmp_path / "a.png"
    Image.fromarray(rgb).save(p)
    out = images.read_image(p)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_is_rgb_not_bgr(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0] = 250  # pure red
    Image.fromarray(img).save(tmp_path / "r.jpg", quality=100)
    out = images.read_image(tmp_path / "r.jpg")
    assert out[..., 0].min() > 230 and out[..., 2].max() < 20


def test_grayscale_replicated(tmp_path, rgb):
    g = rgb[..., 0]
    Image.fromarray(g).save(tmp_path / "g.png")
    out = images.read_image(tmp_path / "g.png")
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_alpha_dropped(tmp_path, rgb):
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(images.read_image(tmp_path / "a.png"), rgb)
    la = np.stack([rgb[..., 1], rgb[..., 2]], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = images.read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out, np.repeat(rgb[..., 1:2], 3, axis=2))


def test_palette_converted(tmp_path, rgb):
    im = Image.fromarray(rgb).quantize(colors=8)
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(images.read_image(tmp_path / "p.png"), np.asarray(im.convert("RGB")))


def test_16bit_gray_scaled(tmp_path):
    g = np.array([[0, 257, 32768, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g)
    np.testing.assert_array_equal(images.read_image(tmp_path / "g16.png")[..., 0], [[0, 1, 128, 255]])
    np.testing.assert_array_equal(images.read_mask(tmp_path / "g16.png"), [[0, 1, 128, 255]])


def test_16bit_rgb_scaled(tmp_path):
    c = np.zeros((1, 3, 3), np.uint16)  # RGB values
    c[0, 0] = [65535, 257, 0]
    c[0, 1] = [1000, 30000, 60000]
    c[0, 2] = [32768, 128, 65280]
    cv2.imwrite(str(tmp_path / "c16.png"), c[..., ::-1])  # cv2 writes BGR
    expect = np.clip(np.rint(c * (255 / 65535)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images.read_image(tmp_path / "c16.png"), expect)
    np.testing.assert_array_equal(images.read_mask(tmp_path / "c16.png"), expect[..., 0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    a = (np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.png", exif=exif.tobytes())
    from PIL import ImageOps
    expect = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    out = images.read_mask(tmp_path / "o.png")
    np.testing.assert_array_equal(out, expect)
    assert images.read_size(tmp_path / "o.png") == out.shape
    if orientation == 6:  # rotate 270 (90 clockwise): (3, 4) -> (4, 3), top-left from bottom-left
        assert out.shape == (4, 3) and out[0, 0] == a[2, 0]


def test_orient_matches_pil_for_arrays():
    """The numpy orientation used for 16-bit colour PNGs (decoded by cv2) equals PIL's."""
    from PIL import ImageOps
    a = (np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    for o in range(1, 9):
        im = Image.fromarray(a)
        exif = im.getexif()
        exif[0x0112] = o
        im.info["exif"] = exif.tobytes()
        im.getexif()[0x0112] = o
        expect = np.asarray(ImageOps.exif_transpose(im))
        np.testing.assert_array_equal(images._orient(a, o), expect)


def test_mask_first_channel(tmp_path):
    m = np.zeros((4, 4, 3), np.uint8)
    m[..., 0] = 200
    m[..., 1] = 10
    Image.fromarray(m).save(tmp_path / "m.png")
    out = images.read_mask(tmp_path / "m.png")
    assert out.dtype == np.uint8 and out.shape == (4, 4) and (out == 200).all()
    Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / "b.png")  # 1-bit mask
    np.testing.assert_array_equal(images.read_mask(tmp_path / "b.png"), np.eye(4) * 255)


def test_binarize_threshold_128():
    np.testing.assert_array_equal(images.binarize(np.array([0, 127, 128, 129, 255], np.uint8)),
                                  [False, False, False, True, True])


def test_corrupt_file_names_file(tmp_path):
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"this is not a jpeg")
    for fn in (images.read_image, images.read_mask, images.read_size):
        with pytest.raises(images.ImageReadError, match="bad.jpg"):
            fn(p)


def test_truncated_jpeg_detected(tmp_path, rgb):
    p = tmp_path / "t.jpg"
    big = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageReadError, match="t.jpg.*corrupt"):
        images.read_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(images.ImageReadError, match="nope.png: file not found"):
        images.read_image(tmp_path / "nope.png")
