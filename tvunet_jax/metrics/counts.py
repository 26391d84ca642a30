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
`main_TV_Unet_Split1.py`, `jaccard_distance_loss`) takes the model's 2-channel
sigmoid output (channel 0 background, channel 1 lesion) and, for each threshold
tr in 0.1, ..., 0.9, binarises EVERY channel on its own,
`y_pred_t = (y_pred[:, :, :, :] > tr)`, against the one-hot labels
`label_test[..., ix] = (mask == ix)`, then evaluates

    intersection = sum(y_true * y_pred_t, axis=-1)
    sum_ = sum(|y_true| + |y_pred_t|, axis=-1)
    jac = (intersection + smooth) / (sum_ - intersection + smooth),  smooth = 100

with the sum over the last (channel) axis only, and prints `mean(jac)` over all
pixels. Per pixel the smoothing term 100 dwarfs the at most 2 channel values
it is added to, so the number is not an intersection-over-union: a wrong pixel
scores 100 / 102 = 0.980 with the two complementary one-hot channels
(100 / 101 = 0.990 with the lesion channel alone), a right one scores 1. Any
prediction, even an all-wrong one, scores >= 0.980, and predicting nothing at
all on slices with 2% lesion pixels scores 1 - 0.02 * 2 / 102 = 0.9996. It is
reported only under the name `paper_miou`, beside the foreground `iou`
(tp / (tp + fp + fn)) and the standard `class_mean_iou`.

Two input layouts. Given both head channels, probs (..., 2) with the lesion mask
(...) or (..., 1) (`is_paper_head`), `paper_miou` is the script channel by
channel; the two binarised channels need not be complementary (a pixel may be
predicted as both, or neither). Given the lesion map alone, probs (...) (the
1-output head), the background is rebuilt as (1 - b, b) from the binarised
lesion channel b (`paper_channels=2`, default), which is the script's number only
for a head whose background output crosses the threshold exactly where
1 - lesion does; `paper_channels=1` uses the lesion channel alone. In the
threshold table it is computed on the binarised prediction at each threshold,
which is how the authors obtained their table (`>= t` here, `> t` in the script;
they differ only for outputs exactly equal to t); `paper_miou_soft` is the same
formula on the probabilities (what a Keras training metric would have shown).
Pixels are pooled (sum / count), which equals the authors' mean over their test
array.
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


def is_paper_head(probs: ArrayLike, labels: ArrayLike) -> bool:
  """Whether `probs` holds both channels of the authors' head for the lesion mask `labels`.

  True when probs is (..., 2) (channel 0 background, channel 1 lesion) and labels is the
  pixel shape (...) or (..., 1); equal shapes are the 1-channel layout (lesion map per pixel).
  """
  ps, ls = np.shape(probs), np.shape(labels)
  return len(ps) >= 1 and ps[-1] == 2 and ls != ps and ls in (ps[:-1], ps[:-1] + (1,))


def _paper_inputs(
  probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None, fn: str
) -> tuple[Any, Any, Any, Any, bool]:
  """(pred (..., C_head) float, lesion probs (...), labels (...) bool, weights | None, head?).

  For the authors' head, pred is both channels as given; otherwise pred is the lesion map
  (...). Checks as `_host_inputs` / `_device_inputs` (both channels for the head).
  """
  head = is_paper_head(probs, labels)
  jax_in = _is_jax(probs, labels, weights)
  xp = jnp if jax_in else np
  if head:
    both = xp.asarray(probs)
    labels = xp.reshape(xp.asarray(labels), both.shape[:-1])
    lesion = both[..., 1]
  else:
    lesion = probs
  if jax_in:
    p, y, w = _device_inputs(lesion, labels, weights, fn)
  else:
    p, y, w = _host_inputs(lesion, labels, weights, fn)
  if not head:
    return p, p, y, w, False
  pred = both.astype(p.dtype)
  if not jax_in and not np.isfinite(pred).all():
    raise ValueError(f"metrics.{fn}: probs contain NaN or inf")
  return pred, p, y, w, True


