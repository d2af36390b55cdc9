"""Named datasets of the paper under one data root (PISAM_SPEC 7.1), paired and validated.

``open_dataset("DIS5K-TR", data_root)`` lists the images and masks, pairs them by
basename and checks every pair: a missing folder, an image without a mask or a mask
without an image, an unreadable or corrupt file, and an image whose size differs from
its mask are each reported with the file name. By default the first problem raises
``DatasetError``; with ``skip_bad=True`` bad samples are left out and counted
(``Dataset.skipped``). ``check="header"`` (default) reads only the file headers;
``check="full"`` decodes every file (finds truncated files too, slower).

A ``Sample`` reads its own pixels (``read_image``, ``read_mask``, ``read``): from its files
here, from a TFDS record for the samples of ``pisam_jax.data.tfds``. ``open_folder`` reads
the local file system, or any ``Files`` (a zip archive: ``pisam_jax.data.tfds``).

Besides the paper's sets, the interactive-segmentation benchmarks in the layouts they are published in
(RITM's and HQ-SAM's readers): GrabCut (``GrabCut/data_GT`` images, ``GrabCut/boundary_GT`` masks whose
value 128 marks an unlabelled band), Berkeley (``Berkeley/images``, ``Berkeley/masks``, read as GrabCut),
DAVIS, the 345-image set (``DAVIS/img``, ``DAVIS/gt``; every non-zero value of any channel is the object),
and HQSeg-44K's validation sets (group ``hqseg-val``: DIS5K-VD and, under ``thin_object_detection/``,
COIFT, HRSOD and ThinObject5K's test split). How a dataset's masks mark the object is its ``MaskLabels``;
``read_labels`` applies it (the click protocols score with it, ``eval.py --protocol noc``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import BinaryIO, Iterable, Protocol, Sequence

import numpy as np

from pisam_jax.data import images

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset cannot be used as it is; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class MaskLabels:
    """How a dataset's mask files mark the object.

    The object is ``value > foreground_above``; pixels of value ``ignore`` (when set) are neither object nor
    background (left out of the scores and never clicked); the rest is background. ``channels``: "first"
    reads the first channel (``images.read_mask``), "max" the largest of the colour channels.
    """

    foreground_above: int = images.FOREGROUND_THRESHOLD
    ignore: int | None = None
    channels: str = "first"


DEFAULT_LABELS = MaskLabels()
GRABCUT_LABELS = MaskLabels(ignore=128)  # RITM's GrabCut/Berkeley reader: 128 is the unlabelled band
DAVIS_LABELS = MaskLabels(foreground_above=0, channels="max")  # RITM's DAVIS reader: any non-zero value


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives, relative to the data root."""

    name: str
    image_dir: str
    gt_dir: str
    split: str  # "train" | "test" | "val"
    image_ext: str = ".jpg"  # the extension that marks images when images and masks share a folder
    labels: MaskLabels = DEFAULT_LABELS


def _spec(name, image_dir, gt_dir, split, image_ext=".jpg", labels=DEFAULT_LABELS):
    return name, DatasetSpec(name, image_dir, gt_dir, split, image_ext, labels)


