"""Confusion counts and the ratios made from them: the paper's threshold table, and `paper_miou`.

This module owns tp / fp / fn / tn per threshold (`confusion_counts`), the one place where
summed counts become precision, recall, specificity, Dice, IoU, class-mean IoU, accuracy and the
authors' `paper_miou` (`metrics_from_counts`), the paper's table in one call
(`threshold_metrics`), and the authors' smoothed Jaccard (`paper_jaccard`, `paper_miou_stats`,
`paper_miou`).

Conventions (implemented everywhere, tested)
--------------------------------------------
  * Prediction rule: a pixel is positive at threshold t iff `prob >= t`, with t
    cast to the (at least float32) dtype of `probs`, so that the numpy and the
    jit paths agree bit for bit. This is scikit-learn's rule
    (`precision_recall_curve`). The authors' script thresholds with `prob > t`;
    the two differ only for pixels exactly equal to t.
  * Count dtypes: on the host (numpy) counts are int64 without weights and float64
    with them; the accumulator stores float64, exact for integers below 2**53 (100
    volumes of 512 x 512 x 100 voxels are 2.6e9). Inside `jax.jit` (x64 off) counts
    are int32 without weights (exact below 2**31 pixels per call, i.e. per batch)
    and float32 with weights; sum per-batch results on the host in float64.
  * Zero division / empty masks: a ratio whose denominator is 0 is undefined
    and reported as `zero_division`, default NaN, exactly as scikit-learn's
    `zero_division=np.nan`: precision with no predicted positive; recall with no
    true positive pixel; Dice and IoU when prediction and truth are both empty.
    Pass `zero_division=0.0` or `1.0` to get scikit-learn's other settings. A
    prediction that is empty while the truth is not (or the reverse) is a
    defined failure: Dice 0, IoU 0.
  * `class_mean_iou` averages the classes whose IoU is defined (scikit-learn's
    macro average with NaNs dropped).

The paper's "mIoU" (`paper_miou`)
---------------------------------
The authors' script (github.com/narges-sa/COVID-CT-Segmentation,
`main_TV_Unet_Split1.py`) binarises both output channels (background, lesion)
at each threshold and evaluates the keras-contrib `jaccard_distance` similarity

    intersection = sum(|y_true * y_pred|, axis=-1)
    sum_ = sum(|y_true| + |y_pred|, axis=-1)
    jac = (intersection + smooth) / (sum_ - intersection + smooth),  smooth = 100

with the sum over the last (channel) axis only, then averages `jac` over all
pixels. Per pixel the smoothing term 100 dwarfs the at most 2 channel values
it is added to, so the number is not an intersection-over-union: a wrong pixel
scores 100 / 102 = 0.980 with the two complementary one-hot channels
(100 / 101 = 0.990 with the lesion channel alone), a right one scores 1. Any
prediction, even an all-wrong one, scores >= 0.980, and predicting nothing at
all on slices with 2% lesion pixels scores 1 - 0.02 * 2 / 102 = 0.9996. It is
reported only under the name `paper_miou`, beside the foreground `iou`
(tp / (tp + fp + fn)) and the standard `class_mean_iou`. `paper_channels=2`
(default) builds the authors' two channels from the lesion map as (1 - x, x);
`paper_channels=1` uses the lesion channel alone. In the threshold table it is
computed on the binarised prediction at each threshold, which is how the
authors obtained their table; `paper_miou_soft` is the same formula on the
probabilities (what a Keras training metric would have shown). Pixels are
pooled (sum / count), which equals the authors' mean over their test array.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from tvunet_jax.metrics.inputs import (
  ArrayLike,
  _check_thresholds,
  _device_inputs,
  _host_inputs,
  _is_jax,
)

# The paper's table: 0.1, 0.2, ..., 0.9 as nearest doubles (arange gives 0.30000000000000004).
PAPER_THRESHOLDS = np.arange(1, 10) / 10
PAPER_SMOOTH = 100.0
COUNT_KEYS = ("tp", "fp", "fn", "tn")
TABLE_KEYS = (
  "threshold",
  "precision",
  "recall",
  "specificity",
  "dice",
  "iou",
  "background_iou",
  "class_mean_iou",
  "paper_miou",
  "accuracy",
  "tp",
  "fp",
  "fn",
  "tn",
)


def confusion_counts(
  probs: ArrayLike, labels: ArrayLike, thresholds: ArrayLike, weights: ArrayLike | None = None
) -> dict[str, Any]:
  """tp, fp, fn, tn of `probs >= t` against `labels`, summed over all pixels, per threshold.

  Pure jnp (jit-compatible, sharding-friendly: only elementwise ops and sums)
  when any input is a `jax.Array`, numpy otherwise.

  Args:
    probs: (...) float probabilities (any shape; bool/int binary predictions allowed).
    labels: (...) {0, 1} mask, same shape.
    thresholds: (T,) floats, any order; compared in the dtype of `probs`.
    weights: optional pixel weights broadcastable to `probs.shape`.

  Returns:
    {'tp', 'fp', 'fn', 'tn'}, each (T,): numpy int64 (float64 with weights), or
    jax int32 (float32 with weights).
  """
  thr = _check_thresholds(thresholds, "confusion_counts") if not _is_jax(thresholds) else thresholds
  if _is_jax(probs, labels, weights, thresholds):
    p, y, w = _device_inputs(probs, labels, weights, "confusion_counts")
    thr = jnp.asarray(thr).astype(p.dtype)
    # (..., T) comparisons feeding sums (XLA fuses them): no sort, gather or
    # scatter, which Explicit-sharded inputs reject or would need told where to go.
    ge = p[..., None] >= thr
    axes = tuple(range(p.ndim))
    if w is None:
      pos_ge = jnp.sum(ge & y[..., None], axis=axes, dtype=jnp.int32)
      all_ge = jnp.sum(ge, axis=axes, dtype=jnp.int32)
      n_pos = jnp.sum(y, dtype=jnp.int32)
      n = jnp.int32(p.size)
    else:
      wge = jnp.where(ge, w[..., None], 0)
      pos_ge = jnp.sum(jnp.where(y[..., None], wge, 0), axis=axes)
      all_ge = jnp.sum(wge, axis=axes)
      n_pos = jnp.sum(jnp.where(y, w, 0))
      n = jnp.sum(w)
  else:
    p, y, w = _host_inputs(probs, labels, weights, "confusion_counts")
    pos_ge, all_ge = _host_counts_ge(p, y, w, thr.astype(p.dtype))
    n_pos = y.sum() if w is None else w[y].sum()
    n = p.size if w is None else w.sum()
  tp = pos_ge
  fp = all_ge - pos_ge
  return {"tp": tp, "fp": fp, "fn": n_pos - tp, "tn": (n - n_pos) - fp}


def _host_counts_ge(
  p: np.ndarray, y: np.ndarray, w: np.ndarray | None, thr: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(positives with p >= thr_j, all pixels with p >= thr_j), each (T,); O(N log T) time."""
  order = np.argsort(thr, kind="stable")
  # k = number of (sorted) thresholds <= p: the pixel is predicted positive at
  # exactly the first k sorted thresholds.
  k = np.searchsorted(thr[order], p.ravel(), side="right")
  n_bins = thr.size + 1
  if w is None:
    pos_hist = np.bincount(k[y.ravel()], minlength=n_bins)
    all_hist = np.bincount(k, minlength=n_bins)
  else:
    wf = w.ravel()
    pos_hist = np.bincount(k, weights=np.where(y.ravel(), wf, 0.0), minlength=n_bins)
    all_hist = np.bincount(k, weights=wf, minlength=n_bins)
  # Positive at sorted threshold j <=> k > j: reverse cumulative sum, shifted.
  pos_ge = np.empty(thr.size, pos_hist.dtype)
  all_ge = np.empty(thr.size, all_hist.dtype)
  pos_ge[order] = np.cumsum(pos_hist[::-1])[::-1][1:]
  all_ge[order] = np.cumsum(all_hist[::-1])[::-1][1:]
  return pos_ge, all_ge


