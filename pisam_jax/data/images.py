"""Reading images and masks into the loader's conventions.

* Images: uint8 RGB (H, W, 3). Grayscale is replicated to 3 channels, alpha is
  dropped, 16-bit data is scaled to 8 bits (round(v * 255 / 65535)), palette and
  CMYK images are converted to RGB, and the EXIF orientation is applied.
* Masks: uint8 (H, W) 0..255, the first channel of whatever is stored (as the
  reference's loader does), with the same conversions. Foreground is ``mask > 128``
  (``binarize``).

Every failure raises ``ImageReadError`` naming the file.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = None  # high-resolution datasets exceed PIL's bomb guard

FOREGROUND_THRESHOLD = 128


class ImageReadError(ValueError):
    """An image or mask file cannot be read; the message names the file."""


def _open(path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(path)
            im.load()
            return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageReadError(
            f"{path}: cannot decode ({type(e).__name__}: {e}); the file is corrupt or "
            "not an image; replace or remove it"
        ) from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):  # mode "F": assume 0..1 if so, else 0..255
        arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    # 16-bit (PIL modes I;16*, or I holding 16-bit PNG data)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """Array (H, W) or (H, W, C), before channel handling; palette/CMYK/YCbCr -> RGB(A)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    return np.asarray(im)


def _is_png16_color(path: str) -> bool:
    """PIL reduces 16-bit colour PNGs to 8 bits by truncation; detect them to scale exactly."""
    with open(path, "rb") as f:
        head = f.read(26)
    # A truncated header is not a 16-bit PNG; the decoder then reports the file as corrupt.
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] in (2, 6)


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W[, C]) array, as ImageOps.exif_transpose."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a[::-1], 0, 1),
           7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
           8: lambda a: np.swapaxes(a[:, ::-1], 0, 1)}
    return ops[orientation](arr) if orientation in ops else arr


def _decode_png16_color(path: str) -> np.ndarray:
    import cv2

    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None or arr.ndim != 3:
        raise ImageReadError(f"{path}: cannot decode the 16-bit PNG; the file is corrupt")
    arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return _orient(arr, orientation)


def _decode(path: str) -> np.ndarray:
    if os.path.isfile(path) and _is_png16_color(path):
        return _to_uint8(np.ascontiguousarray(_decode_png16_color(path)))
    arr = _pil_to_array(_open(path))
    if arr.ndim == 3 and arr.shape[2] == 0 or arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(f"{path}: unsupported image layout {arr.shape}")
    return _to_uint8(arr)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB (H, W, 3); see the module docstring for the conversions."""
    path = os.fspath(path)
    arr = _decode(path)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 2:  # LA: gray + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    else:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W) 0..255: the first channel of the stored mask."""
    path = os.fspath(path)
    arr = _decode(path)
    if arr.ndim == 3:
        arr = arr[:, :, 0]
    return np.ascontiguousarray(arr)


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only (no full decode)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:
        raise ImageReadError(
            f"{path}: cannot read the header ({type(e).__name__}: {e}); the file is corrupt "
            "or not an image; replace or remove it"
        ) from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def binarize(mask: np.ndarray) -> np.ndarray:
    """Foreground of a 0..255 mask: ``mask > 128``."""
    return np.asarray(mask) > FOREGROUND_THRESHOLD
