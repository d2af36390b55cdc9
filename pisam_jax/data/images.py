"""Reading images and masks into the loader's conventions.

* Images: uint8 RGB (H, W, 3). Grayscale is replicated to 3 channels, alpha is
  dropped, 16-bit data is scaled to 8 bits (round(v * 255 / 65535)), palette and
  CMYK images are converted to RGB, and the EXIF orientation is applied.
* Masks: uint8 (H, W) 0..255, the first channel of whatever is stored (as the
  reference's loader does), with the same conversions. Foreground is ``mask > 128``
  (``binarize``).

Every failure raises ``ImageReadError`` naming the file. A source is a path, or the file's
bytes or a seekable binary file object (an image inside an archive or a TFDS record) with
``name`` for the messages.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = None  # high-resolution datasets exceed PIL's bomb guard

FOREGROUND_THRESHOLD = 128


Source = Union[str, os.PathLike, bytes, BinaryIO]


class ImageReadError(ValueError):
    """An image or mask file cannot be read; the message names the file."""


def _source(src: Source, name: str | None) -> tuple[str | BinaryIO, str]:
    """(a path or a seekable binary file object, the name for messages)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(src), name or "<bytes>"
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        return path, name or path
    return src, name or str(getattr(src, "name", "<file>"))


def _rewind(f: str | BinaryIO) -> str | BinaryIO:
    """A file object back at its start (every reader below reads from the start)."""
    if not isinstance(f, str):
        f.seek(0)
    return f


def _open(f: str | BinaryIO, path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(_rewind(f))
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


def _is_png16_color(f: str | BinaryIO) -> bool:
    """PIL reduces 16-bit colour PNGs to 8 bits by truncation; detect them to scale exactly."""
    if isinstance(f, str):
        with open(f, "rb") as fh:
            head = fh.read(26)
    else:
        head = _rewind(f).read(26)
    # A truncated header is not a 16-bit PNG; the decoder then reports the file as corrupt.
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] in (2, 6)


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W[, C]) array, as ImageOps.exif_transpose."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a[::-1], 0, 1),
           7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
           8: lambda a: np.swapaxes(a[:, ::-1], 0, 1)}
    return ops[orientation](arr) if orientation in ops else arr


def _decode_png16_color(f: str | BinaryIO, path: str) -> np.ndarray:
    import cv2

    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    if isinstance(f, str):
        arr = cv2.imread(f, flags)
    else:
        arr = cv2.imdecode(np.frombuffer(_rewind(f).read(), np.uint8), flags)
    if arr is None or arr.ndim != 3:
        raise ImageReadError(f"{path}: cannot decode the 16-bit PNG; the file is corrupt")
    arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
    try:
        with Image.open(_rewind(f)) as im:
            orientation = im.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return _orient(arr, orientation)


def _decode(f: str | BinaryIO, path: str) -> np.ndarray:
    if (not isinstance(f, str) or os.path.isfile(f)) and _is_png16_color(f):
        return _to_uint8(np.ascontiguousarray(_decode_png16_color(f, path)))
    arr = _pil_to_array(_open(f, path))
    if arr.ndim == 3 and arr.shape[2] == 0 or arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(f"{path}: unsupported image layout {arr.shape}")
    return _to_uint8(arr)


def read_image(src: Source, name: str | None = None) -> np.ndarray:
    """uint8 RGB (H, W, 3); see the module docstring for the conversions and sources."""
    arr = _decode(*_source(src, name))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 2:  # LA: gray + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    else:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def read_mask(src: Source, name: str | None = None) -> np.ndarray:
    """uint8 (H, W) 0..255: the first channel of the stored mask."""
    arr = _decode(*_source(src, name))
    if arr.ndim == 3:
        arr = arr[:, :, 0]
    return np.ascontiguousarray(arr)


def read_size(src: Source, name: str | None = None) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only (no full decode)."""
    f, path = _source(src, name)
    try:
        with Image.open(_rewind(f)) as im:
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