# ----------------------------------------------------------------------------- paper_miou


def paper_jaccard(y_true: ArrayLike, y_pred: ArrayLike, smooth: float = PAPER_SMOOTH) -> Any:
  """The authors' (keras-contrib `jaccard_distance`) smoothed Jaccard, reduced over the last axis.

  `(sum(|t * p|) + smooth) / (sum(|t| + |p|) - sum(|t * p|) + smooth)` with the
  sums over axis -1 (channels) only. Not an IoU: see the module docstring.

  Args:
    y_true: (..., C) targets.
    y_pred: (..., C) predictions (probabilities or binarised), same shape.
    smooth: the smoothing constant (the authors': 100).

  Returns:
    (...) per-pixel values in [smooth / (smooth + C), 1] for inputs in
    [0, 1] (t + p - t p <= 1 per channel); float64 numpy on the host, jnp
    float under jax.
  """
  if _is_jax(y_true, y_pred):
    xp, t, p = jnp, jnp.asarray(y_true), jnp.asarray(y_pred)
  else:
    xp, t, p = np, np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
  if t.shape != p.shape:
    raise ValueError(f"metrics.paper_jaccard: y_true shape {t.shape} != y_pred shape {p.shape}")
  intersection = xp.sum(xp.abs(t * p), axis=-1)
  sum_ = xp.sum(xp.abs(t) + xp.abs(p), axis=-1)
  return (intersection + smooth) / (sum_ - intersection + smooth)