DATASETS: dict[str, DatasetSpec] = dict([
    _spec("DIS5K-TR", "DIS5K/DIS-TR/im", "DIS5K/DIS-TR/gt", "train"),
    _spec("ThinObject5K-TR", "ThinObject5K/images_train", "ThinObject5K/masks_train", "train"),
    _spec("HRSOD-TR", "HRSOD_release/HRSOD_train", "HRSOD_release/HRSOD_train_mask", "train"),
    _spec("UHRSD-TR", "UHRSD_TR_2K/image", "UHRSD_TR_2K/mask", "train"),
    _spec("FSS", "fss_all", "fss_all", "train"),
    _spec("DUTS-TR", "DUTS-TR", "DUTS-TR", "train"),
    _spec("DUTS-TE", "DUTS-TE", "DUTS-TE", "train"),
    _spec("ECSSD", "ecssd", "ecssd", "train"),
    _spec("MSRA10K", "MSRA_10K", "MSRA_10K", "train"),
    _spec("DIS5K-VD", "DIS5K/DIS-VD/im", "DIS5K/DIS-VD/gt", "val"),
    *[_spec(f"DIS5K-TE{i}", f"DIS5K/DIS-TE{i}/im", f"DIS5K/DIS-TE{i}/gt", "test") for i in range(1, 5)],
    _spec("ThinObject5K-TE", "ThinObject5K/images_test", "ThinObject5K/masks_test", "test"),
    _spec("HRSOD-TE", "HRSOD_release/HRSOD_test", "HRSOD_release/HRSOD_test_mask", "test"),
    _spec("UHRSD-TE", "UHRSD_TE_2K/image", "UHRSD_TE_2K/mask", "test"),
    _spec("BIG-test", "BIG/test/img", "BIG/test/gt", "test"),
    _spec("BIG-val", "BIG/val/img", "BIG/val/gt", "val"),
    # Extra HQSeg evaluation sets; the reference defines but never uses them and its paths
    # are not recorded, so these follow HQ-SAM's layout (images/ and masks/ subfolders).
    _spec("COIFT", "COIFT/images", "COIFT/masks", "test"),
    _spec("DAVIS-S", "DAVIS-S/images", "DAVIS-S/masks", "test"),
    _spec("HRS10K", "HRS10K/img_test", "HRS10K/label_test", "test"),
    _spec("HRS10K-HD", "HRS10K/img_test_2560max", "HRS10K/label_test_2560max", "test"),
    # The interactive benchmarks, in RITM's layouts (its GrabCutDataset, BerkeleyDataset, DavisDataset).
    _spec("GrabCut", "GrabCut/data_GT", "GrabCut/boundary_GT", "test", labels=GRABCUT_LABELS),
    _spec("Berkeley", "Berkeley/images", "Berkeley/masks", "test", labels=GRABCUT_LABELS),
    _spec("DAVIS", "DAVIS/img", "DAVIS/gt", "test", labels=DAVIS_LABELS),
    # HQSeg-44K's validation sets beside DIS5K-VD, in HQ-SAM's layout (its train.py valid set).
    _spec("HQSeg-COIFT", "thin_object_detection/COIFT/images", "thin_object_detection/COIFT/masks", "val"),
    _spec("HQSeg-HRSOD", "thin_object_detection/HRSOD/images", "thin_object_detection/HRSOD/masks_max255", "val"),
    _spec("HQSeg-ThinObject5K-TE", "thin_object_detection/ThinObject5K/images_test",
          "thin_object_detection/ThinObject5K/masks_test", "val"),
])
ALIASES = {"ThinObject5k-TR": "ThinObject5K-TR", "ThinObject5k-TE": "ThinObject5K-TE",
           "BIG_test": "BIG-test", "BIG_val": "BIG-val", "DAVIDS": "DAVIS-S", "HRS10K_HD": "HRS10K-HD"}

# Groups (D8): the paper's four training sets by default; the reference's nine-set "ALL"; HQ-SAM's HQSeg-44K.
GROUPS: dict[str, tuple[str, ...]] = {
    "paper-train": ("DIS5K-TR", "ThinObject5K-TR", "HRSOD-TR", "UHRSD-TR"),
    # HQ-SAM's training set, HQSeg-44K (its train.py)
    "hqseg-train": ("DIS5K-TR", "ThinObject5K-TR", "FSS", "DUTS-TR", "DUTS-TE", "ECSSD", "MSRA10K"),
    "all-train": ("DIS5K-TR", "ThinObject5K-TR", "HRSOD-TR", "UHRSD-TR",
                  "FSS", "DUTS-TR", "DUTS-TE", "ECSSD", "MSRA10K"),
    "paper-test": ("DIS5K-VD", "DIS5K-TE1", "DIS5K-TE2", "DIS5K-TE3", "DIS5K-TE4",
                   "ThinObject5K-TE", "HRSOD-TE", "UHRSD-TE"),
    "dis-test": ("DIS5K-VD", "DIS5K-TE1", "DIS5K-TE2", "DIS5K-TE3", "DIS5K-TE4"),
    "big": ("BIG-test", "BIG-val"),
    # the interactive-segmentation field's benchmarks (RITM, FocalClick, SimpleClick, SegNext)
    "interactive": ("GrabCut", "Berkeley", "DAVIS"),
    "hqseg-val": ("DIS5K-VD", "HQSeg-COIFT", "HQSeg-HRSOD", "HQSeg-ThinObject5K-TE"),
}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image/mask pair. ``height``/``width`` are the (EXIF-oriented) image size.

    ``image_path``/``mask_path`` name the files in messages; read the pixels with the methods,
    which a sample of another storage (``pisam_jax.data.tfds``) overrides.
    """

    name: str
    image_path: str
    mask_path: str
    dataset: str
    height: int
    width: int

    def image_file(self) -> str | BinaryIO:
        """The encoded image as ``PIL.Image.open`` takes it: here its path."""
        return self.image_path

    def mask_file(self) -> str | BinaryIO:
        return self.mask_path

    def read_image(self) -> np.ndarray:
        """uint8 RGB (H, W, 3), ``images.read_image``."""
        return images.read_image(self.image_file(), self.image_path)

    def read_mask(self) -> np.ndarray:
        """uint8 (H, W) 0..255, ``images.read_mask``."""
        return images.read_mask(self.mask_file(), self.mask_path)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask): both, in one read where the storage allows."""
        return self.read_image(), self.read_mask()