def paper_miou_stats(
  probs: ArrayLike,
  labels: ArrayLike,
  *,
  weights: ArrayLike | None = None,
  paper_channels: int = 2,
  smooth: float = PAPER_SMOOTH,
  thresholds: ArrayLike | None = None,
) -> dict[str, Any]:
  """Sufficient statistics of `paper_miou`: sum of per-pixel `paper_jaccard` and pixel count.

  Two layouts of `probs` (see `paper_miou`): the lesion map (...) with labels (...), or both
  channels of the authors' head (..., 2) with labels (...) or (..., 1).

  Args:
    probs: (...) float lesion probabilities, or (..., 2) (background, lesion) head outputs.
    labels: (...) {0, 1} lesion mask ((..., 1) allowed with a (..., 2) head).
    weights: optional pixel weights broadcastable to the pixel shape (...).
    paper_channels: 2 = (background, lesion) as the authors; 1 = the lesion channel alone.
    smooth: the smoothing constant.
    thresholds: None = on the probabilities as given (soft); (T,) = on the binarised
      prediction at each threshold (`>= t`, each head channel on its own).

  Returns:
    {'paper_jaccard_sum': scalar, or (T,) with thresholds; 'pixel_count': scalar (count or
    weight sum)}; float64 on the host, float32 under jax.
  """
  if paper_channels not in (1, 2):
    raise ValueError(
      f"metrics.paper_miou_stats: paper_channels must be 1 or 2, got {paper_channels}"
    )
  pred, p, y, w, head = _paper_inputs(probs, labels, weights, "paper_miou_stats")
  xp = jnp if _is_jax(pred, y) else np
  dtype = p.dtype if xp is jnp else np.float64
  # (..., C) predicted channels, still in the probs' dtype (thresholds compare there).
  if head:
    # The head's own channels: (..., 2), or its lesion channel alone.
    raw = pred if paper_channels == 2 else pred[..., 1:]
  else:
    raw = p[..., None]
  true = _paper_channels(y.astype(dtype), paper_channels, xp)  # (..., C): the script's label_test
  if thresholds is None:
    if head:
      soft = raw.astype(dtype)
    else:
      soft = _paper_channels(p.astype(dtype), paper_channels, xp)  # (1 - x, x) from the lesion map
    jac = paper_jaccard(true, soft, smooth)  # (...)
    total = xp.sum(jac if w is None else jac * w)
  else:
    if _is_jax(thresholds):
      thr = jnp.asarray(thresholds)
    else:
      thr = _check_thresholds(thresholds, "paper_miou_stats")
    thr = xp.asarray(thr).astype(p.dtype)
    if head:
      # The script: every channel binarised on its own, `y_pred > tr` over the channel axis.
      bin_pred = (raw[..., None, :] >= thr[:, None]).astype(dtype)  # (..., T, C)
    else:
      b = (p[..., None] >= thr).astype(dtype)  # (..., T)
      bin_pred = _paper_channels(b, paper_channels, xp)  # (..., T, C) = (1 - b, b) or (b,)
    jac = paper_jaccard(xp.broadcast_to(true[..., None, :], bin_pred.shape), bin_pred, smooth)
    wj = jac if w is None else jac * w[..., None]
    total = xp.sum(wj, axis=tuple(range(jac.ndim - 1)))  # (T,)
  count = xp.asarray(y.size, total.dtype) if w is None else xp.sum(w).astype(total.dtype)
  return {"paper_jaccard_sum": total, "pixel_count": count}


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

  Two layouts of `probs`:

    * (..., 2), both sigmoid outputs of the authors' head (channel 0 background,
      channel 1 lesion), labels (...) or (..., 1): the script exactly. Targets
      (1 - y, y); at a threshold EACH channel is binarised on its own (the
      background channel too), so a pixel may be predicted as both or neither.
    * (...), the lesion map alone (1-output head), labels (...): the script
      applied to a head whose background output is 1 minus the binarised lesion
      output, i.e. the prediction (1 - b, b) with b = (x >= t). For a 2-channel
      head this equals the script only where the background channel crosses t
      exactly where 1 - lesion does (e.g. complementary channels at t = 0.5).

  Thresholding is `>= t` (the module rule); the script's `> t` differs only for
  outputs exactly equal to t.

  Args:
    probs: (...) float lesion probabilities, or (..., 2) head outputs.
    labels: (...) {0, 1} lesion mask ((..., 1) allowed with a (..., 2) head).
    threshold: None = on the probabilities (`paper_miou_soft`); a float = on
      the binarised prediction at that threshold (the authors' table).
    weights: optional pixel weights broadcastable to the pixel shape (...).
    paper_channels: 2 (background + lesion, as the authors) or 1 (lesion only).
    smooth: the smoothing constant.

  Returns:
    The weighted pixel mean as a Python float (NaN for zero pixels / weight).
  """
  thresholds = None if threshold is None else [float(threshold)]
  # On the host in float64, also for jax inputs.
  stats = paper_miou_stats(
    np.asarray(probs),
    np.asarray(labels),
    weights=None if weights is None else np.asarray(weights),
    paper_channels=paper_channels,
    smooth=smooth,
    thresholds=thresholds,
  )
  jac_sum = float(np.sum(np.asarray(stats["paper_jaccard_sum"], np.float64)))
  count = float(stats["pixel_count"])
  return jac_sum / count if count > 0 else float("nan")


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
    probs: (...) float lesion probabilities, numpy or (concrete) jax; or (..., 2) both
      channels of the authors' head: the counts then use channel 1 (lesion) and
      'paper_miou' follows the script channel by channel (see `paper_miou`).
    labels: (...) {0, 1} mask ((..., 1) allowed with a (..., 2) head).
    thresholds: (T,) thresholds, default 0.1, ..., 0.9.
    weights: optional pixel weights broadcastable to the pixel shape.
    zero_division, paper_channels, smooth: see `metrics_from_counts`.

  Returns:
    `TABLE_KEYS` -> (T,) float64 arrays ('threshold' first).
  """
  thr = _check_thresholds(thresholds, "threshold_metrics")
  probs, labels = np.asarray(probs), np.asarray(labels)
  w = None if weights is None else np.asarray(weights)
  head = is_paper_head(probs, labels)
  lesion = probs[..., 1] if head else probs
  counts = confusion_counts(lesion, labels.reshape(lesion.shape) if head else labels, thr, w)
  out = metrics_from_counts(
    {"threshold": thr, **counts},
    zero_division=zero_division,
    paper_channels=paper_channels,
    smooth=smooth,
  )
  if head:
    # The counts-based value assumes a background output of 1 - lesion; the head has its own.
    stats = paper_miou_stats(
      probs, labels, weights=w, paper_channels=paper_channels, smooth=smooth, thresholds=thr
    )
    n = float(stats["pixel_count"])
    out["paper_miou"] = _ratio(stats["paper_jaccard_sum"], np.full(thr.shape, n), zero_division)
  return out
