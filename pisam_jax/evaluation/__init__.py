"""Evaluation: metrics (pysodmetrics + boundary metrics), the click protocol's model-free parts, reports,
and (imported on their own, they load JAX models) ``segmenter`` (a model under the test-time geometry),
``loop`` (resumable box evaluation of datasets) and ``interactive`` (the click protocol), used by ``eval.py``.

    from pisam_jax.evaluation import MetricSuite, DIS_METRICS
    suite = MetricSuite(DIS_METRICS)
    for name, pred, gt in pairs:        # (H, W) uint8 0/255 prediction, 0..255 ground truth
        suite.update(pred, gt, name)
    suite.results()                     # {"max_f": ..., "weighted_f": ..., ..., "num_images": n}
"""

from pisam_jax.evaluation.metrics import (
    BIG_METRICS,
    CLICK_METRICS,
    DIS_METRICS,
    LOWER_IS_BETTER,
    MASK_METRICS,
    METRICS,
    SOD_METRICS,
    MetricSuite,
    boundary_iou,
    iou,
    mask_to_boundary,
    mba,
)

__all__ = [
    "BIG_METRICS", "CLICK_METRICS", "DIS_METRICS", "LOWER_IS_BETTER", "MASK_METRICS", "METRICS",
    "SOD_METRICS", "MetricSuite", "boundary_iou", "iou", "mask_to_boundary", "mba",
]