@dataclasses.dataclass
class Dataset:
    """A validated dataset: its good samples (sorted by name) and what was skipped."""

    name: str
    samples: list[Sample]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, reason)
    labels: MaskLabels = DEFAULT_LABELS

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def resolve_names(names: str | Iterable[str]) -> list[str]:
    """Expand comma-separated names and groups into dataset names; unknown names raise."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        n = ALIASES.get(n, n)
        if n in GROUPS:
            out.extend(x for x in GROUPS[n] if x not in out)
        elif n in DATASETS:
            if n not in out:
                out.append(n)
        else:
            raise DatasetError(
                f"unknown dataset {n!r}; known: {', '.join(DATASETS)}; groups: {', '.join(GROUPS)}")
    return out


class Files(Protocol):
    """Where ``open_folder`` reads: folders of files named by '/'-joined paths."""

    def isdir(self, path: str) -> bool: ...

    def files(self, folder: str) -> list[str]:
        """The names of the files (not folders) in ``folder``."""

    def open(self, path: str) -> str | BinaryIO:
        """What ``images``' readers take: a path, or a seekable binary file object."""


class LocalFiles:
    """The local file system."""

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def files(self, folder: str) -> list[str]:
        return [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]

    def open(self, path: str) -> str:
        return path


LOCAL = LocalFiles()


