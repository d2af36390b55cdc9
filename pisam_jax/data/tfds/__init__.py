"""The paper's datasets as TensorFlow Datasets (ArrayRecord files), prepared and read without TensorFlow.

Importing this package registers the builders ``dis5k``, ``thin_object5k``, ``hrsod``, ``uhrsd``, ``big``, the
HQSeg-44K sets ``fss``, ``duts``, ``ecssd``, ``msra10k``, and ``synthetic`` (``builders``), so that

    tfds.builder("dis5k", data_dir=D, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=M))
    tfds.data_source("dis5k", split="te1", data_dir=D)

work, as does the command ``python -m pisam_jax.data.tfds prepare dis5k --manual_dir M --data_dir D``.
``open_dataset`` / ``open_datasets`` (``reader``) give the project's ``Dataset``s of a prepared one, named as for
the folder readers (``DIS5K-TE1``, groups): ``train.py --config.data.source=tfds`` and ``eval.py --source=tfds``.

Modules: ``manual`` (finding a dataset's folders in the manual folder, extracted or zipped), ``builders``,
``reader``, ``__main__`` (the command).
"""

from pisam_jax.data.tfds.builders import INDEX, MANUAL_BUILDERS, SPLIT_OF, ManualBuilder, Synthetic, SyntheticConfig
from pisam_jax.data.tfds.reader import TfdsSample, open_dataset, open_datasets, prepare, prepare_datasets, resolve_names

__all__ = [
    "INDEX", "MANUAL_BUILDERS", "SPLIT_OF", "ManualBuilder", "Synthetic", "SyntheticConfig", "TfdsSample",
    "open_dataset", "open_datasets", "prepare", "prepare_datasets", "resolve_names",
]
