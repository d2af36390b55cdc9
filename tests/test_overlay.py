"""Pictures: the mask's outline, the comparison with the ground truth, and colours that colour-blind readers tell
apart (simulated with the colour-vision-deficiency matrices of Machado, Oliveira and Fernandes 2009, severity 1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from skimage.color import deltaE_ciede2000, rgb2lab

from pisam_jax import overlay

# Machado et al. (2009), Table: severity 1.0, applied to linear RGB.
DEFICIENCIES = {
    "normal": np.eye(3),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
# CIEDE2000 of 20 is a difference seen at a glance. The palettes it rules out: SAM-style green/red clicks
# ((0, 200, 0) / (220, 30, 30): 13.8 for deuteranopes) and blue/orange/reddish purple classes (10.9).
MIN_DELTA_E = 20


def seen(colour, deficiency: str) -> np.ndarray:
    """An sRGB colour as seen with ``deficiency``, in CIELAB."""
    c = np.asarray(colour, np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    linear = np.clip(DEFICIENCIES[deficiency] @ linear, 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return rgb2lab(srgb[None, None])[0, 0]


def smallest_difference(colours) -> float:
    return min(deltaE_ciede2000(seen(a, d), seen(b, d))
               for d in DEFICIENCIES for a, b in itertools.combinations(colours, 2))


def test_the_rule_rejects_the_palettes_it_should():
    assert smallest_difference([(0, 200, 0), (220, 30, 30)]) < MIN_DELTA_E
    assert smallest_difference([(0, 114, 178), (230, 159, 0), (204, 121, 167)]) < MIN_DELTA_E


@pytest.mark.parametrize("colours", [
    (overlay.TRUE_POSITIVE, overlay.FALSE_POSITIVE, overlay.FALSE_NEGATIVE),
    (overlay.FOREGROUND, overlay.BACKGROUND),
], ids=["comparison", "clicks"])
def test_colours_stay_apart_for_colour_blind_readers(colours):
    assert smallest_difference(colours) >= MIN_DELTA_E


def test_comparison_colours_stand_out_of_the_darkened_image():
    """Against the backdrop's brightest grey (a white pixel at 35%), each class colour differs at a glance too."""
    brightest = (round(255 * overlay.BACKDROP),) * 3
    for colour in (overlay.TRUE_POSITIVE, overlay.FALSE_POSITIVE, overlay.FALSE_NEGATIVE):
        assert smallest_difference([colour, brightest]) >= MIN_DELTA_E, colour


def test_outline_is_a_light_band_between_dark_lines():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    light, dark = overlay.outline(mask, 1)
    ring = mask.copy()
    ring[6:14, 6:14] = False
    np.testing.assert_array_equal(light, ring)  # the square's own border pixels
    outside = np.zeros_like(mask)
    outside[4:16, 4:16] = True
    outside[5:15, 5:15] = False
    inside = np.zeros_like(mask)
    inside[6:14, 6:14] = True
    inside[7:13, 7:13] = False
    np.testing.assert_array_equal(dark, outside | inside)
    wide, _ = overlay.outline(mask, 2)
    assert wide.sum() == 100 - 36  # two pixels deep
    assert not any(a.any() for a in overlay.outline(np.zeros((8, 8), bool), 1))


def test_overlay_outlines_a_mask_that_fills_the_image():
    """A whole-image mask is more than a tint: its outline runs along the image's border."""
    image = np.full((40, 60, 3), 90, np.uint8)
    picture = np.asarray(overlay.draw_overlay(image, np.ones((40, 60), bool)))
    assert (picture[0] == overlay.OUTLINE).all() and (picture[:, -1] == overlay.OUTLINE).all()
    assert (picture[1, 1:-1] == overlay.EDGE).all()  # the dark line inside the light one
    inner = picture[5:-5, 5:-5].reshape(-1, 3)
    np.testing.assert_array_equal(inner[0], np.round(0.5 * 90 + 0.5 * overlay.MASK_COLOUR))


def test_errors_colour_each_class_and_keep_thin_ones_when_shrunk():
    image = np.full((64, 64, 3), 200, np.uint8)
    gt = np.zeros((64, 64), bool)
    pred = np.zeros((64, 64), bool)
    gt[8:24, 8:24] = pred[8:24, 8:24] = True  # true positive
    pred[40:56, 8:24] = True  # false positive
    gt[8:24, 40:56] = True  # false negative
    gt[:, 60] = True  # a one-pixel false negative line
    out = overlay.draw_errors(image, gt, pred)
    assert tuple(out[16, 16]) == overlay.TRUE_POSITIVE
    assert tuple(out[48, 16]) == overlay.FALSE_POSITIVE
    assert tuple(out[16, 48]) == overlay.FALSE_NEGATIVE
    assert tuple(out[48, 48]) == (70, 70, 70)  # backdrop: grey at 35%
    small = overlay.draw_errors(image, gt, pred, size=(16, 16))  # 4x smaller: the line covers 1/4 of its pixels
    line = small[4, 15].astype(int)  # weight 2 * 1/4: half yellow, half backdrop
    np.testing.assert_allclose(line, 0.5 * np.array(overlay.FALSE_NEGATIVE) + 0.5 * 70, atol=1)