def _list(folder: str, exts: Sequence[str], files: Files = LOCAL) -> dict[str, str]:
    """basename (without extension) -> file name, for files with one of ``exts``."""
    out: dict[str, str] = {}
    for f in sorted(files.files(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in exts and not f.startswith("."):
            if stem in out:
                raise DatasetError(f"{os.path.join(folder, f)}: two files share the basename "
                                   f"{stem!r} ({out[stem]}); keep one")
            out[stem] = f
    return out


def open_folder(image_dir: str, gt_dir: str, *, name: str | None = None, image_ext: str = ".jpg",
                skip_bad: bool = False, check: str = "header", progress: bool = False,
                labels: MaskLabels = DEFAULT_LABELS, files: Files = LOCAL) -> Dataset:
    """Pair and validate the images in ``image_dir`` with the masks in ``gt_dir`` by basename.

    When both are the same folder, files ending in ``image_ext`` are images and ``.png``
    files are masks. See the module docstring for ``skip_bad`` and ``check``; ``labels``: how
    the masks mark the object; ``files``: where the folders are (default: the local file system).
    """
    if check not in ("header", "full"):
        raise ValueError(f"check must be 'header' or 'full', not {check!r}")
    name = name or image_dir
    for d, what in ((image_dir, "image"), (gt_dir, "mask")):
        if not files.isdir(d):
            raise DatasetError(f"{d}: {what} folder of dataset {name} not found; check --data_root "
                               "or create the data (python -m pisam_jax.data.synthetic --out DIR)")
    if os.path.abspath(image_dir) == os.path.abspath(gt_dir):
        ims, gts = _list(image_dir, (image_ext.lower(),), files), _list(gt_dir, (".png",), files)
    else:
        ims, gts = _list(image_dir, IMAGE_EXTS, files), _list(gt_dir, MASK_EXTS, files)

    problems: list[tuple[str, str]] = []
    for stem in sorted(set(ims) - set(gts)):
        problems.append((os.path.join(image_dir, ims[stem]), f"no mask named {stem}.* in {gt_dir}"))
    for stem in sorted(set(gts) - set(ims)):
        problems.append((os.path.join(gt_dir, gts[stem]), f"no image named {stem}.* in {image_dir}"))
    if problems and not skip_bad:
        _raise(name, problems[0])

    samples: list[Sample] = []
    stems = sorted(set(ims) & set(gts))
    if progress:
        from tqdm import tqdm
        stems = tqdm(stems, desc=f"checking {name}", unit="img")
    for stem in stems:
        ip, mp = os.path.join(image_dir, ims[stem]), os.path.join(gt_dir, gts[stem])
        try:
            if check == "full":
                ihw = images.read_image(files.open(ip), ip).shape[:2]
                mhw = images.read_mask(files.open(mp), mp).shape[:2]
            else:
                ihw, mhw = images.read_size(files.open(ip), ip), images.read_size(files.open(mp), mp)
        except images.ImageReadError as e:
            problem = (mp if str(e).startswith(mp + ":") else ip, _reason(e))
            if not skip_bad:
                _raise(name, problem)
            problems.append(problem)
            continue
        if tuple(ihw) != tuple(mhw):
            problem = (ip, f"image is {ihw[0]}x{ihw[1]} but its mask {mp} is {mhw[0]}x{mhw[1]} (HxW)")
            if not skip_bad:
                _raise(name, problem)
            problems.append(problem)
            continue
        samples.append(Sample(stem, ip, mp, name, int(ihw[0]), int(ihw[1])))
    if problems:
        log.warning("dataset %s: skipped %d bad sample file(s), kept %d; first: %s: %s",
                    name, len(problems), len(samples), *problems[0])
    return Dataset(name, samples, problems, labels)


def read_labels(source: "Sample | str | os.PathLike", labels: MaskLabels = DEFAULT_LABELS) -> tuple:
    """A sample's mask (or a mask file) as (object (H, W) bool, ignored pixels (H, W) bool or None), by the
    dataset's ``labels``."""
    src, name = (source.mask_file(), source.mask_path) if isinstance(source, Sample) else (source, None)
    if labels.channels == "max":
        values = images.read_image(src, name).max(axis=2)
    elif labels.channels == "first":
        values = images.read_mask(src, name)
    else:
        raise ValueError(f"MaskLabels.channels must be 'first' or 'max', not {labels.channels!r}")
    ignore = None if labels.ignore is None else values == labels.ignore
    fg = values > labels.foreground_above
    return (fg, None) if ignore is None else (fg & ~ignore, ignore)


def _reason(e: Exception) -> str:
    msg = str(e)  # "<path>: <reason>"
    return msg.split(": ", 1)[1] if ": " in msg else msg


def _raise(name: str, problem: tuple[str, str]):
    f, reason = problem
    raise DatasetError(f"{f}: {reason} (dataset {name}); fix or remove the file, "
                       "or pass skip_bad=True to leave bad samples out")


def open_dataset(name: str, data_root: str, *, skip_bad: bool = False, check: str = "header",
                 progress: bool = False) -> Dataset:
    """Open the named dataset (see ``DATASETS``) under ``data_root``; validated, sorted by name."""
    if name in GROUPS:
        raise DatasetError(f"{name} is a group of datasets; use open_datasets({name!r}, ...)")
    (name,) = resolve_names([name])
    spec = DATASETS[name]
    return open_folder(os.path.join(data_root, spec.image_dir), os.path.join(data_root, spec.gt_dir),
                       name=name, image_ext=spec.image_ext, skip_bad=skip_bad, check=check,
                       progress=progress, labels=spec.labels)


def open_datasets(names: str | Iterable[str], data_root: str, **kw) -> list[Dataset]:
    """Open several datasets (names or groups, comma-separated allowed), in order."""
    return [open_dataset(n, data_root, **kw) for n in resolve_names(names)]
