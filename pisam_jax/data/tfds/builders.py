"""TFDS builders of the paper's datasets and of synthetic data; importing this module registers them.

Every example is one image/mask pair as its files hold it: ``image`` and ``mask`` are the files' bytes, not
re-encoded (TFDS ``Image`` features given the encoded bytes), ``file_name`` / ``mask_file_name`` their names and
``height`` / ``width`` the image's (EXIF-oriented) size. Examples are in name order, the folder readers' order
(``disable_shuffling``), and ``info.metadata["samples"][split]`` lists (name, file name, mask file name, height,
width) in record order, so a split's samples are known without reading its records.

The paper's datasets are prepared from a manual download folder (``manual.ManualFolder``: extracted folders or
zip archives); a split whose folders are absent is skipped with a warning, bad files stop the preparation with a
``DatasetError`` naming the file (``skip_bad=True``: left out), as ``datasets.open_folder``. ``synthetic``
generates ``data.synthetic`` samples, its config name giving their number, size, seed and detail.

Preparation and reading go through the TFDS Python API and never import TensorFlow; the file format defaults to
ArrayRecord (what ``tfds.data_source`` and grain read).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from pisam_jax.data import datasets, images, synthetic
from pisam_jax.data.tfds import manual

log = logging.getLogger(__name__)

INDEX = "samples"  # info.metadata[INDEX][split]: [name, file_name, mask_file_name, height, width] per record
FILE_FORMAT = "array_record"


class PairBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image/mask pairs as their files hold them (module docstring); subclasses say where they come from."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The image and mask files as distributed, their names and the image size."}
    HOMEPAGE = None

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), doc="the image file's bytes, as distributed"),
                "mask": tfds.features.Image(shape=(None, None, 1), doc="the mask file's bytes (foreground > 128)"),
                "file_name": tfds.features.Text(doc="the image file's name"),
                "mask_file_name": tfds.features.Text(doc="the mask file's name"),
                "height": tfds.features.Scalar(np.int32, doc="image height (EXIF-oriented)"),
                "width": tfds.features.Scalar(np.int32, doc="image width (EXIF-oriented)"),
            }),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep the name order: the same order as the folder readers
        )

    def _generate_examples(self, split: str, pairs):
        """``pairs``: (name, file name, mask file name, image bytes, mask bytes, height, width), in name order.

        Records the split's index (``INDEX``) as the records are written, key = position."""
        index = self.info.metadata.setdefault(INDEX, {}).setdefault(split, [])
        index.clear()
        for i, (name, file_name, mask_file_name, image, mask, h, w) in enumerate(pairs):
            index.append([name, file_name, mask_file_name, int(h), int(w)])
            yield i, dict(image=image, mask=mask, file_name=file_name, mask_file_name=mask_file_name,
                          height=np.int32(h), width=np.int32(w))


class ManualBuilder(PairBuilder, skip_registration=True):
    """A dataset of the paper, prepared from a manual download folder; ``SPLITS``: split -> ``datasets`` name."""

    SPLITS: dict[str, str] = {}

    def __init__(self, *, skip_bad: bool = False, check: str = "header", progress: bool = True, **kwargs):
        if check not in ("header", "full"):
            raise ValueError(f"check must be 'header' or 'full', not {check!r}")
        self._skip_bad, self._check, self._progress = skip_bad, check, progress
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        folder = manual.ManualFolder(root)
        found = {}
        for split, name in self.SPLITS.items():
            spec = datasets.DATASETS[name]
            where = folder.find(spec)
            if where is None:
                log.warning("%s: %s (%s, %s) not in %s; split %r skipped", self.name, name, spec.image_dir,
                            spec.gt_dir, root, split)
                continue
            ds = datasets.open_folder(where.image_dir, where.gt_dir, name=name, image_ext=spec.image_ext,
                                      skip_bad=self._skip_bad, check=self._check, progress=self._progress,
                                      files=where.files)
            if not ds.samples:
                log.warning("%s: %s has no image/mask pairs in %s; split %r skipped", self.name, name,
                            where.where, split)
                continue
            log.info("%s: split %r = %s, %d pairs from %s", self.name, split, name, len(ds), where.where)
            found[split] = (where.files, ds.samples)
        if not found:
            expected = ", ".join(f"{datasets.DATASETS[n].image_dir} and {datasets.DATASETS[n].gt_dir}"
                                 for n in self.SPLITS.values())
            raise datasets.DatasetError(
                f"{root}: no split of {self.name} found (looked for {expected}, extracted or in a .zip); "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().split("\n")[0])
        return {split: self._generate_examples(split, _read_pairs(files, samples))
                for split, (files, samples) in found.items()}


