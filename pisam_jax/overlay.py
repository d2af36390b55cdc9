"""Pictures people look at: a mask over its image with its outline, the box and the clicks that made it, and a
prediction compared with the ground truth (true positives, false positives, false negatives).

Colours stay apart for colour-blind readers (checked in tests/test_overlay.py by simulating protanopia,
deuteranopia and tritanopia) and stay visible on any image: outlines are a light line between two dark ones,
markers and the box have a dark edge, and the comparison paints over a darkened grey copy of the image.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw

MASK_COLOUR = np.array([30, 144, 255], np.float32)  # blue, as in SAM's notebooks
OUTLINE = (255, 255, 255)  # the mask's outline: white between two black lines
EDGE = (0, 0, 0)
FOREGROUND = (86, 180, 233)  # Okabe-Ito sky blue: a click that adds
BACKGROUND = (213, 94, 0)  # Okabe-Ito vermillion: a click that removes
BOX = (255, 215, 0)
TRUE_POSITIVE = (86, 180, 233)  # sky blue: in the prediction and the ground truth
FALSE_POSITIVE = (213, 94, 0)  # vermillion: predicted, not in the ground truth
FALSE_NEGATIVE = (240, 228, 66)  # Okabe-Ito yellow: in the ground truth, missed
BACKDROP = 0.35  # the comparison's backdrop: the image in grey at 35% brightness (L* <= 38)


def mark_scale(shape: tuple[int, ...]) -> int:
    """Line width in pixels for marks on an image of this (H, W, ...) shape: 2 up to 640 px, then about one more
    per 256 px."""
    return max(2, round(max(shape[:2]) / 256))


def outline(mask: np.ndarray, width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The mask's outline as (light, dark) (H, W) bool: ``light`` the band ``width`` px wide inside the mask's
    border, ``dark`` one pixel on either side of it. Pixels beyond the image count as background, so a mask
    that fills the whole image is outlined along the image's border."""
    m = np.asarray(mask, np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    inner = cv2.erode(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    light = (m > 0) & (inner == 0)
    around = cv2.dilate(light.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                        borderValue=0)
    return light, (around > 0) & ~light


def draw_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    box: np.ndarray | None = None,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """image (H, W, 3) uint8, mask (H, W) bool: the mask filled at ``alpha`` and outlined; box (4,) x0 y0 x1 y1;
    points (N, 2) (x, y) with labels (N,) 1 foreground / 0 background."""
    mask = np.asarray(mask, bool)
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * MASK_COLOUR
    scale = mark_scale(image.shape)
    light, dark = outline(mask, max(1, scale // 2))
    out[dark] = EDGE
    out[light] = OUTLINE
    canvas = Image.fromarray(out.round().astype(np.uint8))
    draw_prompts(canvas, box=box, points=points, labels=labels, scale=scale)
    return canvas


def draw_prompts(canvas: Image.Image, *, box=None, points=None, labels=None, scale: int = 2) -> None:
    """Draws the box (gold, dark-edged) and the clicks (discs: sky blue foreground, vermillion background, white
    ring) on ``canvas`` in place; coordinates in its pixels."""
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=EDGE, width=scale + 2)
        draw.rectangle([x0, y0, x1, y1], outline=BOX, width=scale)
    if points is not None:
        r = 3 * scale
        for (x, y), label in zip(np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels).reshape(-1)):
            colour = FOREGROUND if label == 1 else BACKGROUND
            draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], fill=EDGE)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255), width=max(1, scale // 2))


def draw_errors(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """The prediction against the ground truth over a darkened grey copy of the image: true positives sky blue,
    false positives vermillion, false negatives yellow. (H, W, 3) uint8.

    image (H, W, 3) uint8, gt and pred (H, W) bool. ``size`` (h, w): a smaller picture, where each pixel takes the
    colours of the classes it covers in proportion, doubled (a structure half a pixel wide shows at full colour),
    so that thin structures and thin errors survive the shrinking.
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    classes = np.stack([gt & pred, pred & ~gt, gt & ~pred], axis=-1).astype(np.float32)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) * BACKDROP
    if size is not None and tuple(size) != gt.shape:
        h, w = size
        classes = cv2.resize(classes, (w, h), interpolation=cv2.INTER_AREA)
        grey = cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)
    cover = classes.sum(-1, keepdims=True)
    colour = classes @ np.array([TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE], np.float32) / np.maximum(cover, 1e-6)
    weight = np.minimum(1.0, 2.0 * cover)
    out = (1 - weight) * grey[..., None] + weight * colour
    return np.clip(out.round(), 0, 255).astype(np.uint8)
