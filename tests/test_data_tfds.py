"""TFDS builders (pisam_jax.data.tfds): prepared from folders or zips without TensorFlow, read back as the same
examples in the same order as the folder readers, through the training pipeline, train.py's data and eval.py.

Small synthetic DIS5K folders (256 px) stand for the downloads.
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pisam_jax.data import datasets, pipeline, synthetic
from pisam_jax.data import tfds as tfds_data  # registers the builders
from pisam_jax.data.datasets import DatasetError

ROOT = Path(__file__).resolve().parents[1]
AUG = pipeline.TrainAugment(size=256)  # small crops: the comparison is of pixels, not of the size


def _write_split(root, folder, n, seed):
    synthetic.generate(str(root / "DIS5K" / folder), n=n, size=256, seed=seed, progress=False)


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    """A manual folder with DIS5K's TR (5 pairs) and TE1 (2 pairs) extracted; VD and TE2-4 absent."""
    root = tmp_path_factory.mktemp("manual")
    _write_split(root, "DIS-TR", 5, 0)
    _write_split(root, "DIS-TE1", 2, 1)
    return root


PREPARE_AND_READ = textwrap.dedent("""
    import json, sys
    import tensorflow_datasets as tfds
    import pisam_jax.data.tfds as tfds_data
    from pisam_jax.data import pipeline

    manual, data_dir = sys.argv[1:]
    tfds.builder("dis5k", data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    ds = tfds.data_source("dis5k", split="train", data_dir=data_dir)
    first = ds[0]
    batch = next(iter(pipeline.train_dataset([tfds_data.open_dataset("DIS5K-TR", data_dir)], batch_size=2,
                                             augment=pipeline.TrainAugment(size=256), shard_index=0, shard_count=1)))
    print(json.dumps(dict(tensorflow=sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"),
                          splits=sorted(tfds.builder("dis5k", data_dir=data_dir).info.splits), n=len(ds),
                          image_shape=list(first["image"].shape), file_name=first["file_name"].decode(),
                          batch_shape=list(batch["image"].shape))))
""")


