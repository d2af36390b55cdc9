"""Pictures people look at: a mask over its image, with the box and the clicks that made it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

MASK_COLOUR = np.array([30, 144, 255], np.float32)  # blue, as in SAM's notebooks
FOREGROUND = (0, 200, 0)
BACKGROUND = (220, 30, 30)
BOX = (255, 215, 0)


def draw_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    box: np.ndarray | None = None,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """image (H, W, 3) uint8, mask (H, W) bool; box (4,) x0 y0 x1 y1; points (N, 2) (x, y) with labels (N,) 1 fg / 0 bg."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * MASK_COLOUR
    canvas = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    scale = max(2, round(max(image.shape[:2]) / 256))  # marks stay visible on large images
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=BOX, width=scale)
    if points is not None:
        for (x, y), label in zip(points, labels):
            r = 3 * scale
            colour = FOREGROUND if label == 1 else BACKGROUND
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255), width=max(1, scale // 2))
    return canvas
