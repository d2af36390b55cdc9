"""Prepared TFDS datasets as the project's ``Dataset``s, and their preparation.

``open_dataset("DIS5K-TE1", data_dir)`` gives the same ``Dataset`` as ``datasets.open_dataset`` would from the
folders (same names, order and sizes), whose samples read their pixels from the ArrayRecord files through
``tfds.data_source``: so the grain pipelines, the evaluation and everything else read either source alike. A
dataset is named as for the folder readers (``datasets.DATASETS`` names and groups, mapped to a builder's split
by ``builders.SPLIT_OF``), or as ``BUILDER[/CONFIG]:SPLIT`` for any split of a builder here, e.g.
``synthetic/train16_test4_size1024_seed0_detail1:train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import tensorflow_datasets as tfds

from pisam_jax.data import datasets, images
from pisam_jax.data.datasets import Dataset, DatasetError, Sample
from pisam_jax.data.tfds import builders

RAW = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}  # the files' bytes


def _not_yet_prepared_noise(record: logging.LogRecord) -> bool:
    """TFDS warns "Variant folder D/dis5k/1.0.0 has no dataset_info.json" when asked about a dataset not
    prepared yet; that is what preparing is for."""
    return not str(record.msg).startswith("Variant folder %s has no")


logging.getLogger("absl").addFilter(_not_yet_prepared_noise)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TfdsSample(Sample):
    """A sample stored as record ``index`` of a TFDS data source; ``image_path`` / ``mask_path`` name it in
    messages as ``builder:split[index] file_name``."""

    source: Any = dataclasses.field(default=None, compare=False, repr=False)  # the split's tfds.data_source
    index: int = 0

    def _record(self) -> dict:
        return self.source[self.index]

    def image_file(self) -> io.BytesIO:
        return io.BytesIO(self._record()["image"])

    def mask_file(self) -> io.BytesIO:
        return io.BytesIO(self._record()["mask"])

    def read(self):
        record = self._record()  # one read for both
        return (images.read_image(record["image"], self.image_path),
                images.read_mask(record["mask"], self.mask_path))


def resolve_names(names: str | Iterable[str]) -> list[str]:
    """Dataset names and groups as ``datasets.resolve_names``, ``BUILDER[/CONFIG]:SPLIT`` kept as given."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        for m in ([n] if ":" in n else datasets.resolve_names([n])):
            if m not in out:
                out.append(m)
    return out


def _split_of(name: str) -> tuple[str, str, str]:
    """(builder[/config], split, the Dataset's name) of a resolved name."""
    if ":" in name:
        builder, split = name.rsplit(":", 1)
        return builder, split, f"{builder.replace('/', '_')}-{split}"
    if name not in builders.SPLIT_OF:
        raise DatasetError(f"{name} has no TFDS builder here; those with one: {', '.join(builders.SPLIT_OF)}")
    return (*builders.SPLIT_OF[name], name)


def _prepare_hint(builder: str, data_dir: str | None) -> str:
    manual = "" if builder.startswith("synthetic") else " --manual_dir DOWNLOADS"
    return (f"python -m pisam_jax.data.tfds prepare {builder}{manual}"
            + (f" --data_dir {data_dir}" if data_dir else ""))


def _builder(name: str, data_dir: str | None, **kwargs) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir, **kwargs)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        raise DatasetError(f"TFDS dataset {name}: {str(e).splitlines()[0]}; builders here: "
                           f"{', '.join([*builders.MANUAL_BUILDERS, 'synthetic'])}") from None


def open_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """The prepared TFDS split of ``name`` in ``data_dir`` (default: TFDS's) as a ``Dataset`` of ``TfdsSample``s."""
    builder_name, split, ds_name = _split_of(name)
    builder = _builder(builder_name, data_dir)
    if not builder.is_prepared():
        raise DatasetError(f"TFDS dataset {builder_name} ({ds_name}) is not prepared in {builder.data_dir}; "
                           f"prepare it: {_prepare_hint(builder_name, data_dir)}")
    info = builder.info
    if split not in info.splits:
        raise DatasetError(
            f"{builder.data_dir}: {builder_name} was prepared without split {split!r} ({ds_name}; its folders were "
            f"not in the manual folder then); prepared: {', '.join(info.splits)}. Remove that folder and prepare "
            "again with them")
    rows = (info.metadata or {}).get(builders.INDEX, {}).get(split)
    source = builder.as_data_source(split=split, decoders=RAW)
    if rows is None or len(rows) != len(source):
        raise DatasetError(f"{builder.data_dir}: the index of split {split!r} is missing or does not match its "
                           f"{len(source)} records; remove that folder and prepare again")
    label = f"{builder_name}:{split}"
    samples = [TfdsSample(stem, f"{label}[{i}] {file_name}", f"{label}[{i}] {mask_file_name}", ds_name, h, w,
                          source=source, index=i)
               for i, (stem, file_name, mask_file_name, h, w) in enumerate(rows)]
    return Dataset(ds_name, samples)


def open_datasets(names: str | Iterable[str], data_dir: str | None = None) -> list[Dataset]:
    """Several prepared datasets (names, groups, ``BUILDER[/CONFIG]:SPLIT``; comma-separated allowed), in order."""
    return [open_dataset(n, data_dir) for n in resolve_names(names)]


def prepare(builder_name: str, data_dir: str | None = None, manual_dir: str | None = None, *,
            progress: bool = True, **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Prepare ``builder_name`` (``dis5k``, ..., ``synthetic[/CONFIG]``) as ArrayRecord files in ``data_dir``.

    The paper's datasets read ``manual_dir`` (``builders.ManualBuilder``); ``builder_kwargs``: ``skip_bad``,
    ``check``. An already prepared dataset is left as it is. A failure leaves nothing behind (TFDS writes into a
    temporary folder and renames it at the end); nothing goes to ``data_dir/downloads``.
    """
    kwargs = dict(builder_kwargs)
    if builder_name.split("/")[0] in builders.MANUAL_BUILDERS:
        if not manual_dir:
            raise DatasetError(f"{builder_name} is prepared from the downloaded files: give --manual_dir")
        if not os.path.isdir(manual_dir):
            raise DatasetError(f"--manual_dir {manual_dir}: folder not found")
        kwargs["progress"] = progress
    builder = _builder(builder_name, data_dir, file_format=builders.FILE_FORMAT, **kwargs)
    if builder.is_prepared():
        log.warning("%s: already prepared in %s, left as it is (remove that folder to prepare it again)",
                    builder_name, builder.data_dir)
        return builder
    if not progress:
        tfds.disable_progress_bar()
    new_folders = [d for d in Path(builder.data_dir).parents if not d.exists()]  # TFDS makes them first
    try:
        # TFDS's download folder: unused, not kept; TFDS's messages and progress bars: to stderr, with ours
        with tempfile.TemporaryDirectory(prefix="pisam_tfds_") as tmp, contextlib.redirect_stdout(sys.stderr):
            builder.download_and_prepare(download_dir=tmp, download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir))
    except BaseException:
        for d in new_folders:  # deepest first; TFDS has removed its temporary folder inside
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    return builder


def prepare_datasets(names: str | Iterable[str], data_dir: str | None, manual_dir: str, *,
                     progress: bool = True) -> None:
    """Prepare, from ``manual_dir``, the builders of the named datasets that are not prepared yet."""
    for builder_name in dict.fromkeys(_split_of(n)[0] for n in resolve_names(names)):
        prepare(builder_name, data_dir, manual_dir, progress=progress)