@pytest.fixture(scope="module")
def prepared(manual, tmp_path_factory):
    """dis5k prepared from ``manual`` with the plain TFDS API, in a fresh interpreter that never imports TF."""
    data_dir = tmp_path_factory.mktemp("tfds")
    r = subprocess.run([sys.executable, "-c", PREPARE_AND_READ, str(manual), str(data_dir)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    return data_dir, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_prepared_and_read_without_tensorflow(prepared):
    data_dir, out, stderr = prepared
    assert out["tensorflow"] == []  # neither tensorflow nor any of its modules was imported
    assert out["splits"] == ["te1", "train"] and out["n"] == 5
    assert out["image_shape"][2] == 3 and out["file_name"] == "synth_s0_000000.jpg"
    assert out["batch_shape"] == [2, 256, 256, 3]
    for split in ("validation", "te2", "te3", "te4"):  # the absent splits: skipped with a message
        assert f"split '{split}' skipped" in stderr
    assert sorted(p.name for p in (data_dir / "dis5k" / "1.0.0").glob("*.array_record*")) == [
        "dis5k-te1.array_record-00000-of-00001", "dis5k-train.array_record-00000-of-00001"]


def test_records_are_the_files(manual, prepared):
    """Each record holds the image and mask files' bytes (no re-encoding), their names and the image size, in
    the folder reader's order."""
    data_dir = prepared[0]
    for name, split in (("DIS5K-TR", "train"), ("DIS5K-TE1", "te1")):
        folder = datasets.open_dataset(name, str(manual))
        src = tfds.data_source("dis5k", split=split, data_dir=str(data_dir), decoders=tfds_data.reader.RAW)
        assert len(src) == len(folder)
        for s, rec in zip(folder.samples, src):
            assert rec["image"] == Path(s.image_path).read_bytes()
            assert rec["mask"] == Path(s.mask_path).read_bytes()
            assert rec["file_name"].decode() == Path(s.image_path).name
            assert rec["mask_file_name"].decode() == Path(s.mask_path).name
            assert (rec["height"], rec["width"]) == (s.height, s.width)


def test_same_samples_and_pixels(manual, prepared):
    folder = datasets.open_dataset("DIS5K-TR", str(manual))
    ds = tfds_data.open_dataset("DIS5K-TR", str(prepared[0]))
    assert ds.name == "DIS5K-TR"
    assert [(s.name, s.height, s.width) for s in ds] == [(s.name, s.height, s.width) for s in folder]
    a, b = folder.samples[3], ds.samples[3]
    assert b.image_path == "dis5k:train[3] synth_s0_000003.jpg"
    np.testing.assert_array_equal(a.read_image(), b.read_image())
    np.testing.assert_array_equal(a.read_mask(), b.read_mask())
    for x, y in zip(a.read(), b.read()):
        np.testing.assert_array_equal(x, y)
    assert b.image_file().read() == Path(a.image_path).read_bytes()  # what the evaluation gallery opens


def test_images_read_from_bytes_as_from_paths(tmp_path):
    """A record's bytes (or a zip member's file object) decode exactly as the file does: the special cases of
    ``images`` (16-bit colour PNG scaling, EXIF orientation) included; errors name the given name."""
    import io

    import cv2
    from PIL import Image

    from pisam_jax.data import images

    rng = np.random.default_rng(0)
    c16 = tmp_path / "c16.png"
    cv2.imwrite(str(c16), rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16))
    rotated = tmp_path / "o.jpg"
    im = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(rotated, exif=exif.tobytes())
    for path in (c16, rotated):
        data = path.read_bytes()
        for src in (data, io.BytesIO(data)):
            np.testing.assert_array_equal(images.read_image(src, "x"), images.read_image(path))
            np.testing.assert_array_equal(images.read_mask(src, "x"), images.read_mask(path))
            assert images.read_size(src, "x") == images.read_size(path)
    assert images.read_size(rotated) == (9, 6) and images.read_image(c16).dtype == np.uint8
    with pytest.raises(images.ImageReadError, match=r"^dis5k:train\[3\] a.jpg: cannot decode"):
        images.read_image(b"not an image", "dis5k:train[3] a.jpg")


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_training_batches_same_from_both_sources(manual, prepared):
    """Same seed, same batches: shuffling, augmentation, per-process rows and resume work on both sources."""
    folder = [datasets.open_dataset(n, str(manual)) for n in ("DIS5K-TR", "DIS5K-TE1")]
    tf = tfds_data.open_datasets("DIS5K-TR,DIS5K-TE1", str(prepared[0]))
    kw = dict(batch_size=2, seed=7, augment=AUG, threads=2)
    for index in range(2):  # process 0 and 1 of 2: each its rows of the global batches
        a = iter(pipeline.train_dataset(folder, shard_index=index, shard_count=2, **kw))
        b = iter(pipeline.train_dataset(tf, shard_index=index, shard_count=2, **kw))
        _assert_same(_batches(a, 5), _batches(b, 5))  # 5 global batches of 4 > 7 images: into the 2nd epoch
    b = iter(pipeline.train_dataset(tf, shard_index=0, shard_count=1, **kw))
    _batches(b, 2)
    state = b.get_state()
    expected = _batches(b, 2)
    resumed = iter(pipeline.train_dataset(tf, shard_index=0, shard_count=1, **kw))
    resumed.set_state(state)
    _assert_same(_batches(resumed, 2), expected)
    first = next(iter(pipeline.train_dataset(folder, shard_index=0, shard_count=1, **kw)))
    assert not np.array_equal(first["image"], expected[0]["image"])  # the comparison can tell batches apart


def test_eval_samples_same_from_both_sources(manual, prepared):
    folder = datasets.open_dataset("DIS5K-TE1", str(manual))
    tf = tfds_data.open_dataset("DIS5K-TE1", str(prepared[0]))
    for geometry in ("stretch", "longest_side"):
        a = pipeline.eval_dataset(folder, geometry=geometry, keep_gt=True, shard_index=0, shard_count=1)
        b = pipeline.eval_dataset(tf, geometry=geometry, keep_gt=True, shard_index=0, shard_count=1)
        for x, y in zip(a, b, strict=True):
            for k in ("image", "mask", "box", "has_object", "input_size", "original_size", "gt"):
                np.testing.assert_array_equal(x[k], y[k])
            assert x["name"] == y["name"] and x["dataset"] == y["dataset"] == "DIS5K-TE1"


def test_zip_archive_gives_the_same_dataset(manual, prepared, tmp_path):
    """The manual folder may hold the archive instead: read in place, below a prefix folder (HQSeg-44K's data/),
    macOS resource forks ignored."""
    m = tmp_path / "m"
    m.mkdir()
    with zipfile.ZipFile(m / "DIS5K.zip", "w") as z:
        for p in sorted((manual / "DIS5K").rglob("*")):
            if p.is_file():
                z.write(p, "data/" + p.relative_to(manual).as_posix())
        z.writestr("__MACOSX/data/DIS5K/DIS-TR/im/._synth_s0_000000.jpg", b"resource fork")
    builder = tfds_data.prepare("dis5k", str(tmp_path / "d"), str(m), progress=False)
    assert sorted(builder.info.splits) == ["te1", "train"]
    for split in ("train", "te1"):
        a = tfds.data_source("dis5k", split=split, data_dir=str(prepared[0]), decoders=tfds_data.reader.RAW)
        b = tfds.data_source("dis5k", split=split, data_dir=str(tmp_path / "d"), decoders=tfds_data.reader.RAW)
        assert list(a) == list(b)


def _break(kind, root):
    im, gt = root / "DIS5K" / "DIS-TR" / "im", root / "DIS5K" / "DIS-TR" / "gt"
    if kind == "unpaired":
        (gt / "synth_s0_000002.png").unlink()
        return im / "synth_s0_000002.jpg", "no mask named synth_s0_000002"
    if kind == "corrupt":
        (gt / "synth_s0_000001.png").write_bytes(b"not a png")
        return gt / "synth_s0_000001.png", "cannot read the header"
    import cv2
    cv2.imwrite(str(gt / "synth_s0_000003.png"), np.zeros((10, 12), np.uint8))
    return im / "synth_s0_000003.jpg", "but its mask"


@pytest.mark.parametrize("kind", ["unpaired", "corrupt", "size"])
@pytest.mark.parametrize("zipped", [False, True])
def test_bad_files_stop_preparation_naming_them(kind, zipped, tmp_path):
    m = tmp_path / "m"
    _write_split(m, "DIS-TR", 4, 0)
    bad, message = _break(kind, m)
    if zipped:
        with zipfile.ZipFile(tmp_path / "DIS5K.zip", "w") as z:
            for p in sorted((m / "DIS5K").rglob("*")):
                z.write(p, p.relative_to(m).as_posix())
        for p in sorted(m.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (tmp_path / "DIS5K.zip").rename(m / "DIS5K.zip")
        bad = f"{m / 'DIS5K.zip'}/{bad.relative_to(m).as_posix()}"
    with pytest.raises(DatasetError) as e:
        tfds_data.prepare("dis5k", str(tmp_path / "d"), str(m), progress=False)
    assert str(e.value).startswith(f"{bad}: ") and message in str(e.value)
    assert not (tmp_path / "d").exists()  # nothing half-written, not even an empty folder
    if kind == "corrupt":  # or leave it out, as the folder readers do
        b = tfds_data.prepare("dis5k", str(tmp_path / "d"), str(m), progress=False, skip_bad=True)
        assert b.info.splits["train"].num_examples == 3


def test_reading_errors(prepared, manual, tmp_path):
    data_dir = str(prepared[0])
    cases = [("DIS5K-VD", "prepared without split 'validation'"),
             ("HRSOD-TR", "TFDS dataset hrsod (HRSOD-TR) is not prepared"),
             ("COIFT", "COIFT has no TFDS builder here"),
             ("nope:train", "TFDS dataset nope"),
             ("DIS5K-XX", "unknown dataset 'DIS5K-XX'")]
    for name, message in cases:
        with pytest.raises(DatasetError) as e:
            tfds_data.open_datasets(name, data_dir)
        assert message in str(e.value), str(e.value)
    with pytest.raises(DatasetError, match="give --manual_dir"):
        tfds_data.prepare("dis5k", str(tmp_path / "d"))
    with pytest.raises(DatasetError, match="no split of hrsod found"):
        tfds_data.prepare("hrsod", str(tmp_path / "d"), str(manual), progress=False)
    assert not (tmp_path / "d" / "hrsod" / "1.0.0").exists()


def test_cli_prepares_synthetic_as_the_folder_tool_writes_it(tmp_path):
    """``python -m pisam_jax.data.tfds prepare synthetic/CONFIG``: the files ``python -m pisam_jax.data.synthetic``
    writes (train: the seed, test: seed + 1); bad input: one line, status 2."""
    cmd = [sys.executable, "-m", "pisam_jax.data.tfds", "prepare"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd + ["synthetic/train3_test1_size128_seed5_detail2", "--data_dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("synthetic: train 3, test 1 examples")
    for split, seed, n in (("train", 5, 3), ("test", 6, 1)):
        synthetic.generate(str(tmp_path / split), n=n, size=128, seed=seed, progress=False, detail=2)
        folder = datasets.open_folder(str(tmp_path / split / "im"), str(tmp_path / split / "gt"))
        ds = tfds_data.open_dataset(f"synthetic/train3_test1_size128_seed5_detail2:{split}", str(tmp_path / "d"))
        assert ds.name == f"synthetic_train3_test1_size128_seed5_detail2-{split}"
        assert [(s.name, s.height, s.width) for s in ds] == [(s.name, s.height, s.width) for s in folder]
        for a, b in zip(folder.samples, ds.samples):
            assert b.image_file().read() == Path(a.image_path).read_bytes()
            assert b.mask_file().read() == Path(a.mask_path).read_bytes()
    r = subprocess.run(cmd + ["dis5k", "--manual_dir", str(tmp_path / "nope"), "--data_dir", str(tmp_path / "d2")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --manual_dir {tmp_path / 'nope'}: folder not found"
    assert not (tmp_path / "d2").exists()


def test_train_open_data_from_tfds(tmp_path):
    """train.py's data with data.source=tfds and data.synthetic: the folders are generated, prepared as TFDS,
    and read as the same datasets and batches as from the folders."""
    from configs.common import get_config
    from pisam_jax.training import loop

    config = get_config()
    config.data.update(datasets="DIS5K-TR", data_root=str(tmp_path / "data"), synthetic=3, synthetic_size=128,
                       source="tfds", tfds_data_dir=str(tmp_path / "tfds"))
    config.update(batch_size=2, progress=False)
    tf = loop.open_data(config)
    assert (tmp_path / "tfds" / "dis5k" / "1.0.0").is_dir() and isinstance(tf[0].samples[0], tfds_data.TfdsSample)
    config.data.source = "folders"
    folder = loop.open_data(config)
    assert [(s.name, s.height) for s in tf[0]] == [(s.name, s.height) for s in folder[0]]
    _assert_same([next(loop.make_iterator(config, tf, 128))], [next(loop.make_iterator(config, folder, 128))])
    config.data.source = "tfrecord"
    with pytest.raises(loop.UsageError, match="config.data.source must be 'folders' or 'tfds'"):
        loop.open_data(config)


def test_eval_cli_reads_tfds(tiny_sam, manual, prepared, tmp_path):
    """eval.py --source=tfds: the same predictions, scores, click subset and gallery as from the folders."""
    from tests.test_eval_loop import run_cli

    common = ["--model", str(tiny_sam[2]), "--datasets", "DIS5K-TE1", "--clicks", "1", "--subset", "1",
              "--gallery", "1", "--noprogress"]
    assert run_cli(*common, "--data_root", str(manual), "--out", str(tmp_path / "folders")) == 0
    assert run_cli(*common, "--source", "tfds", "--tfds_data_dir", str(prepared[0]),
                   "--out", str(tmp_path / "tfds")) == 0
    for f in ("all.json", "clicks_table.json", "clicks/subset.json"):
        assert json.loads((tmp_path / "tfds" / f).read_text()) == json.loads((tmp_path / "folders" / f).read_text())
    pred = sorted((tmp_path / "tfds" / "converted" / "DIS5K-TE1").glob("*.png"))
    assert [p.name for p in pred] == ["synth_s1_000000.png", "synth_s1_000001.png"]
    assert (tmp_path / "tfds" / "galleries" / "converted_DIS5K-TE1.png").is_file()
