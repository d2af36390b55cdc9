"""Dataset registry, pairing by basename and validation (each bad-input case, strict and skip)."""

import os

import numpy as np
import pytest
from PIL import Image

from pisam_jax.data import datasets
from pisam_jax.data.datasets import DatasetError, open_dataset, open_folder


def _write_pair(im_dir, gt_dir, stem, hw=(12, 16), mask_hw=None, seed=0):
    os.makedirs(im_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8)).save(os.path.join(im_dir, stem + ".jpg"))
    m = np.zeros(mask_hw or hw, np.uint8)
    m[2:6, 3:9] = 255
    Image.fromarray(m).save(os.path.join(gt_dir, stem + ".png"))


@pytest.fixture
def root(tmp_path):
    im, gt = tmp_path / "DIS5K/DIS-TR/im", tmp_path / "DIS5K/DIS-TR/gt"
    for i in range(3):
        _write_pair(im, gt, f"s{i}", seed=i)
    return tmp_path


def _dirs(root):
    return root / "DIS5K/DIS-TR/im", root / "DIS5K/DIS-TR/gt"


def test_registry_has_the_paper_sets():
    names = ["DIS5K-TR", "DIS5K-VD", "DIS5K-TE1", "DIS5K-TE2", "DIS5K-TE3", "DIS5K-TE4",
             "ThinObject5K-TR", "ThinObject5K-TE", "HRSOD-TR", "HRSOD-TE", "UHRSD-TR", "UHRSD-TE",
             "BIG-test", "BIG-val", "FSS", "DUTS-TR", "DUTS-TE", "ECSSD", "MSRA10K", "COIFT"]
    for n in names:
        assert n in datasets.DATASETS
    assert datasets.DATASETS["UHRSD-TE"].image_dir == "UHRSD_TE_2K/image"
    assert datasets.DATASETS["HRSOD-TR"].gt_dir == "HRSOD_release/HRSOD_train_mask"
    assert datasets.resolve_names("paper-train") == ["DIS5K-TR", "ThinObject5K-TR", "HRSOD-TR", "UHRSD-TR"]
    assert len(datasets.resolve_names("all-train")) == 9
    assert datasets.resolve_names("ThinObject5k-TE,BIG_test") == ["ThinObject5K-TE", "BIG-test"]
    with pytest.raises(DatasetError, match="unknown dataset 'NOPE'"):
        datasets.resolve_names(["NOPE"])


def test_open_pairs_by_basename(root):
    d = open_dataset("DIS5K-TR", str(root))
    assert len(d) == 3 and [s.name for s in d.samples] == ["s0", "s1", "s2"]
    s = d[1]
    assert s.image_path.endswith("im/s1.jpg") and s.mask_path.endswith("gt/s1.png")
    assert (s.height, s.width) == (12, 16) and s.dataset == "DIS5K-TR" and d.skipped == []
    assert len(open_dataset("DIS5K-TR", str(root), check="full")) == 3


def test_open_datasets_and_groups(root):
    _write_pair(root / "DIS5K/DIS-VD/im", root / "DIS5K/DIS-VD/gt", "v0")
    ds = datasets.open_datasets("DIS5K-TR,DIS5K-VD", str(root))
    assert [len(d) for d in ds] == [3, 1]
    with pytest.raises(DatasetError, match="group"):
        open_dataset("paper-train", str(root))


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"DIS5K/DIS-TR/im: image folder of dataset DIS5K-TR not found"):
        open_dataset("DIS5K-TR", str(tmp_path))
    os.makedirs(tmp_path / "DIS5K/DIS-TR/im")
    with pytest.raises(DatasetError, match=r"DIS-TR/gt: mask folder"):
        open_dataset("DIS5K-TR", str(tmp_path))
    with pytest.raises(DatasetError):  # skip_bad does not hide a missing dataset
        open_dataset("DIS5K-TR", str(tmp_path), skip_bad=True)


def test_unpaired_files(root):
    im, gt = _dirs(root)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(im / "lonely.jpg")
    with pytest.raises(DatasetError, match=r"lonely.jpg: no mask named lonely"):
        open_dataset("DIS5K-TR", str(root))
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(gt / "orphan.png")
    d = open_dataset("DIS5K-TR", str(root), skip_bad=True)
    assert len(d) == 3 and len(d.skipped) == 2
    files = sorted(os.path.basename(f) for f, _ in d.skipped)
    assert files == ["lonely.jpg", "orphan.png"]
    os.remove(im / "lonely.jpg")
    with pytest.raises(DatasetError, match=r"orphan.png: no image named orphan"):
        open_dataset("DIS5K-TR", str(root))


def test_corrupt_image(root):
    im, gt = _dirs(root)
    (im / "s1.jpg").write_bytes(b"garbage, not a jpeg")
    with pytest.raises(DatasetError, match=r"s1.jpg: cannot read the header.*skip_bad"):
        open_dataset("DIS5K-TR", str(root))
    d = open_dataset("DIS5K-TR", str(root), skip_bad=True)
    assert [s.name for s in d.samples] == ["s0", "s2"] and len(d.skipped) == 1
    assert d.skipped[0][0].endswith("s1.jpg")


def test_corrupt_mask(root):
    im, gt = _dirs(root)
    (gt / "s2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"gt/s2.png: cannot read"):
        open_dataset("DIS5K-TR", str(root))


def test_truncated_image_found_by_full_check(root):
    im, gt = _dirs(root)
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(im / "s0.jpg", quality=90)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(gt / "s0.png")
    data = (im / "s0.jpg").read_bytes()
    (im / "s0.jpg").write_bytes(data[: len(data) // 2])
    assert len(open_dataset("DIS5K-TR", str(root))) == 3  # the header is intact
    with pytest.raises(DatasetError, match=r"s0.jpg: cannot decode"):
        open_dataset("DIS5K-TR", str(root), check="full")
    d = open_dataset("DIS5K-TR", str(root), check="full", skip_bad=True)
    assert len(d) == 2 and len(d.skipped) == 1


def test_size_mismatch(root):
    im, gt = _dirs(root)
    _write_pair(im, gt, "s1", hw=(12, 16), mask_hw=(16, 12))
    with pytest.raises(DatasetError, match=r"s1.jpg: image is 12x16 but its mask .*s1.png is 16x12"):
        open_dataset("DIS5K-TR", str(root))
    d = open_dataset("DIS5K-TR", str(root), skip_bad=True)
    assert len(d) == 2 and "12x16" in d.skipped[0][1]


def test_skip_reports_count(root, caplog):
    im, gt = _dirs(root)
    (im / "s0.jpg").write_bytes(b"bad")
    _write_pair(im, gt, "s2", mask_hw=(3, 3))
    with caplog.at_level("WARNING"):
        d = open_dataset("DIS5K-TR", str(root), skip_bad=True)
    assert len(d) == 1 and len(d.skipped) == 2
    assert "skipped 2 bad sample" in caplog.text


def test_same_folder_layout(tmp_path):
    folder = tmp_path / "DUTS-TR"
    _write_pair(folder, folder, "a")
    _write_pair(folder, folder, "b")
    d = open_dataset("DUTS-TR", str(tmp_path))
    assert [s.name for s in d.samples] == ["a", "b"]
    assert d[0].image_path.endswith("a.jpg") and d[0].mask_path.endswith("a.png")


def test_duplicate_basename(root):
    im, gt = _dirs(root)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(im / "s0.png")
    with pytest.raises(DatasetError, match="share the basename 's0'"):
        open_folder(str(im), str(gt))
