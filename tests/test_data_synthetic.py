"""Synthetic thin-structure data: determinism, exact binary masks, the CLI and its layout."""

import os

import numpy as np
import pytest

from pisam_jax.data import synthetic
from pisam_jax.data.datasets import open_folder
from pisam_jax.data.images import read_image, read_mask


def test_deterministic_and_distinct():
    a_img, a_mask, a_kinds = synthetic.generate_sample(3, 1, size=256)
    b_img, b_mask, b_kinds = synthetic.generate_sample(3, 1, size=256)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_kinds == b_kinds
    c_img, _, _ = synthetic.generate_sample(3, 2, size=256)
    d_img, _, _ = synthetic.generate_sample(4, 1, size=256)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_each_structure_draws_a_thin_object(kind):
    img, mask, kinds = synthetic.generate_sample(0, 5, size=384, kinds=(kind,))
    assert kinds == [kind]
    assert img.dtype == np.uint8 and img.ndim == 3 and mask.shape == img.shape[:2]
    assert max(mask.shape) == 384
    assert set(np.unique(mask).tolist()) == {0, 255}  # exact binary mask
    assert 0 < (mask > 0).mean() < 0.6


def test_mask_is_exact_for_the_image():
    """The image is composited from the mask: a pixel's colour comes from fg or bg texture only."""
    img, mask, _ = synthetic.generate_sample(1, 0, size=256)
    fg = mask > 0
    # Inside the object and outside it the colours differ on average (the object is visible).
    assert np.abs(img[fg].mean(0) - img[~fg].mean(0)).mean() > 10


def test_full_size_2048():
    img, mask, _ = synthetic.generate_sample(0, 0, size=2048)
    assert max(img.shape[:2]) == 2048 and min(img.shape[:2]) >= 1152


def test_cli_writes_dis5k_layout(tmp_path):
    out = tmp_path / "DIS5K" / "DIS-TR"
    assert synthetic.main(["--out", str(out), "--n", "3", "--size", "256", "--seed", "2"]) == 0
    assert sorted(os.listdir(out / "im")) == [f"synth_s2_00000{i}.jpg" for i in range(3)]
    assert sorted(os.listdir(out / "gt")) == [f"synth_s2_00000{i}.png" for i in range(3)]
    d = open_folder(str(out / "im"), str(out / "gt"), check="full")
    assert len(d) == 3
    img, mask, _ = synthetic.generate_sample(2, 1, size=256)
    np.testing.assert_array_equal(read_mask(d[1].mask_path), mask)  # PNG: exact
    assert np.abs(read_image(d[1].image_path).astype(int) - img).mean() < 3  # JPEG q95, 4:4:4


def test_cli_same_output_with_workers(tmp_path):
    synthetic.generate(str(tmp_path / "a"), 2, size=128, seed=1, workers=0, progress=False)
    synthetic.generate(str(tmp_path / "b"), 2, size=128, seed=1, workers=2, progress=False)
    for sub, f in (("im", "synth_s1_000001.jpg"), ("gt", "synth_s1_000001.png")):
        assert (tmp_path / "a" / sub / f).read_bytes() == (tmp_path / "b" / sub / f).read_bytes()


def test_cli_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert synthetic.main(["--out", str(blocker / "sub"), "--n", "1", "--size", "64"]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(tmp_path), "--n", "-1"])
    assert e.value.code == 2
