"""Readers of the interactive-segmentation benchmarks, on files generated in their published layouts."""

import numpy as np
import pytest
from PIL import Image

from pisam_jax.data import datasets
from pisam_jax.data.datasets import open_dataset, read_labels


def _image(path, hw=(10, 14), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, hw + (3,), np.uint8)).save(path)


def _mask(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)


def _grabcut_mask(hw=(10, 14)):
    """GrabCut's boundary_GT: 255 object, 128 the unlabelled band around it, 0 background."""
    m = np.zeros(hw, np.uint8)
    m[2:8, 3:11] = 128
    m[3:7, 4:10] = 255
    return m


def test_grabcut_layout_and_its_unlabelled_band(tmp_path):
    """GrabCut/data_GT holds .jpg and .bmp images, GrabCut/boundary_GT .bmp masks paired by name."""
    _image(tmp_path / "GrabCut/data_GT/banana1.bmp")
    _image(tmp_path / "GrabCut/data_GT/flower.jpg", seed=1)
    for name in ("banana1", "flower"):
        _mask(tmp_path / f"GrabCut/boundary_GT/{name}.bmp", _grabcut_mask())
    ds = open_dataset("GrabCut", str(tmp_path))
    assert [s.name for s in ds.samples] == ["banana1", "flower"] and ds.labels == datasets.GRABCUT_LABELS
    fg, ignore = read_labels(ds.samples[0].mask_path, ds.labels)
    assert fg.sum() == 24 and ignore.sum() == 48 - 24 and not (fg & ignore).any()
    assert read_labels(ds.samples[0].mask_path)[1] is None  # the default rule has no ignored pixels


def test_berkeley_reads_as_grabcut(tmp_path):
    _image(tmp_path / "Berkeley/images/22.jpg")
    _mask(tmp_path / "Berkeley/masks/22.png", _grabcut_mask())
    ds = open_dataset("Berkeley", str(tmp_path))
    fg, ignore = read_labels(ds.samples[0].mask_path, ds.labels)
    assert len(ds) == 1 and fg.sum() == 24 and ignore.sum() == 24


def test_davis_object_is_any_nonzero_channel(tmp_path):
    """DAVIS/img + DAVIS/gt; RITM takes any non-zero value of any channel as the object: a dark green mask
    counts, which the default rule (first channel > 128) would miss."""
    _image(tmp_path / "DAVIS/img/bear.jpg")
    m = np.zeros((10, 14, 3), np.uint8)
    m[1:4, 2:6, 1] = 60
    _mask(tmp_path / "DAVIS/gt/bear.png", m)
    ds = open_dataset("DAVIS", str(tmp_path))
    fg, ignore = read_labels(ds.samples[0].mask_path, ds.labels)
    assert fg.sum() == 12 and ignore is None
    assert read_labels(ds.samples[0].mask_path)[0].sum() == 0


def test_hqseg_validation_sets(tmp_path):
    """HQ-SAM's valid set: DIS5K/DIS-VD and, under thin_object_detection/, COIFT, HRSOD (masks_max255) and
    ThinObject5K's test split."""
    layouts = {"DIS5K-VD": ("DIS5K/DIS-VD/im", "DIS5K/DIS-VD/gt"),
               "HQSeg-COIFT": ("thin_object_detection/COIFT/images", "thin_object_detection/COIFT/masks"),
               "HQSeg-HRSOD": ("thin_object_detection/HRSOD/images", "thin_object_detection/HRSOD/masks_max255"),
               "HQSeg-ThinObject5K-TE": ("thin_object_detection/ThinObject5K/images_test",
                                         "thin_object_detection/ThinObject5K/masks_test")}
    m = np.zeros((10, 14), np.uint8)
    m[2:5, 2:5] = 255
    for i, (im, gt) in enumerate(layouts.values()):
        _image(tmp_path / im / f"s{i}.jpg", seed=i)
        _mask(tmp_path / gt / f"s{i}.png", m)
    assert datasets.resolve_names("hqseg-val") == list(layouts)
    for name in datasets.resolve_names("hqseg-val"):
        ds = open_dataset(name, str(tmp_path))
        assert len(ds) == 1 and read_labels(ds.samples[0].mask_path, ds.labels)[0].sum() == 9
    assert datasets.resolve_names("interactive") == ["GrabCut", "Berkeley", "DAVIS"]


def test_bad_label_rule():
    with pytest.raises(ValueError, match="channels must be 'first' or 'max'"):
        read_labels("x.png", datasets.MaskLabels(channels="mean"))
