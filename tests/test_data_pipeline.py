"""Geometry (against torch and segment_anything), boxes, grain pipelines: determinism,
checkpointed iterator state, host shards, mixing, evaluation geometry, worker processes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

import grain
from pisam_jax import transforms
from pisam_jax.data import images, pipeline, synthetic
from pisam_jax.data.datasets import Sample, open_folder


# ----------------------------------------------------------------------- geometry

def _torch_resize(x, size):
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    out = F.interpolate(t, size, mode="bilinear", align_corners=False)[0]
    return (out.permute(1, 2, 0) if x.ndim == 3 else out[0]).numpy()


# Two lerps of values <= 255, each with three float32 roundings (<= 1.5 ulp(255) each), in either
# implementation: they may differ by 6 ulp(255) = 6 * 2^-16; measured 3 ulp. Computing torch's source
# coordinate without its single rounding (fused multiply-add) gives 54 ulp on the 97x131 case.
RESIZE_ATOL = 6 * 2.0 ** -16


@pytest.mark.parametrize("hw,size", [((300, 200), (1024, 1024)), ((517, 389), (256, 256)),
                                     ((97, 131), (61, 203)), ((64, 64), (64, 64)), ((1100, 640), (1024, 1024))])
def test_resize_bilinear_matches_torch(hw, size):
    x = np.random.default_rng(0).random(hw + (3,)).astype(np.float32) * 255
    out = transforms.resize_bilinear(x, size)
    assert out.dtype == np.float32 and out.shape == size + (3,)
    np.testing.assert_allclose(out, _torch_resize(x, size), atol=RESIZE_ATOL, rtol=0)
    u8 = x.astype(np.uint8)  # uint8 in: resized as float, not rounded back (the reference's float tensors)
    out = transforms.resize_bilinear(u8, size)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _torch_resize(u8, size), atol=RESIZE_ATOL, rtol=0)
    np.testing.assert_allclose(transforms.resize_bilinear(x[..., 0], size), _torch_resize(x[..., 0], size),
                               atol=RESIZE_ATOL, rtol=0)


def test_resize_window_equals_resize_then_crop():
    x = np.random.default_rng(1).random((120, 90, 3)).astype(np.float32)
    full = transforms.resize_bilinear(x, (200, 150))
    win = transforms.resize_bilinear(x, (200, 150), window=(30, 20, 100, 64))
    np.testing.assert_array_equal(win, full[30:130, 20:84])
    with pytest.raises(ValueError):
        transforms.resize_bilinear(x, (200, 150), window=(150, 0, 100, 10))


def test_stretch_is_square_and_float():
    x = np.random.default_rng(3).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    out = transforms.resize_stretch(x, 1024)
    assert out.shape == (1024, 1024, 3) and out.dtype == np.float32
    assert not np.array_equal(out, np.rint(out))  # fractional values kept (spec 7.2: nothing rounded)


@pytest.mark.parametrize("hw", [(2048, 1365), (333, 517), (1024, 1024), (1500, 2600), (7, 3000)])
def test_longest_side_bit_exact_with_segment_anything(hw):
    from segment_anything.utils.transforms import ResizeLongestSide
    x = np.random.default_rng(2).integers(0, 256, hw + (3,), dtype=np.uint8)
    ours = transforms.resize_longest_side(x, 1024)
    ref = ResizeLongestSide(1024).apply_image(x)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    assert ours.shape[:2] == ResizeLongestSide.get_preprocess_shape(hw[0], hw[1], 1024)
    assert transforms.longest_side_shape(*hw, 1024) == ours.shape[:2]
    # float in: the same PIL filter in float, not rounded; PIL's uint8 path rounds its fixed-point result
    as_float = transforms.resize_longest_side(x.astype(np.float32), 1024)
    assert as_float.dtype == np.float32 and as_float.shape == ref.shape
    assert np.abs(as_float - ref).max() <= 1.0
    if ours.shape != x.shape:
        assert not np.array_equal(as_float, np.rint(as_float))
    mask = transforms.resize_longest_side(x[..., 0].astype(np.float64), 1024)
    np.testing.assert_array_equal(mask, as_float[..., 0])  # a mask is one channel of the same filter


def test_pad_to_square():
    x = np.ones((3, 5, 3), np.uint8)
    p = transforms.pad_to_square(x, 6, 128)
    assert p.shape == (6, 6, 3) and (p[:3, :5] == 1).all() and (p[3:] == 128).all() and (p[:, 5] == 128).all()
    with pytest.raises(ValueError):
        transforms.pad_to_square(np.ones((7, 2)), 6)


# -------------------------------------------------------------------------- boxes

def test_tight_box():
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:8] = 255
    m[6, 9] = 128  # not foreground (> 128 only)
    box, ok = pipeline.tight_box(m)
    assert ok and box.dtype == np.float32 and box.tolist() == [3, 2, 7, 4]
    box, ok = pipeline.tight_box(np.zeros((10, 12), np.uint8))
    assert not ok and box.tolist() == [0, 0, 11, 9]


def test_box_noise():
    box = np.array([100, 200, 300, 260], np.float32)
    np.testing.assert_allclose(pipeline.box_noise(box, 0.0, np.random.default_rng(0)), box)
    for s in range(20):
        b = pipeline.box_noise(box, 0.2, np.random.default_rng(s))
        wh = box[2:] - box[:2]
        # centre moves by <= 0.2 * wh / 2; each side by <= that plus half the size change (0.2 * wh / 2)
        assert np.all(np.abs(b[:2] - box[:2]) <= 0.2 * wh + 1e-3)
        assert np.all(np.abs(b[2:] - box[2:]) <= 0.2 * wh + 1e-3)
        assert (b >= 0).all() and (b <= 1024).all()


# ---------------------------------------------------------------- train augment

def _example(h=300, w=200, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:h // 2, w // 3:w // 2] = 255
    return dict(image=image, mask=mask, name="x", dataset="d", mask_path="x.png")


def _hqsam_lsj(image, mask, rng, size=1024, lo=0.8, hi=1.6):
    """The HQ-SAM loader's RandomHFlip + LargeScaleJitter in torch, consuming rng like ours."""
    img = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    lab = torch.from_numpy(mask.astype(np.float32))[None]
    if rng.random() < 0.5:
        img, lab = img.flip(-1), lab.flip(-1)
    s = rng.uniform(lo, hi)
    image_size = torch.tensor(img.shape[-2:], dtype=torch.float64)
    out = round(s * size)
    scale = min(out / image_size[0], out / image_size[1])
    sh, sw = (image_size * scale).round().long().tolist()
    img = F.interpolate(img[None], (sh, sw), mode="bilinear", align_corners=False)[0]
    lab = F.interpolate(lab[None], (sh, sw), mode="bilinear", align_corners=False)[0]
    ch, cw = min(size, sh), min(size, sw)
    top, left = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    img, lab = img[:, top:top + ch, left:left + cw], lab[:, top:top + ch, left:left + cw]
    img = F.pad(img, [0, size - cw, 0, size - ch], value=128)
    lab = F.pad(lab, [0, size - cw, 0, size - ch], value=0)
    return img.permute(1, 2, 0).numpy(), lab[0].numpy()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_augment_matches_hqsam_loader(seed):
    ex = _example(400, 260, seed)
    out = pipeline.TrainAugment()(ex, np.random.default_rng(seed))
    ref_img, ref_mask = _hqsam_lsj(ex["image"], ex["mask"], np.random.default_rng(seed))
    # float, never rounded: the reference's float tensors (its loss targets are the soft mask / 255)
    assert out["image"].shape == (1024, 1024, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (1024, 1024) and out["mask"].dtype == np.float32
    np.testing.assert_allclose(out["image"], ref_img, atol=RESIZE_ATOL, rtol=0)
    np.testing.assert_allclose(out["mask"], ref_mask, atol=RESIZE_ATOL, rtol=0)
    ch, cw = out["input_size"]
    assert (out["image"][ch:] == 128).all() and (out["image"][:, cw:] == 128).all()
    assert (out["mask"][ch:] == 0).all() and (out["mask"][:, cw:] == 0).all()
    ref_box = masks_to_boxes(torch.from_numpy(ref_mask)[None] > 128)[0].numpy()
    assert out["has_object"] and np.array_equal(out["box"], ref_box)
    assert out["box"].dtype == np.float32


def test_train_augment_flip_and_determinism():
    ex = _example()
    flips = []
    for s in range(24):
        a = pipeline.TrainAugment(scale_range=(1.0, 1.0))(ex, np.random.default_rng(s))
        b = pipeline.TrainAugment(scale_range=(1.0, 1.0))(ex, np.random.default_rng(s))
        np.testing.assert_array_equal(a["image"], b["image"])
        flips.append(a["box"][0] > 1024 * 200 / 300 / 2)  # object left of centre unless flipped
    assert 4 < sum(flips) < 20


def test_train_augment_lost_object():
    ex = _example()
    ex["mask"][:] = 0  # also what a crop that cuts the object away produces
    out = pipeline.TrainAugment()(ex, np.random.default_rng(0))
    ch, cw = out["input_size"]
    assert not out["has_object"] and out["box"].tolist() == [0, 0, cw - 1, ch - 1]


def test_train_augment_crop_can_lose_object():
    ex = _example(2000, 2000)
    ex["mask"][:] = 0
    ex["mask"][:4, :4] = 255  # a tiny object in the corner: often cropped away at scale 1.6
    outs = [pipeline.TrainAugment(scale_range=(1.6, 1.6))(ex, np.random.default_rng(s)) for s in range(6)]
    assert any(not o["has_object"] for o in outs)
    for o in outs:
        assert o["has_object"] == (o["mask"] > 128).any()


# -------------------------------------------------------------------- pipelines

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(str(root / "a"), 6, size=256, seed=0, progress=False)
    synthetic.generate(str(root / "b"), 3, size=320, seed=1, progress=False)
    a = open_folder(str(root / "a/im"), str(root / "a/gt"), name="A")
    b = open_folder(str(root / "b/im"), str(root / "b/gt"), name="B")
    return a, b


def _equal(x, y):
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_shapes_and_determinism(synth):
    kw = dict(batch_size=2, seed=5, shard_index=0, shard_count=1)
    a = iter(pipeline.train_dataset(list(synth), **kw))
    b = iter(pipeline.train_dataset(list(synth), threads=1, **kw))
    b1 = next(a)
    assert b1["image"].shape == (2, 1024, 1024, 3) and b1["image"].dtype == np.float32
    assert b1["mask"].shape == (2, 1024, 1024) and b1["mask"].dtype == np.float32 and b1["box"].shape == (2, 4)
    assert b1["has_object"].dtype == np.bool_ and b1["input_size"].shape == (2, 2)
    _equal(b1, next(b))
    _equal(next(a), next(b))
    c = next(iter(pipeline.train_dataset(list(synth), batch_size=2, seed=6, shard_index=0, shard_count=1)))
    assert not np.array_equal(b1["image"], c["image"])


def test_iterator_state_restore(synth):
    ds = pipeline.train_dataset([synth[0]], batch_size=1, seed=0, shard_index=0, shard_count=1)
    it = iter(ds)
    next(it)
    next(it)
    state = it.get_state()
    expected = next(it)
    it2 = iter(ds)
    it2.set_state(state)
    _equal(next(it2), expected)


def test_epochs_cover_the_data(synth):
    src = pipeline.mixed_source([synth[0]], seed=0, num_epochs=2)
    names = [src[i].name for i in range(len(src))]
    assert len(names) == 12 and sorted(names[:6]) == sorted(s.name for s in synth[0].samples)
    assert sorted(names[6:]) == sorted(names[:6]) and names[6:] != names[:6]  # reshuffled


def test_shards_disjoint_and_cover():
    ds = grain.MapDataset.source(list(range(23)))
    shards = [list(pipeline.shard(ds, i, 4)) for i in range(4)]
    flat = sorted(x for s in shards for x in s)
    assert flat == list(range(23))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert list(pipeline.shard(ds)) == list(range(23))  # one process: everything
    with pytest.raises(ValueError):
        pipeline.shard(ds, 4, 4)


@pytest.mark.parametrize("weights", [None, [0.5, 0.5]])
def test_processes_read_rows_of_the_one_process_batches(synth, weights):
    """N processes of B rows each see, in process order, exactly the global batches of one process with N * B
    rows: the same images, augmentation and boxes, whatever N (the multi-host training test relies on it)."""
    kw = dict(seed=3, weights=weights, augment=pipeline.TrainAugment(size=64), threads=1)
    one = iter(pipeline.train_dataset(list(synth), batch_size=4, shard_index=0, shard_count=1, **kw))
    parts = {n: [iter(pipeline.train_dataset(list(synth), batch_size=4 // n, shard_index=i, shard_count=n, **kw))
                 for i in range(n)] for n in (2, 4)}
    for _ in range(4):  # past the first epoch (9 images)
        want = next(one)
        for n, its in parts.items():
            got = [next(it) for it in its]
            for k in ("image", "mask", "box", "has_object", "input_size"):
                np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=f"{n} {k}")
    # rows map onto the global stream as documented, and a process's iterator resumes
    ds = pipeline.global_batch_rows(grain.MapDataset.range(20), 2, 1, 3)
    assert list(ds) == [2, 3, 8, 9, 14, 15] and len(ds) == 6  # 18..19: an incomplete global batch, dropped
    it = iter(pipeline.train_dataset(list(synth), batch_size=2, shard_index=1, shard_count=2, **kw))
    next(it)
    state = it.get_state()
    expected = next(it)
    it2 = iter(pipeline.train_dataset(list(synth), batch_size=2, shard_index=1, shard_count=2, **kw))
    it2.set_state(state)
    _equal(next(it2), expected)
    with pytest.raises(ValueError):
        pipeline.global_batch_rows(grain.MapDataset.range(20), 2, 3, 3)


def test_mixing(synth):
    a, b = synth
    cat = pipeline.mixed_source([a, b], seed=0, num_epochs=1)
    assert sorted(s.name for s in cat) == sorted(s.name for s in a.samples + b.samples)
    mix = pipeline.mixed_source([a, b], seed=0, weights=[0.75, 0.25])
    got = [mix[i].dataset for i in range(200)]
    assert 0.65 < got.count("A") / 200 < 0.85
    with pytest.raises(ValueError):
        pipeline.mixed_source([a, b], seed=0, weights=[1.0])
    with pytest.raises(ValueError, match="no samples"):
        pipeline.mixed_source([[]], seed=0)


def test_bad_file_at_read_time_names_it(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    s = Sample("bad", str(bad), str(bad), "D", 4, 4)
    with pytest.raises(images.ImageReadError, match="bad.jpg"):
        pipeline.load(s)


# ------------------------------------------------------------------- evaluation

def test_eval_stretch(synth):
    ds = pipeline.eval_dataset(synth[1], geometry="stretch", keep_gt=True, shard_index=0, shard_count=1)
    assert len(ds) == 3
    ex = ds[1]
    s = synth[1][1]
    img, gt = images.read_image(s.image_path), images.read_mask(s.mask_path)
    assert ex["name"] == s.name and ex["mask_path"] == s.mask_path and ex["dataset"] == "B"
    assert ex["original_size"].tolist() == list(gt.shape) and ex["input_size"].tolist() == [1024, 1024]
    np.testing.assert_array_equal(ex["gt"], gt)
    assert ex["image"].dtype == np.float32 and ex["mask"].dtype == np.float32  # spec 7.2: nothing rounded
    np.testing.assert_allclose(ex["image"], _torch_resize(img, (1024, 1024)), atol=RESIZE_ATOL, rtol=0)
    ref_mask = _torch_resize(gt, (1024, 1024))
    np.testing.assert_allclose(ex["mask"], ref_mask, atol=RESIZE_ATOL, rtol=0)
    box = masks_to_boxes(torch.from_numpy(ref_mask)[None] > 128)[0].numpy()
    assert ex["has_object"] and np.array_equal(ex["box"], box)


def test_eval_longest_side(synth):
    from segment_anything.utils.transforms import ResizeLongestSide
    ex = pipeline.eval_dataset(synth[1], geometry="longest_side", shard_index=0, shard_count=1)[0]
    img, gt = images.read_image(synth[1][0].image_path), images.read_mask(synth[1][0].mask_path)
    ref = ResizeLongestSide(1024).apply_image(img)
    h, w = ref.shape[:2]
    assert ex["input_size"].tolist() == [h, w] and ex["image"].shape == (1024, 1024, 3)
    np.testing.assert_array_equal(ex["image"][:h, :w], ref)  # SAM's uint8 resize, bit for bit (as float32)
    assert (ex["image"][h:] == 0).all() and (ex["mask"][:, w:] == 0).all()
    # the mask: the same filter in float (within PIL's uint8 rounding of it), the box from that float mask
    assert np.abs(ex["mask"][:h, :w] - ResizeLongestSide(1024).apply_image(gt)).max() <= 1.0
    box, ok = pipeline.tight_box(ex["mask"])
    assert ok and np.array_equal(ex["box"], box)
    with pytest.raises(ValueError):
        pipeline.eval_dataset(synth[1], geometry="nope", shard_index=0, shard_count=1)


def test_eval_iter_threads(synth):
    ds = pipeline.eval_dataset(synth[0], shard_index=0, shard_count=1)
    names = [ex["name"] for ex in pipeline.eval_iter(ds, threads=2)]
    assert names == [s.name for s in synth[0].samples]


def test_worker_processes_same_stream(synth):
    kw = dict(batch_size=1, seed=3, shard_index=0, shard_count=1)
    ref = iter(pipeline.train_dataset([synth[0]], **kw))
    expected = [next(ref) for _ in range(2)]
    it = iter(pipeline.train_dataset([synth[0]], workers=1, **kw))
    for e in expected:
        _equal(next(it), e)
    state = it.get_state()
    assert state is not None