def _read_pairs(files: datasets.Files, samples):
    for s in samples:
        yield (s.name, os.path.basename(s.image_path), os.path.basename(s.mask_path),
               manual.read_bytes(files, s.image_path), manual.read_bytes(files, s.mask_path), s.height, s.width)


def _instructions(archive: str, layout: str, source: str) -> str:
    return (f"Download {archive} ({source}) and put it, or the folder it extracts to, in the manual folder "
            f"(--manual_dir). Layout: {layout}. HQ-SAM's HQSeg-44K archives hold the same folders and work "
            "as well. Splits whose folders are absent are skipped.")


class Dis5k(ManualBuilder):
    """DIS5K (Qin et al., ECCV 2022): highly accurate dichotomous image segmentation, 5470 images."""

    name = "dis5k"
    HOMEPAGE = "https://github.com/xuebinqin/DIS"
    SPLITS = {"train": "DIS5K-TR", "validation": "DIS5K-VD",
              **{f"te{i}": f"DIS5K-TE{i}" for i in range(1, 5)}}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "DIS5K.zip", "DIS5K/DIS-TR/{im,gt}, DIS5K/DIS-VD/{im,gt}, DIS5K/DIS-TE1..4/{im,gt}",
        "the DIS project page")


class ThinObject5k(ManualBuilder):
    """ThinObject-5K (Liew et al., ICCV 2021): objects with thin structures, 5748 images."""

    name = "thin_object5k"
    HOMEPAGE = "https://github.com/liewjunhao/thin-object-selection"
    SPLITS = {"train": "ThinObject5K-TR", "test": "ThinObject5K-TE"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "ThinObject5K.zip", "ThinObject5K/{images,masks}_{train,test}", "the thin-object-selection project")


class Hrsod(ManualBuilder):
    """HRSOD (Zeng et al., ICCV 2019): high-resolution salient object detection, 2010 images."""

    name = "hrsod"
    HOMEPAGE = "https://github.com/yi94code/HRSOD"
    SPLITS = {"train": "HRSOD-TR", "test": "HRSOD-TE"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "HRSOD_release.zip", "HRSOD_release/HRSOD_{train,test} and HRSOD_release/HRSOD_{train,test}_mask",
        "the HRSOD project")


class Uhrsd(ManualBuilder):
    """UHRSD (Xie et al., CVPR 2022): ultra-high-resolution salient object detection, 5920 images."""

    name = "uhrsd"
    HOMEPAGE = "https://github.com/iCVTEAM/PGNet"
    SPLITS = {"train": "UHRSD-TR", "test": "UHRSD-TE"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "UHRSD_TR_2K.zip and UHRSD_TE_2K.zip", "UHRSD_TR_2K/{image,mask}, UHRSD_TE_2K/{image,mask}",
        "the PGNet project")


class Big(ManualBuilder):
    """BIG (Cheng et al., CVPR 2020): 150 very high-resolution images with accurate masks."""

    name = "big"
    HOMEPAGE = "https://github.com/hkchengrex/CascadePSP"
    SPLITS = {"test": "BIG-test", "validation": "BIG-val"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "BIG", "BIG/{test,val}/img and BIG/{test,val}/gt with matching basenames (CascadePSP's files "
        "<name>_im.jpg / <name>_gt.png renamed to <name>.jpg / <name>.png, as for the folder readers)",
        "the CascadePSP project")


