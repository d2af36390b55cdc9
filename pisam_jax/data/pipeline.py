"""grain input pipelines (Dataset API) for training and evaluation.

Training (PISAM_SPEC 5.3, the HQ-SAM loader): horizontal flip with p = 0.5, large-scale
jitter (long side -> round(s * 1024), s ~ U[0.8, 1.6), bilinear without antialias), a
random crop to at most 1024 per side, padding bottom/right to 1024 (image 128, mask 0),
and the tight box of ``mask > 128``. As in the reference, image and mask are resized as
float 0..255 and stay float32, never rounded: the mask's soft edge values are the loss
targets (``mask / 255``) and decide the box. When the crop loses the object the sample
is kept with ``has_object = False`` and the box of the whole unpadded crop: the training
step should give it zero loss weight (the reference trained it with a (1e8, 1e8, 0, 0)
box and an empty target). Optional box noise (off by default, as in the reference).

Evaluation: ``stretch`` (bilinear to 1024 x 1024 in float, the paper's tables) or
``longest_side`` (SAM's ResizeLongestSide + padding), D7; float32 out, the box from the
float resized mask. Samples keep their name, original size and mask path, to be scored
at the original resolution.

Determinism: everything random derives from ``seed`` and the element's index in the
global stream (grain's ``random_map``), so the stream is the same for any number of
threads, workers or processes, and ``get_state()`` / ``set_state()`` of the iterator
resume it exactly. Multi-host training reads one global stream: with ``count`` processes
of ``B`` rows each, every global batch is ``count * B`` consecutive elements of it, and
process ``p`` reads rows ``[p * B, (p + 1) * B)`` (``global_batch_rows``), the order in
which ``training.step.shard_batch`` assembles them. So N processes train on exactly the
batches one process would.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from pisam_jax import transforms
from pisam_jax.data import images
from pisam_jax.data.datasets import Dataset, Sample

SIZE = 1024
PAD_IMAGE = 128
PAD_MASK = 0


# ------------------------------------------------------------------------- elements

def load(sample: Sample) -> dict:
    """Read one sample: ``image`` uint8 (H, W, 3), ``mask`` uint8 (H, W), and its metadata.

    Any ``Sample``: files in folders, or records of a prepared TFDS dataset (``data.tfds``).
    """
    image, mask = sample.read()
    if image.shape[:2] != mask.shape:
        raise images.ImageReadError(
            f"{sample.image_path}: image is {image.shape[0]}x{image.shape[1]} but its mask "
            f"{sample.mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW)")
    return dict(image=image, mask=mask, name=sample.name, dataset=sample.dataset,
                mask_path=sample.mask_path)


def tight_box(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """(x0, y0, x1, y1) float32 of ``mask > 128`` as pixel indices (x1, y1: last foreground
    pixel), and whether there is any foreground. Without foreground: the whole mask's box."""
    fg = images.binarize(mask)
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        h, w = fg.shape
        return np.array([0, 0, w - 1, h - 1], np.float32), False
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32), True


