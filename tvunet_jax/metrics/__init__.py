"""Segmentation metrics: counts -> precision/recall/Dice/IoU/paper_miou; PR curve; components.

This package owns every number reported about a predicted lesion-probability map
against a binary lesion mask: the paper's threshold table, the precision-recall
curve and average precision, per-volume Dice and connectivity statistics (the
paper's claim that the TV term yields fewer, connected lesion components). It
knows no files, devices or training loop.

Inputs are the lesion probability map `probs` (B, H, W) float in [0, 1] and the
mask `labels` (B, H, W) in {0, 1} (any shape works where stated; for the
authors' 2-channel model pass channel 1, the lesion channel).

Sufficient statistics (scenic / nnU-Net habit): every quantity is accumulated as
sums that reduce by plain addition across batches, devices and hosts, and is
turned into ratios once at the end:

  * tp, fp, fn, tn per threshold (`confusion_counts`, `batch_stats`);
  * positive / negative score histograms over `num_bins` equal bins of [0, 1],
    whose reverse cumulative sums are the exact tp / fp at every bin edge
    (`score_histogram`), for the PR curve and average precision;
  * the sum of the authors' per-pixel smoothed Jaccard and the pixel count
    (`paper_miou_stats`);
  * per-volume tp / fp / fn and per-slice component counts
    (`SegmentationAccumulator`).

Modules, each with its conventions in its docstring:
  inputs        validation and conversion of probs / labels / weights / thresholds
  counts        confusion counts -> ratios; the paper's table; the authors' `paper_miou`
  curves        score histograms, PR curve, average precision
  components    per-slice connected components
  lesionwise    3D lesion matching: lesion-wise Dice and HD95 (BraTS 2023), FP / FN volumes
                (autoPET)
  accumulator   per-batch sums (`batch_stats`) and `SegmentationAccumulator`
  report        `summary_scalars` for logging, `to_jsonable` for JSON
"""

from __future__ import annotations

from tvunet_jax.metrics.accumulator import SegmentationAccumulator, batch_stats
from tvunet_jax.metrics.components import COMPONENT_KEYS, component_counts
from tvunet_jax.metrics.counts import (
  COUNT_KEYS,
  PAPER_SMOOTH,
  PAPER_THRESHOLDS,
  TABLE_KEYS,
  confusion_counts,
  metrics_from_counts,
  paper_jaccard,
  paper_miou,
  paper_miou_stats,
  threshold_metrics,
)
from tvunet_jax.metrics.curves import (
  average_precision,
  average_precision_from_histogram,
  pr_curve,
  pr_curve_from_histogram,
  score_histogram,
)
from tvunet_jax.metrics.inputs import ArrayLike
from tvunet_jax.metrics.lesionwise import lesionwise_scores, robust_hausdorff
from tvunet_jax.metrics.lesionwise import summarize as summarize_lesionwise
from tvunet_jax.metrics.report import SUMMARY_TABLE_KEYS, summary_scalars, to_jsonable

__all__ = [
  "COMPONENT_KEYS",
  "COUNT_KEYS",
  "PAPER_SMOOTH",
  "PAPER_THRESHOLDS",
  "SUMMARY_TABLE_KEYS",
  "TABLE_KEYS",
  "ArrayLike",
  "SegmentationAccumulator",
  "average_precision",
  "average_precision_from_histogram",
  "batch_stats",
  "component_counts",
  "confusion_counts",
  "lesionwise_scores",
  "metrics_from_counts",
  "paper_jaccard",
  "paper_miou",
  "paper_miou_stats",
  "pr_curve",
  "pr_curve_from_histogram",
  "robust_hausdorff",
  "score_histogram",
  "summarize_lesionwise",
  "summary_scalars",
  "threshold_metrics",
  "to_jsonable",
]
