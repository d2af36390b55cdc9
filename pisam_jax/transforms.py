"""Image geometry: resizes, padding and the model-frame conventions (plain functions).

Conventions: images are numpy arrays (H, W) or (H, W, C), row-major, pixel (row, col).
``resize_bilinear`` is PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
without antialias, computed in float32 (exact to float rounding); ``resize_longest_side``
is SAM's ``ResizeLongestSide.apply_image`` (PIL bilinear), bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _as_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _bilinear_taps(n_in: int, n_out: int):
    """Source indices and weights of torch's align_corners=False bilinear along one axis."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src >= 0
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


def _cast_back(out: np.ndarray, dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if dtype == np.bool_:
        return out > 0.5
    return out


def resize_bilinear(image: np.ndarray, size, window=None) -> np.ndarray:
    """Bilinear resize to ``size`` = (h, w) (or an int for a square), no antialias.

    Matches ``torch.nn.functional.interpolate(x, size, mode="bilinear",
    align_corners=False)`` on the float image (to float32 rounding). uint8 in ->
    uint8 out (rounded to nearest), bool -> bool (> 0.5), anything else -> float32.
    ``window`` = (top, left, height, width) returns only that crop of the resized
    image, computing nothing outside it (same values as resize-then-crop).
    """
    image = np.asarray(image)
    out_h, out_w = _as_hw(size)
    in_h, in_w = image.shape[:2]
    top0, left0, win_h, win_w = window if window is not None else (0, 0, out_h, out_w)
    if not (0 <= top0 and 0 <= left0 and top0 + win_h <= out_h and left0 + win_w <= out_w):
        raise ValueError(f"window {window} outside the resized size {(out_h, out_w)}")
    ri0, ri1, rw0, rw1 = (a[top0:top0 + win_h] for a in _bilinear_taps(in_h, out_h))
    ci0, ci1, cw0, cw1 = (a[left0:left0 + win_w] for a in _bilinear_taps(in_w, out_w))
    extra = (1,) * (image.ndim - 2)
    rw0, rw1 = rw0.reshape((-1, 1) + extra), rw1.reshape((-1, 1) + extra)
    cw0, cw1 = cw0.reshape((1, -1) + extra), cw1.reshape((1, -1) + extra)
    src = image.astype(np.uint8) if image.dtype == np.bool_ else image
    # Rows first (gathered in the input dtype, cheap), then columns.
    rows = rw0 * src[ri0].astype(np.float32) + rw1 * src[ri1].astype(np.float32)
    out = np.take(rows, ci0, axis=1) * cw0 + np.take(rows, ci1, axis=1) * cw1
    return _cast_back(out, image.dtype)


def resize_stretch(image: np.ndarray, size=1024) -> np.ndarray:
    """The reference's test-time ``Resize(1024)``: bilinear to size x size, aspect ratio not kept (D7)."""
    return resize_bilinear(image, size)


def longest_side_shape(h: int, w: int, target: int = 1024) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide.get_preprocess_shape``: long side -> target, rounded half up."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, target: int = 1024) -> np.ndarray:
    """SAM's ``ResizeLongestSide(target).apply_image``: PIL bilinear to ``longest_side_shape``.

    ``image`` is uint8 (H, W, 3) or (H, W) (a mask); the result has the same dtype and
    number of channels. Bit-exact with segment_anything's implementation.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"resize_longest_side expects uint8, got {image.dtype}")
    new_h, new_w = longest_side_shape(image.shape[0], image.shape[1], target)
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))


def pad_to_square(image: np.ndarray, size: int = 1024, value=0) -> np.ndarray:
    """Pad bottom and right with ``value`` to (size, size[, C]). Raises if larger than size."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image of size {h}x{w} does not fit in {size}x{size}")
    out = np.full((size, size) + image.shape[2:], value, dtype=image.dtype)
    out[:h, :w] = image
    return out


# --- The model frame: what the predictor and evaluation feed to the network. ---

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


def preprocess(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """SAM's ``Sam.preprocess``: normalise an RGB image (h, w, 3) with h, w <= size, then zero-pad to (size, size, 3)."""
    normalised = (np.asarray(image, np.float32) - PIXEL_MEAN) / PIXEL_STD
    return pad_to_square(normalised, size, 0.0)


def apply_coords(coords: np.ndarray, original_size: tuple[int, int], target: int = 1024) -> np.ndarray:
    """(x, y) pixel coordinates of the original image -> the resized (longest side = target) frame."""
    old_h, old_w = original_size
    new_h, new_w = longest_side_shape(old_h, old_w, target)
    coords = np.array(coords, dtype=np.float64)
    coords[..., 0] *= new_w / old_w
    coords[..., 1] *= new_h / old_h
    return coords.astype(np.float32)


def apply_boxes(boxes: np.ndarray, original_size: tuple[int, int], target: int = 1024) -> np.ndarray:
    """(..., 4) boxes (x0, y0, x1, y1) in original pixels -> the resized frame."""
    boxes = np.asarray(boxes)
    return apply_coords(boxes.reshape(boxes.shape[:-1] + (2, 2)), original_size, target).reshape(boxes.shape)


def postprocess_masks(low_res, input_size: tuple[int, int], original_size: tuple[int, int], size: int = 1024):
    """SAM's ``Sam.postprocess_masks`` in JAX: (..., h, w) logits -> (..., H, W) at the original size.

    Bilinear (no antialias) up to the padded model frame, crop the padding, bilinear to the original size.
    """
    import jax

    lead = low_res.shape[:-2]
    x = jax.image.resize(low_res, lead + (size, size), "linear", antialias=False)
    x = x[..., : input_size[0], : input_size[1]]
    return jax.image.resize(x, lead + tuple(original_size), "linear", antialias=False)