def box_noise(box: np.ndarray, scale: float, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """HQ-SAM's ``misc.box_noise``: move the centre by up to scale * (w/2, h/2) and the size by
    up to scale * (w, h), uniformly, then clamp to [0, size]."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    d = (rng.random(4) * 2 - 1) * np.array([w / 2, h / 2, w, h]) * scale
    cx, cy, w, h = cx + d[0], cy + d[1], w + d[2], h + d[3]
    out = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.clip(out, 0, size).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Flip + large-scale jitter + crop + pad + box; a grain ``random_map`` transform."""

    size: int = SIZE
    scale_range: tuple[float, float] = (0.8, 1.6)
    flip_p: float = 0.5
    box_noise: float = 0.0

    def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
        image, mask = ex["image"], ex["mask"]
        if rng.random() < self.flip_p:
            image, mask = image[:, ::-1], mask[:, ::-1]
        h, w = mask.shape
        s = rng.uniform(*self.scale_range)
        target = float(np.round(s * self.size))  # torch .round(): half to even, as np.round
        scale = min(target / h, target / w)
        sh, sw = int(np.round(h * scale)), int(np.round(w * scale))
        ch, cw = min(self.size, sh), min(self.size, sw)
        top = int(rng.integers(0, sh - ch + 1))
        left = int(rng.integers(0, sw - cw + 1))
        window = (top, left, ch, cw)
        image = transforms.resize_bilinear(image, (sh, sw), window=window)  # float32, not rounded
        mask = transforms.resize_bilinear(mask, (sh, sw), window=window)
        box, has_object = tight_box(mask)
        if not has_object:
            box = np.array([0, 0, cw - 1, ch - 1], np.float32)
        elif self.box_noise > 0:
            box = box_noise(box, self.box_noise, rng, self.size)
        return dict(image=transforms.pad_to_square(image, self.size, PAD_IMAGE),
                    mask=transforms.pad_to_square(mask, self.size, PAD_MASK),
                    box=box, has_object=np.bool_(has_object),
                    input_size=np.array([ch, cw], np.int32))


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Test-time geometry (D7): ``stretch`` or ``longest_side``; box from the float resized mask.

    ``stretch`` resizes image and mask bilinearly in float (PISAM_SPEC 7.2). ``longest_side``
    resizes the image with SAM's uint8 PIL resize (bit-exact with ``ResizeLongestSide``) and the
    mask with the same filter in float, and pads the image bottom/right with ``pad_value`` (0).
    SAM pads *after* normalisation (with 0, i.e. the pixel mean): to be exact, the model's
    preprocessing should zero the normalised image outside ``input_size``.
    """

    geometry: str = "stretch"
    size: int = SIZE
    keep_gt: bool = False
    pad_value: int = 0

    def __post_init__(self):
        if self.geometry not in ("stretch", "longest_side"):
            raise ValueError(f"geometry must be 'stretch' or 'longest_side', not {self.geometry!r}")

    def __call__(self, ex: dict) -> dict:
        image, mask = ex["image"], ex["mask"]
        h, w = mask.shape
        if self.geometry == "stretch":
            image = transforms.resize_stretch(image, self.size)
            mask_r = transforms.resize_stretch(mask, self.size)
        else:
            image = transforms.resize_longest_side(image, self.size).astype(np.float32)
            mask_r = transforms.resize_longest_side(mask.astype(np.float32), self.size)
        input_size = np.array(mask_r.shape, np.int32)
        box, has_object = tight_box(mask_r)
        out = dict(image=transforms.pad_to_square(image, self.size, self.pad_value),
                   mask=transforms.pad_to_square(mask_r, self.size, PAD_MASK),
                   box=box, has_object=np.bool_(has_object), input_size=input_size,
                   original_size=np.array([h, w], np.int32), name=ex["name"],
                   dataset=ex["dataset"], mask_path=ex["mask_path"])
        if self.keep_gt:
            out["gt"] = mask
        return out


# ------------------------------------------------------------------------- datasets

def _samples(ds: Dataset | Sequence[Sample]) -> list[Sample]:
    return list(ds.samples if isinstance(ds, Dataset) else ds)


def shard(ds: grain.MapDataset, index: int | None = None, count: int | None = None) -> grain.MapDataset:
    """This host's shard: elements index, index + count, ... (default: jax process index/count).

    Shards are disjoint and cover the dataset; their lengths differ by at most one. (Evaluation;
    training reads rows of global batches instead, ``global_batch_rows``.)
    """
    index, count = _process(index, count)
    return ds[index::count]


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    """(index, count), by default jax's process index and count; checked."""
    if index is None or count is None:
        import jax
        index, count = jax.process_index(), jax.process_count()
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} not in [0, {count})")
    return index, count


class GlobalBatchRows(grain.MapDataset):
    """Process ``index``'s rows of the global batches of ``parent``: its elements
    ``g * count * rows + index * rows + r`` for global batch g = 0, 1, ... and r < rows, in that
    order. Batching it by ``rows`` gives this process's part of each global batch; the processes'
    parts, in process order, are the global batches of ``parent`` batched by ``count * rows``.
    A trailing partial global batch is dropped (as ``drop_remainder``)."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, rows: int, index: int, count: int):
        super().__init__(parent)
        if rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")
        self._rows, self._offset, self._global = rows, index * rows, count * rows
        self._length = (len(parent) // self._global) * rows

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        g, r = divmod(index, self._rows)
        return g * self._global + self._offset + r

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._parent_index(i) for i in indices])

    def __str__(self) -> str:
        return f"GlobalBatchRows(rows={self._rows}, offset={self._offset}, global={self._global})"


def global_batch_rows(ds: grain.MapDataset, rows: int, index: int | None = None,
                      count: int | None = None) -> grain.MapDataset:
    """``GlobalBatchRows`` for process ``index`` of ``count`` (default: jax's)."""
    index, count = _process(index, count)
    return GlobalBatchRows(ds, rows=rows, index=index, count=count)


def mixed_source(datasets: Sequence[Dataset | Sequence[Sample]], *, seed: int,
                 weights: Sequence[float] | None = None,
                 num_epochs: int | None = None) -> grain.MapDataset:
    """Shuffled, repeated stream of ``Sample`` over several datasets (D8): the global stream,
    the same on every process.

    ``weights=None`` concatenates them (every image equally likely, as the reference's
    ConcatDataset); otherwise each dataset is shuffled and repeated on its own and they are
    interleaved in the given proportions (``num_epochs`` is then ignored: infinite).
    """
    parts = [grain.MapDataset.source(_samples(d)) for d in datasets]
    for d, p in zip(datasets, parts):
        if len(p) == 0:
            raise ValueError(f"dataset {getattr(d, 'name', '?')} has no samples")
    if weights is None:
        ds = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
        return ds.shuffle(seed=seed).repeat(num_epochs)
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} datasets")
    parts = [p.shuffle(seed=seed + i).repeat() for i, p in enumerate(parts)]
    return grain.MapDataset.mix(parts, list(weights))


