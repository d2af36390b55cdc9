"""Data: readers for the paper's datasets, synthetic thin-structure data, grain pipelines, clicks.

Modules, one job each:
  images     read an image (uint8 RGB) or a mask (uint8 0..255), errors naming the file
  datasets   named datasets under a data root (PISAM_SPEC 7.1), pairing and validation
  synthetic  deterministic high-resolution thin-structure images with exact masks (+ CLI)
  pipeline   grain pipelines: training (flip, large-scale jitter, box) and evaluation (D7)
  clicks     click simulation from prediction errors (spec 6, D3)
  tfds       the datasets as TFDS ArrayRecord builders, prepared and read without TensorFlow (imported on demand)
"""

from pisam_jax.data.clicks import simulate_clicks, simulate_clicks_batch
from pisam_jax.data.datasets import (DATASETS, GROUPS, Dataset, DatasetError, Sample, open_dataset,
                                     open_datasets, open_folder, resolve_names)
from pisam_jax.data.images import ImageReadError, binarize, read_image, read_mask

__all__ = [
    "DATASETS", "GROUPS", "Dataset", "DatasetError", "ImageReadError", "Sample", "binarize",
    "open_dataset", "open_datasets", "open_folder", "read_image", "read_mask", "resolve_names",
    "simulate_clicks", "simulate_clicks_batch",
]