def _paper_channels(x: Any, channels: int, xp: Any) -> Any:
  """(...) lesion map -> (..., C): C=1 (x,), C=2 the authors' one-hot layout (1 - x, x)."""
  if channels == 1:
    return x[..., None]
  if channels == 2:
    return xp.stack([1 - x, x], axis=-1)
  raise ValueError(f"metrics: paper_channels must be 1 or 2, got {channels}")


def paper_miou_stats(
  probs: ArrayLike,
  labels: ArrayLike,
  *,
  weights: ArrayLike | None = None,
  paper_channels: int = 2,
  smooth: float = PAPER_SMOOTH,
) -> dict[str, Any]:
  """Sufficient statistics of the soft `paper_miou`: sum of per-pixel `paper_jaccard` and count.

  Args:
    probs: (...) float lesion probabilities (used as given, not thresholded).
    labels: (...) {0, 1} mask.
    weights: optional pixel weights broadcastable to `probs.shape`.
    paper_channels: 2 = (background, lesion) one-hot as the authors; 1 = lesion only.
    smooth: the smoothing constant.

  Returns:
    {'paper_jaccard_sum': scalar, 'pixel_count': scalar (count or weight sum)};
    float64 on the host, float32 under jax.
  """
  if _is_jax(probs, labels, weights):
    p, y, w = _device_inputs(probs, labels, weights, "paper_miou_stats")
    xp = jnp
    y = y.astype(p.dtype)
  else:
    p, y, w = _host_inputs(probs, labels, weights, "paper_miou_stats")
    xp = np
    p, y = p.astype(np.float64), y.astype(np.float64)
  jac = paper_jaccard(
    _paper_channels(y, paper_channels, xp), _paper_channels(p, paper_channels, xp), smooth
  )
  if w is None:
    return {"paper_jaccard_sum": xp.sum(jac), "pixel_count": xp.asarray(p.size, jac.dtype)}
  return {"paper_jaccard_sum": xp.sum(jac * w), "pixel_count": xp.sum(w)}


def paper_miou(
  probs: ArrayLike,
  labels: ArrayLike,
  threshold: float | None = None,
  *,
  weights: ArrayLike | None = None,
  paper_channels: int = 2,
  smooth: float = PAPER_SMOOTH,
) -> float:
  """The authors' "mIoU": the pixel mean of `paper_jaccard`. NOT an intersection-over-union.

  Each pixel is scored on its own with smoothing 100, so a wrong pixel costs
  only 2 / 102 (one channel: 1 / 101): an all-wrong binary prediction scores
  100 / 102 = 0.980, and predicting nothing on slices with 2% lesion pixels
  scores 0.9996. Report `iou` / `class_mean_iou` for segmentation quality.

  Args:
    probs: (...) float lesion probabilities.
    labels: (...) {0, 1} mask.
    threshold: None = on the probabilities (`paper_miou_soft`); a float = on
      `probs >= threshold` (the authors' table).
    weights: optional pixel weights broadcastable to `probs.shape`.
    paper_channels: 2 (authors' background + lesion one-hot) or 1 (lesion only).
    smooth: the smoothing constant.

  Returns:
    The weighted pixel mean as a Python float (NaN for zero pixels / weight).
  """
  p, y, w = _host_inputs(probs, labels, weights, "paper_miou")
  if threshold is not None:
    p = (p >= np.asarray(threshold, p.dtype)).astype(p.dtype)
  stats = paper_miou_stats(p, y, weights=w, paper_channels=paper_channels, smooth=smooth)
  count = float(stats["pixel_count"])
  return float(stats["paper_jaccard_sum"]) / count if count > 0 else float("nan")


