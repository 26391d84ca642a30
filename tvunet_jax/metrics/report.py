"""A `SegmentationAccumulator.result()` report made loggable and serialisable.

This module owns the two views of a report that leave the metrics package: flat float scalars
for logging (`summary_scalars`) and a numpy-free copy for `json.dump` (`to_jsonable`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

SUMMARY_TABLE_KEYS = (
  "dice",
  "iou",
  "class_mean_iou",
  "precision",
  "recall",
  "specificity",
  "accuracy",
  "paper_miou",
)


def summary_scalars(result: Mapping[str, Any], threshold: float = 0.5) -> dict[str, float]:
  """Flat float scalars of a `SegmentationAccumulator.result()` for logging.

  Args:
    result: the report (extra top-level numbers, e.g. a loss, are passed through).
    threshold: the table row to report; must be one of `result['threshold']`
      or `result['operating_threshold']`.

  Returns:
    {'dice', 'iou', 'class_mean_iou', 'precision', 'recall', 'specificity',
    'accuracy', 'paper_miou'} at `threshold`, plus 'paper_miou_soft',
    'average_precision', 'mean_volume_dice', the 'connectivity' entries and
    every other top-level int / float of `result`.
  """
  thresholds = np.asarray(result["threshold"], np.float64)
  hit = np.flatnonzero(np.isclose(thresholds, threshold, rtol=0, atol=1e-9))
  if hit.size:
    row = {k: float(result[k][hit[0]]) for k in SUMMARY_TABLE_KEYS}
  elif np.isclose(result.get("operating_threshold", np.nan), threshold, rtol=0, atol=1e-9):
    row = {k: float(result["operating"][k]) for k in SUMMARY_TABLE_KEYS}
  else:
    raise ValueError(
      f"metrics.summary_scalars: threshold {threshold} is neither in the table "
      f"{thresholds.tolist()} nor the operating threshold"
    )
  out = dict(row)
  for k, v in result.items():
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
      out.setdefault(k, float(v))
  out.update({k: float(v) for k, v in result.get("connectivity", {}).items()})
  return out


def to_jsonable(obj: Any) -> Any:
  """Numpy-free copy of a report for `json.dump`: arrays -> lists, NaN / inf -> None."""
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_jsonable(obj.tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, (str, type(None))):
    return obj
  if isinstance(obj, np.str_):
    return str(obj)
  raise TypeError(f"metrics.to_jsonable: cannot convert {type(obj).__name__}")
