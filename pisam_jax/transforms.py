"""Image geometry: resizes, padding and the model-frame conventions (plain functions).

Conventions: images are numpy arrays (H, W) or (H, W, C), row-major, pixel (row, col), values
0..255 (uint8, or float without rounding). ``resize_bilinear`` is PyTorch's
``F.interpolate(mode="bilinear", align_corners=False)`` without antialias on the float values,
computed in float32 (exact to float rounding) and never rounded back to uint8, as the Pi-SAM
reference resizes float tensors (PISAM_SPEC 5.3, 7.2); ``resize_longest_side`` is SAM's
``ResizeLongestSide.apply_image`` (PIL bilinear), bit for bit on uint8.
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
    """Source indices and weights of torch's align_corners=False bilinear along one axis.

    torch's CPU kernel computes the source coordinate ``scale * (i + 0.5) - 0.5`` in float32 with one
    fused multiply-add (a single rounding); so do we (exact in float64, then rounded once), or the
    weights would differ by an ulp of the coordinate (up to ~4e-3 on 0..255 values, 3000-px side).
    """
    scale = np.float32(n_in) / np.float32(n_out)
    centres = np.arange(n_out, dtype=np.float64) + 0.5
    src = (centres * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src >= 0
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


def resize_bilinear(image: np.ndarray, size, window=None) -> np.ndarray:
    """Bilinear resize to ``size`` = (h, w) (or an int for a square), no antialias: float32 out.

    Matches ``torch.nn.functional.interpolate(x, size, mode="bilinear",
    align_corners=False)`` on the image's values as float (to float32 rounding), for any
    real input dtype; the result is not rounded (a uint8 image gives fractional values).
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
    # Rows first (gathered in the input dtype, cheap), then columns.
    rows = rw0 * image[ri0].astype(np.float32) + rw1 * image[ri1].astype(np.float32)
    return np.take(rows, ci0, axis=1) * cw0 + np.take(rows, ci1, axis=1) * cw1


def resize_stretch(image: np.ndarray, size=1024) -> np.ndarray:
    """The reference's test-time ``Resize(1024)``: bilinear to size x size, aspect ratio not kept, float32
    out, not rounded (D7, PISAM_SPEC 7.2)."""
    return resize_bilinear(image, size)


def longest_side_shape(h: int, w: int, target: int = 1024) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide.get_preprocess_shape``: long side -> target, rounded half up."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, target: int = 1024) -> np.ndarray:
    """SAM's ``ResizeLongestSide(target).apply_image``: PIL bilinear to ``longest_side_shape``.

    ``image`` is (H, W, 3) or (H, W) (a mask), uint8 or float 0..255. uint8 gives uint8,
    bit-exact with segment_anything's implementation; float gives float32 from the same PIL
    filter run per channel on the float values, not rounded. An image already of that
    shape is returned unchanged.
    """
    image = np.asarray(image)
    new_h, new_w = longest_side_shape(image.shape[0], image.shape[1], target)
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"resize_longest_side expects uint8 or float, got {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if image.shape[:2] == (new_h, new_w):
        return image
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c])).resize(
        (new_w, new_h), Image.BILINEAR)) for c in range(planes.shape[-1])], axis=-1)
    return out[..., 0] if image.ndim == 2 else out


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


def box_problem(box, width: int, height: int) -> str | None:
    """What is wrong with a box (x0, y0, x1, y1) in pixels of a width x height image, as words that follow the
    box in a message ("box (...) is inverted; ..."), or None when it is a valid prompt."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        return "has a corner that is not a finite number"
    if x1 < x0 or y1 < y0:
        return "is inverted; give x0 < x1 and y0 < y1"
    if x1 == x0 or y1 == y0:
        return "has zero area; give x0 < x1 and y0 < y1"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return f"lies outside the {width}x{height} image"
    return None


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