class Fss(ManualBuilder):
    """FSS-1000 (Li et al., CVPR 2020) as in HQSeg-44K: images (.jpg) and masks (.png) in one folder."""

    name = "fss"
    SPLITS = {"train": "FSS"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("HQSeg-44K's cascade_psp archive", "fss_all/", "HQ-SAM's data")


class Duts(ManualBuilder):
    """DUTS (Wang et al., CVPR 2017) as in HQSeg-44K: DUTS-TR and DUTS-TE, images and masks in one folder."""

    name = "duts"
    SPLITS = {"train": "DUTS-TR", "test": "DUTS-TE"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("HQSeg-44K's cascade_psp archive", "DUTS-TR/, DUTS-TE/",
                                                 "HQ-SAM's data")


class Ecssd(ManualBuilder):
    """ECSSD (Yan et al., CVPR 2013) as in HQSeg-44K: images and masks in one folder."""

    name = "ecssd"
    SPLITS = {"train": "ECSSD"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("HQSeg-44K's cascade_psp archive", "ecssd/", "HQ-SAM's data")


class Msra10k(ManualBuilder):
    """MSRA10K (Cheng et al., TPAMI 2015) as in HQSeg-44K: images and masks in one folder."""

    name = "msra10k"
    SPLITS = {"train": "MSRA10K"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("HQSeg-44K's cascade_psp archive", "MSRA_10K/",
                                                 "HQ-SAM's data")


MANUAL_BUILDERS: dict[str, type[ManualBuilder]] = {
    b.name: b for b in (Dis5k, ThinObject5k, Hrsod, Uhrsd, Big, Fss, Duts, Ecssd, Msra10k)}
# datasets.DATASETS name -> (builder, split)
SPLIT_OF: dict[str, tuple[str, str]] = {
    ds: (b.name, split) for b in MANUAL_BUILDERS.values() for split, ds in b.SPLITS.items()}


# ------------------------------------------------------------------------------ synthetic

@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """``n_train`` samples of ``seed`` (split train) and ``n_test`` of ``seed + 1`` (split test, when > 0), long
    side ``size``, structure ``detail`` (``data.synthetic``)."""

    n_train: int = 16
    n_test: int = 4
    size: int = 1024
    seed: int = 0
    detail: float = 1.0

    NAME = re.compile(r"train(\d+)_test(\d+)_size(\d+)_seed(\d+)_detail(\d+(?:\.\d+)?)")

    @classmethod
    def of(cls, n_train: int = 16, n_test: int = 4, size: int = 1024, seed: int = 0,
           detail: float = 1.0) -> SyntheticConfig:
        if n_train < 1 or n_test < 0 or size < 64 or seed < 0 or detail <= 0:
            raise ValueError(f"synthetic: n_train >= 1, n_test >= 0, size >= 64, seed >= 0 and detail > 0 "
                             f"(got {n_train}, {n_test}, {size}, {seed}, {detail})")
        return cls(name=f"train{n_train}_test{n_test}_size{size}_seed{seed}_detail{detail:g}",
                   n_train=n_train, n_test=n_test, size=size, seed=seed, detail=float(detail))

    @classmethod
    def parse(cls, name: str) -> SyntheticConfig | None:
        m = cls.NAME.fullmatch(name)
        if m is None:
            return None
        n_train, n_test, size, seed, detail = m.groups()
        return cls.of(int(n_train), int(n_test), int(size), int(seed), float(detail))


class Synthetic(PairBuilder):
    """Synthetic high-resolution thin structures with exact masks (pisam_jax.data.synthetic).

    Config names say what they hold, ``train{n}_test{m}_size{s}_seed{k}_detail{d}``; any such name is valid,
    e.g. ``synthetic/train100_test20_size1024_seed0_detail4``. The files are those that
    ``python -m pisam_jax.data.synthetic`` writes (train: ``--seed k``, test: ``--seed k+1``).
    """

    name = "synthetic"
    BUILDER_CONFIGS = [SyntheticConfig.of()]

    @classmethod
    def get_builder_config(cls, name, version=None):
        return super().get_builder_config(name, version) or SyntheticConfig.parse(name)

    def _split_generators(self, dl_manager):
        c = self.builder_config
        splits = {"train": (c.seed, c.n_train), "test": (c.seed + 1, c.n_test)}
        return {split: self._generate_examples(split, self._pairs(seed, n))
                for split, (seed, n) in splits.items() if n > 0}

    def _pairs(self, seed: int, n: int):
        c = self.builder_config
        for i in range(n):
            name, jpg, png = synthetic.encode_sample(seed, i, c.size, detail=c.detail)
            yield (name, name + ".jpg", name + ".png", jpg, png, *images.read_size(jpg, name))