def _iter(ds: grain.MapDataset, threads: int, prefetch: int, workers: int,
          batch_size: int | None = None) -> grain.IterDataset:
    """Element-parallel reading in ``threads``, then batching, then optional worker processes."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(prefetch, threads)))
    if batch_size is not None:
        it = it.batch(batch_size, drop_remainder=True)
    if workers > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1))
    return it


def _ensure_absl_flags():
    """grain's worker processes read absl flags; outside ``absl.app.run`` they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_dataset(datasets: Sequence[Dataset | Sequence[Sample]], *, batch_size: int, seed: int = 0,
                  weights: Sequence[float] | None = None, augment: TrainAugment = TrainAugment(),
                  num_epochs: int | None = None, shard_index: int | None = None,
                  shard_count: int | None = None, threads: int = 2, prefetch: int = 4,
                  workers: int = 0) -> grain.IterDataset:
    """Training batches: dicts of numpy arrays with a leading ``batch_size`` axis.

    ``image`` (B, 1024, 1024, 3) float32 0..255, ``mask`` (B, 1024, 1024) float32 0..255
    (soft at resized edges; the loss target is ``mask / 255``), ``box``
    (B, 4) float32 (x0, y0, x1, y1), ``has_object`` (B,) bool, ``input_size`` (B, 2) int32
    (the unpadded crop); 16 MiB of host memory a sample. ``batch_size`` is per process:
    process ``shard_index`` of ``shard_count`` (default: jax's) gets rows
    ``[shard_index * batch_size, (shard_index + 1) * batch_size)`` of each global batch of
    ``shard_count * batch_size`` (module docstring). ``iter(ds)`` gives a checkpointable
    iterator (``get_state`` / ``set_state``). Images are read and augmented in ``threads``
    threads with up to ``prefetch`` images ahead; ``workers`` > 0 runs all of it in that
    many processes (each with its threads).
    """
    ds = mixed_source(datasets, seed=seed, weights=weights, num_epochs=num_epochs)
    # augment before choosing rows: an element's randomness follows its global index
    ds = ds.map(load).random_map(augment, seed=seed)
    ds = global_batch_rows(ds, batch_size, shard_index, shard_count)
    return _iter(ds, threads, prefetch, workers, batch_size)


def eval_dataset(dataset: Dataset | Sequence[Sample], *, geometry: str = "stretch", size: int = SIZE,
                 keep_gt: bool = False, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.MapDataset:
    """Evaluation samples in order (unbatched: original sizes differ), this host's shard.

    Each is a dict: ``image`` (S, S, 3) float32 0..255, ``mask`` (S, S) float32 0..255 (the
    GT in the model frame, not rounded), ``box`` (4,) float32 from it, ``has_object``,
    ``input_size`` (2,) (resized size before padding), ``original_size`` (2,) (H, W),
    ``name``, ``dataset``, ``mask_path``,
    and with ``keep_gt`` the original-resolution mask ``gt``. Use ``eval_iter`` to read
    ahead in threads or workers.
    """
    ds = shard(grain.MapDataset.source(_samples(dataset)), shard_index, shard_count)
    return ds.map(load).map(EvalTransform(geometry, size, keep_gt))


def eval_iter(ds: grain.MapDataset, *, threads: int = 2, prefetch: int = 2, workers: int = 0):
    """An iterator over an ``eval_dataset`` with read-ahead."""
    return _iter(ds, threads, prefetch, workers)