# ----------------------------------------------------------------------------- counts to ratios


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  out = np.full(np.broadcast_shapes(num.shape, den.shape), float(zero_division))
  np.divide(num, den, out=out, where=den > 0)
  return out


def metrics_from_counts(
  counts: Mapping[str, ArrayLike],
  *,
  zero_division: float = np.nan,
  paper_channels: int = 2,
  smooth: float = PAPER_SMOOTH,
) -> dict[str, np.ndarray]:
  """Ratios from summed counts: the one place where sums become metrics.

  Args:
    counts: {'tp', 'fp', 'fn', 'tn'} arrays of one shape (e.g. (T,)), already
      summed over batches / devices / hosts; an optional 'threshold' is copied.
    zero_division: value of a ratio with a zero denominator (NaN, 0.0 or 1.0).
    paper_channels: channel layout of `paper_miou` (2 authors', 1 lesion only).
    smooth: `paper_miou` smoothing.

  Returns:
    float64 arrays of the counts' shape: 'precision', 'recall' (sensitivity),
    'specificity', 'dice' (= F1), 'iou' (foreground), 'background_iou',
    'class_mean_iou', 'paper_miou' (binarised), 'accuracy', and the counts
    'tp', 'fp', 'fn', 'tn' as float64.
  """
  missing = [k for k in COUNT_KEYS if k not in counts]
  if missing:
    raise ValueError(f"metrics.metrics_from_counts: counts lack {missing}")
  if paper_channels not in (1, 2):
    raise ValueError(
      f"metrics.metrics_from_counts: paper_channels must be 1 or 2, got {paper_channels}"
    )
  tp, fp, fn, tn = (np.asarray(counts[k], np.float64) for k in COUNT_KEYS)
  n = tp + fp + fn + tn
  fg_iou = _ratio(tp, tp + fp + fn, zero_division)
  bg_iou = _ratio(tn, tn + fp + fn, zero_division)
  # Mean over the classes whose IoU is defined (both are whenever n > 0 and
  # zero_division is a number).
  class_mean = np.where(
    np.isnan(fg_iou), bg_iou, np.where(np.isnan(bg_iou), fg_iou, (fg_iou + bg_iou) / 2)
  )
  # Binarised pixels score 1 when right and smooth / (smooth + C) when wrong
  # (C = paper_channels), so the authors' pixel mean follows from the counts.
  wrong = smooth / (smooth + paper_channels)
  out = {
    "precision": _ratio(tp, tp + fp, zero_division),
    "recall": _ratio(tp, tp + fn, zero_division),
    "specificity": _ratio(tn, tn + fp, zero_division),
    "dice": _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
    "iou": fg_iou,
    "background_iou": bg_iou,
    "class_mean_iou": class_mean,
    "paper_miou": _ratio(tp + tn + (fp + fn) * wrong, n, zero_division),
    "accuracy": _ratio(tp + tn, n, zero_division),
    "tp": tp,
    "fp": fp,
    "fn": fn,
    "tn": tn,
  }
  if "threshold" in counts:
    out = {"threshold": np.asarray(counts["threshold"], np.float64), **out}
  return out


def threshold_metrics(
  probs: ArrayLike,
  labels: ArrayLike,
  thresholds: ArrayLike = PAPER_THRESHOLDS,
  *,
  weights: ArrayLike | None = None,
  zero_division: float = np.nan,
  paper_channels: int = 2,
  smooth: float = PAPER_SMOOTH,
) -> dict[str, np.ndarray]:
  """The paper's table in one shot, pooled over all pixels (host side; in jit use `batch_stats`).

  Args:
    probs: (...) float lesion probabilities, numpy or (concrete) jax.
    labels: (...) {0, 1} mask, same shape.
    thresholds: (T,) thresholds, default 0.1, ..., 0.9.
    weights: optional pixel weights broadcastable to `probs.shape`.
    zero_division, paper_channels, smooth: see `metrics_from_counts`.

  Returns:
    `TABLE_KEYS` -> (T,) float64 arrays ('threshold' first).
  """
  thr = _check_thresholds(thresholds, "threshold_metrics")
  counts = confusion_counts(
    np.asarray(probs), np.asarray(labels), thr, None if weights is None else np.asarray(weights)
  )
  return metrics_from_counts(
    {"threshold": thr, **counts},
    zero_division=zero_division,
    paper_channels=paper_channels,
    smooth=smooth,
  )
