"""Segmentation metrics: counts -> precision/recall/Dice/IoU/paper_miou; PR curve; components.

This module owns every number reported about a predicted lesion-probability map
against a binary lesion mask: the paper's threshold table, the precision-recall
curve and average precision, per-volume Dice and connectivity statistics (the
paper's claim that the TV term yields fewer, connected lesion components). It
knows no files, devices or training loop.

Inputs are the lesion probability map `probs` (B, H, W) float in [0, 1] and the
mask `labels` (B, H, W) in {0, 1} (any shape works where stated; for the
authors' 2-channel model pass channel 1, the lesion channel).

Sufficient statistics (scenic / nnU-Net habit)
----------------------------------------------
Every quantity is accumulated as sums that reduce by plain addition across
batches, devices and hosts, and is turned into ratios once at the end:

  * tp, fp, fn, tn per threshold (`confusion_counts`, `batch_stats`);
  * positive / negative score histograms over `num_bins` equal bins of [0, 1],
    whose reverse cumulative sums are the exact tp / fp at every bin edge
    (`score_histogram`), for the PR curve and average precision;
  * the sum of the authors' per-pixel smoothed Jaccard and the pixel count
    (`paper_miou_stats`);
  * per-volume tp / fp / fn and per-slice component counts
    (`SegmentationAccumulator`).

Count dtypes: on the host (numpy) counts are int64 without weights and float64
with them; the accumulator stores float64, exact for integers below 2**53 (100
volumes of 512 x 512 x 100 voxels are 2.6e9). Inside `jax.jit` (x64 off) counts
are int32 without weights (exact below 2**31 pixels per call, i.e. per batch)
and float32 with weights; sum per-batch results on the host in float64.

Conventions (implemented everywhere, tested)
--------------------------------------------
  * Prediction rule: a pixel is positive at threshold t iff `prob >= t`, with t
    cast to the (at least float32) dtype of `probs`, so that the numpy and the
    jit paths agree bit for bit. This is scikit-learn's rule
    (`precision_recall_curve`). The authors' script thresholds with `prob > t`;
    the two differ only for pixels exactly equal to t.
  * Weights: optional, non-negative, broadcastable to `probs`; a pixel counts
    `weight` times (0 = padding, e.g. the padded entries of a last eval batch).
    Slices whose weights are all 0 are skipped by the per-slice statistics.
  * Zero division / empty masks: a ratio whose denominator is 0 is undefined
    and reported as `zero_division`, default NaN, exactly as scikit-learn's
    `zero_division=np.nan`: precision with no predicted positive; recall with no
    true positive pixel; Dice and IoU when prediction and truth are both empty.
    Pass `zero_division=0.0` or `1.0` to get scikit-learn's other settings. A
    prediction that is empty while the truth is not (or the reverse) is a
    defined failure: Dice 0, IoU 0.
  * Means over slices or volumes (e.g. mean per-volume Dice) skip undefined
    (NaN) entries, as nnU-Net does for empty-empty cases, and the number skipped
    is reported beside the mean. `class_mean_iou` averages the classes whose IoU
    is defined (scikit-learn's macro average with NaNs dropped).
  * Average precision with no positive pixel is NaN (scikit-learn returns 0.0
    with a warning); the PR curve's recall is then NaN too.
  * Connected components use 8-connectivity in each 2D slice (scipy.ndimage
    `label` with a 3x3 block of ones); a predicted component is an isolated
    false positive when it shares no pixel with the true mask, a true lesion is
    missed when no predicted pixel overlaps it.

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

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

ArrayLike = Any  # numpy array, jax.Array or nested sequence

# The paper's table: 0.1, 0.2, ..., 0.9 as nearest doubles (arange gives 0.30000000000000004).
PAPER_THRESHOLDS = np.arange(1, 10) / 10
PAPER_SMOOTH = 100.0
COUNT_KEYS = ('tp', 'fp', 'fn', 'tn')
TABLE_KEYS = ('threshold', 'precision', 'recall', 'specificity', 'dice', 'iou', 'background_iou',
              'class_mean_iou', 'paper_miou', 'accuracy', 'tp', 'fp', 'fn', 'tn')
COMPONENT_KEYS = ('pred_components', 'true_components', 'isolated_pred_components',
                  'missed_true_components')


# ----------------------------------------------------------------------------- input handling


def _is_jax(*xs: Any) -> bool:
  return any(isinstance(x, jax.Array) for x in xs)


def _float_dtype(dtype: Any) -> Any:
  """float64 stays, everything else (bool, int, bf16, f16) compares as float32."""
  return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _check_thresholds(thresholds: ArrayLike, fn: str) -> np.ndarray:
  thr = np.asarray(thresholds, np.float64)
  if thr.ndim != 1 or thr.size == 0 or not np.isfinite(thr).all():
    raise ValueError(f'metrics.{fn}: thresholds must be a non-empty 1-D array of finite numbers, '
                     f'got {thresholds!r}')
  return thr


def _host_inputs(probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None,
                 fn: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Validated numpy (probs float, labels bool, weights float64 | None), same shape."""
  probs = np.asarray(probs)
  labels = np.asarray(labels)
  if probs.shape != labels.shape:
    raise ValueError(f'metrics.{fn}: probs shape {probs.shape} != labels shape {labels.shape}')
  probs = probs.astype(_float_dtype(probs.dtype), copy=False)
  if not np.isfinite(probs).all():
    raise ValueError(f'metrics.{fn}: probs contain NaN or inf')
  if labels.dtype != bool:
    if not ((labels == 0) | (labels == 1)).all():
      raise ValueError(f'metrics.{fn}: labels must be 0/1, got values {np.unique(labels)[:6]}')
    labels = labels.astype(bool)
  w = None
  if weights is not None:
    w = np.asarray(weights, np.float64)
    try:
      w = np.broadcast_to(w, probs.shape)
    except ValueError:
      raise ValueError(f'metrics.{fn}: weights shape {w.shape} does not broadcast to '
                       f'probs shape {probs.shape}') from None
    if not (np.isfinite(w).all() and (w >= 0).all()):
      raise ValueError(f'metrics.{fn}: weights must be finite and >= 0')
  return probs, labels, w


def _device_inputs(probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None,
                   fn: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """jnp (probs float, labels bool, weights | None); only static checks (values may be traced)."""
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  if probs.shape != labels.shape:
    raise ValueError(f'metrics.{fn}: probs shape {probs.shape} != labels shape {labels.shape}')
  probs = probs.astype(_float_dtype(probs.dtype))
  labels = labels.astype(bool)
  w = None
  if weights is not None:
    w = jnp.asarray(weights, probs.dtype)
    try:
      w = jnp.broadcast_to(w, probs.shape)
    except ValueError:
      raise ValueError(f'metrics.{fn}: weights shape {w.shape} does not broadcast to '
                       f'probs shape {probs.shape}') from None
  return probs, labels, w


def _replicated_spec(x: jax.Array) -> jax.sharding.PartitionSpec | None:
  """Out-sharding for a scatter whose indices may be sharded.

  Under a mesh with Explicit axes (`jax.make_mesh`'s default) XLA cannot infer
  where a scatter's output lives and asks for it; a histogram is replicated.
  """
  mesh = getattr(jax.typeof(x).sharding, 'mesh', None)
  if mesh is None or mesh.empty:
    return None
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.PartitionSpec()
  return None


# ----------------------------------------------------------------------------- confusion counts


def confusion_counts(probs: ArrayLike, labels: ArrayLike, thresholds: ArrayLike,
                     weights: ArrayLike | None = None) -> dict[str, Any]:
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
  thr = _check_thresholds(thresholds, 'confusion_counts') if not _is_jax(thresholds) else thresholds
  if _is_jax(probs, labels, weights, thresholds):
    p, y, w = _device_inputs(probs, labels, weights, 'confusion_counts')
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
    p, y, w = _host_inputs(probs, labels, weights, 'confusion_counts')
    pos_ge, all_ge = _host_counts_ge(p, y, w, thr.astype(p.dtype))
    n_pos = y.sum() if w is None else w[y].sum()
    n = p.size if w is None else w.sum()
  tp = pos_ge
  fp = all_ge - pos_ge
  return {'tp': tp, 'fp': fp, 'fn': n_pos - tp, 'tn': (n - n_pos) - fp}


def _host_counts_ge(p: np.ndarray, y: np.ndarray, w: np.ndarray | None,
                    thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(positives with p >= thr_j, all pixels with p >= thr_j), each (T,); O(N log T) time."""
  order = np.argsort(thr, kind='stable')
  # k = number of (sorted) thresholds <= p: the pixel is predicted positive at
  # exactly the first k sorted thresholds.
  k = np.searchsorted(thr[order], p.ravel(), side='right')
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


# ----------------------------------------------------------------------------- score histograms


def _bin_edges(num_bins: int, dtype: Any) -> np.ndarray:
  # k * (1 / n) rounded in the compare dtype. Not k / n: XLA:CPU rewrites the
  # division as a reciprocal multiply (its f32 k / 1000 differed from numpy's
  # for 584 of 1000 k), while one IEEE multiply gives bit-identical edges in
  # numpy and in the jit path, which recomputes them elementwise.
  return np.arange(num_bins, dtype=dtype) * np.dtype(dtype).type(1 / num_bins)


def score_histogram(probs: ArrayLike, labels: ArrayLike, num_bins: int,
                    weights: ArrayLike | None = None) -> dict[str, Any]:
  """Counts of positive and negative pixels in `num_bins` equal bins of [0, 1].

  Bin k holds edges[k] <= p < edges[k + 1] with edges[k] = k * (1 / num_bins)
  rounded in the dtype of `probs` (k / num_bins up to one rounding); the last
  bin also holds p = 1, and p is clipped to [0, 1].
  The reverse cumulative sums are the exact tp and fp of `p >= edges[k]`.
  jnp (jit-compatible, also under Explicit sharding) when any input is a
  `jax.Array`; `num_bins` must then be static.

  Args:
    probs: (...) float probabilities.
    labels: (...) {0, 1} mask, same shape.
    num_bins: number of bins, >= 1.
    weights: optional pixel weights broadcastable to `probs.shape`.

  Returns:
    {'pos_hist', 'neg_hist'}, each (num_bins,): numpy int64 (float64 with
    weights), or jax int32 (float32 with weights).
  """
  num_bins = int(num_bins)
  if num_bins < 1:
    raise ValueError(f'metrics.score_histogram: num_bins must be >= 1, got {num_bins}')
  if _is_jax(probs, labels, weights):
    p, y, w = _device_inputs(probs, labels, weights, 'score_histogram')
    p = jnp.clip(p, 0, 1)
    inv = np.dtype(p.dtype).type(1 / num_bins)
    # floor(p * n) can be one bin off after rounding; fix it against the edges
    # of `_bin_edges`, recomputed elementwise (a gather from an edge table is
    # rejected for Explicit-sharded indices).
    k = jnp.clip(jnp.floor(p * num_bins).astype(jnp.int32), 0, num_bins - 1)
    k = jnp.where(p < k.astype(p.dtype) * inv, k - 1, k)
    k = jnp.where((k < num_bins - 1) & (p >= (k + 1).astype(p.dtype) * inv), k + 1, k)
    idx = (k + num_bins * y.astype(jnp.int32)).ravel()
    vals = jnp.ones_like(idx) if w is None else w.ravel()
    hist = jnp.zeros(2 * num_bins, vals.dtype).at[idx].add(
        vals, out_sharding=_replicated_spec(idx))
  else:
    p, y, w = _host_inputs(probs, labels, weights, 'score_histogram')
    edges = _bin_edges(num_bins, p.dtype)
    k = np.searchsorted(edges, np.clip(p, 0, 1).ravel(), side='right') - 1
    idx = k + num_bins * y.ravel()
    hist = np.bincount(idx, weights=None if w is None else w.ravel(), minlength=2 * num_bins)
  return {'neg_hist': hist[:num_bins], 'pos_hist': hist[num_bins:]}


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
    raise ValueError(f'metrics.paper_jaccard: y_true shape {t.shape} != y_pred shape {p.shape}')
  intersection = xp.sum(xp.abs(t * p), axis=-1)
  sum_ = xp.sum(xp.abs(t) + xp.abs(p), axis=-1)
  return (intersection + smooth) / (sum_ - intersection + smooth)


def _paper_channels(x: Any, channels: int, xp: Any) -> Any:
  """(...) lesion map -> (..., C): C=1 (x,), C=2 the authors' one-hot layout (1 - x, x)."""
  if channels == 1:
    return x[..., None]
  if channels == 2:
    return xp.stack([1 - x, x], axis=-1)
  raise ValueError(f'metrics: paper_channels must be 1 or 2, got {channels}')


def paper_miou_stats(probs: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None,
                     paper_channels: int = 2, smooth: float = PAPER_SMOOTH) -> dict[str, Any]:
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
    p, y, w = _device_inputs(probs, labels, weights, 'paper_miou_stats')
    xp = jnp
    y = y.astype(p.dtype)
  else:
    p, y, w = _host_inputs(probs, labels, weights, 'paper_miou_stats')
    xp = np
    p, y = p.astype(np.float64), y.astype(np.float64)
  jac = paper_jaccard(_paper_channels(y, paper_channels, xp),
                      _paper_channels(p, paper_channels, xp), smooth)
  if w is None:
    return {'paper_jaccard_sum': xp.sum(jac), 'pixel_count': xp.asarray(p.size, jac.dtype)}
  return {'paper_jaccard_sum': xp.sum(jac * w), 'pixel_count': xp.sum(w)}


def paper_miou(probs: ArrayLike, labels: ArrayLike, threshold: float | None = None, *,
               weights: ArrayLike | None = None, paper_channels: int = 2,
               smooth: float = PAPER_SMOOTH) -> float:
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
  p, y, w = _host_inputs(probs, labels, weights, 'paper_miou')
  if threshold is not None:
    p = (p >= np.asarray(threshold, p.dtype)).astype(p.dtype)
  stats = paper_miou_stats(p, y, weights=w, paper_channels=paper_channels, smooth=smooth)
  count = float(stats['pixel_count'])
  return float(stats['paper_jaccard_sum']) / count if count > 0 else float('nan')


# ----------------------------------------------------------------------------- counts to ratios


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  out = np.full(np.broadcast_shapes(num.shape, den.shape), float(zero_division))
  np.divide(num, den, out=out, where=den > 0)
  return out


def metrics_from_counts(counts: Mapping[str, ArrayLike], *, zero_division: float = np.nan,
                        paper_channels: int = 2,
                        smooth: float = PAPER_SMOOTH) -> dict[str, np.ndarray]:
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
    raise ValueError(f'metrics.metrics_from_counts: counts lack {missing}')
  if paper_channels not in (1, 2):
    raise ValueError(f'metrics.metrics_from_counts: paper_channels must be 1 or 2, '
                     f'got {paper_channels}')
  tp, fp, fn, tn = (np.asarray(counts[k], np.float64) for k in COUNT_KEYS)
  n = tp + fp + fn + tn
  fg_iou = _ratio(tp, tp + fp + fn, zero_division)
  bg_iou = _ratio(tn, tn + fp + fn, zero_division)
  # Mean over the classes whose IoU is defined (both are whenever n > 0 and
  # zero_division is a number).
  class_mean = np.where(np.isnan(fg_iou), bg_iou,
                        np.where(np.isnan(bg_iou), fg_iou, (fg_iou + bg_iou) / 2))
  # Binarised pixels score 1 when right and smooth / (smooth + C) when wrong
  # (C = paper_channels), so the authors' pixel mean follows from the counts.
  wrong = smooth / (smooth + paper_channels)
  out = {
      'precision': _ratio(tp, tp + fp, zero_division),
      'recall': _ratio(tp, tp + fn, zero_division),
      'specificity': _ratio(tn, tn + fp, zero_division),
      'dice': _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
      'iou': fg_iou,
      'background_iou': bg_iou,
      'class_mean_iou': class_mean,
      'paper_miou': _ratio(tp + tn + (fp + fn) * wrong, n, zero_division),
      'accuracy': _ratio(tp + tn, n, zero_division),
      'tp': tp, 'fp': fp, 'fn': fn, 'tn': tn,
  }
  if 'threshold' in counts:
    out = {'threshold': np.asarray(counts['threshold'], np.float64), **out}
  return out


def threshold_metrics(probs: ArrayLike, labels: ArrayLike,
                      thresholds: ArrayLike = PAPER_THRESHOLDS, *,
                      weights: ArrayLike | None = None, zero_division: float = np.nan,
                      paper_channels: int = 2,
                      smooth: float = PAPER_SMOOTH) -> dict[str, np.ndarray]:
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
  thr = _check_thresholds(thresholds, 'threshold_metrics')
  counts = confusion_counts(np.asarray(probs), np.asarray(labels), thr,
                            None if weights is None else np.asarray(weights))
  return metrics_from_counts({'threshold': thr, **counts}, zero_division=zero_division,
                             paper_channels=paper_channels, smooth=smooth)


def batch_stats(probs: ArrayLike, labels: ArrayLike, thresholds: ArrayLike = PAPER_THRESHOLDS,
                weights: ArrayLike | None = None, *, num_bins: int = 0, paper_channels: int = 2,
                smooth: float = PAPER_SMOOTH) -> dict[str, Any]:
  """Additive per-batch statistics for an eval step (jit-friendly; numpy also works).

  Every output is a sum over the batch, so under `jax.jit` with batch-sharded
  inputs the cross-device reduction is part of the compiled sum. Bind
  `num_bins`, `paper_channels` and `smooth` with `functools.partial` (static).

  Args:
    probs: (B, H, W) float lesion probabilities.
    labels: (B, H, W) {0, 1} mask.
    thresholds: (T,) thresholds.
    weights: optional pixel weights broadcastable to (B, H, W), e.g. a (B, 1, 1)
      mask that zeroes padded batch entries.
    num_bins: if > 0, also the score histograms for the PR curve / AP.
    paper_channels, smooth: see `metrics_from_counts`.

  Returns:
    'tp', 'fp', 'fn', 'tn' (T,); 'paper_jaccard_sum', 'pixel_count' scalars; with
    num_bins also 'pos_hist', 'neg_hist' (num_bins,). Dtypes as in
    `confusion_counts` / `paper_miou_stats` / `score_histogram`.
  """
  out = dict(confusion_counts(probs, labels, thresholds, weights))
  out.update(paper_miou_stats(probs, labels, weights=weights, paper_channels=paper_channels,
                              smooth=smooth))
  if num_bins:
    out.update(score_histogram(probs, labels, num_bins, weights))
  return out


# ----------------------------------------------------------------------------- PR curve and AP


def _curve_from_cumulative(tps: np.ndarray, fps: np.ndarray,
                           thresholds: np.ndarray) -> dict[str, np.ndarray]:
  """scikit-learn's `precision_recall_curve` layout from cumulative counts (decreasing t)."""
  ps = tps + fps
  precision = _ratio(tps, ps, 0.0)  # sklearn's value for ps == 0 (never at a kept point)
  total_pos = tps[-1] if tps.size else 0.0
  recall = tps / total_pos if total_pos > 0 else np.full(tps.shape, np.nan)
  return {
      'precision': np.concatenate([precision[::-1], [1.0]]),
      'recall': np.concatenate([recall[::-1], [0.0]]),
      'thresholds': np.asarray(thresholds, np.float64)[::-1],
  }


def _ap_from_curve(curve: Mapping[str, np.ndarray]) -> float:
  # sum_n (R_n - R_{n-1}) P_n, as scikit-learn's average_precision_score.
  recall, precision = curve['recall'], curve['precision']
  if recall.size == 0 or np.isnan(recall).any():
    return float('nan')
  return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def pr_curve_from_histogram(pos_hist: ArrayLike, neg_hist: ArrayLike) -> dict[str, np.ndarray]:
  """PR curve at the lower edges of the non-empty bins of `score_histogram`.

  Identical to scikit-learn's `precision_recall_curve` on the scores rounded
  down to their bin edge (tied scores form one step there too).

  Args:
    pos_hist: (num_bins,) positive counts (summed over batches if accumulated).
    neg_hist: (num_bins,) negative counts.

  Returns:
    {'precision', 'recall'} (K + 1,) and 'thresholds' (K,) increasing, K the
    number of non-empty bins; the last point is (recall 0, precision 1).
  """
  pos = np.asarray(pos_hist, np.float64)
  neg = np.asarray(neg_hist, np.float64)
  if pos.ndim != 1 or pos.shape != neg.shape:
    raise ValueError(f'metrics.pr_curve_from_histogram: histograms must be 1-D of one shape, '
                     f'got {pos.shape} and {neg.shape}')
  edges = _bin_edges(pos.size, np.float64)
  keep = (pos + neg)[::-1] > 0
  tps = np.cumsum(pos[::-1])[keep]
  fps = np.cumsum(neg[::-1])[keep]
  return _curve_from_cumulative(tps, fps, edges[::-1][keep])


def average_precision_from_histogram(pos_hist: ArrayLike,
                                     neg_hist: ArrayLike) -> tuple[float, float]:
  """Average precision from binned scores, and a worst-case bound on its distance to the exact AP.

  The histogram knows tp and fp exactly at every bin edge but not the order of
  the pixels inside a bin. The estimate walks each bin on the straight line
  between its edge counts (pixels of a bin ranked in random order), i.e. it
  adds dR_j * mean over u in [0, 1] of (tp_prev + u dtp) / (ps_prev + u dps).
  On smooth scores this is ~1e-5..1e-4 from scikit-learn's AP at 1000 bins
  (treating each bin as one tied step, i.e. `pr_curve_from_histogram`, is
  biased low by ~1e-3..1e-4). Scores tied exactly (e.g. saturated at 1.0) are
  the worst case: scikit-learn takes one step for a tie.

  Bound: every precision reached inside bin j lies between
  tp_prev / (tp_prev + fp_j) and tp_j / (tp_j + fp_prev), so
  |AP_estimate - AP_exact| <= sum_j dR_j (hi_j - lo_j) for any within-bin order.
  It is loose (order 1e-2) when a bin holds many pixels of both classes.

  Args:
    pos_hist: (num_bins,) positive counts (summed over batches if accumulated).
    neg_hist: (num_bins,) negative counts.

  Returns:
    (average_precision, max_abs_error); (NaN, NaN) with no positive pixel.
  """
  pos = np.asarray(pos_hist, np.float64)
  neg = np.asarray(neg_hist, np.float64)
  if pos.ndim != 1 or pos.shape != neg.shape:
    raise ValueError(f'metrics.average_precision_from_histogram: histograms must be 1-D of one '
                     f'shape, got {pos.shape} and {neg.shape}')
  pos, neg = pos[::-1], neg[::-1]  # highest scores first
  total_pos = pos.sum()
  if not total_pos > 0:
    return float('nan'), float('nan')
  tp_after, fp_after = np.cumsum(pos), np.cumsum(neg)
  tp_before, fp_before = tp_after - pos, fp_after - neg
  ps_before, dps = tp_before + fp_before, pos + neg
  # Mean of (c + a u) / (d + e u) over u in [0, 1] is
  # a / e + (c - a d / e) log(1 + e / d) / e; when d = 0 (the first non-empty
  # bin) c = 0 too and the ratio is the constant a / e; when e / d is tiny the
  # midpoint value is exact to O((e / d)^2) and avoids the cancellation.
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = dps / ps_before
    exact = pos / dps + (tp_before - pos * ps_before / dps) * np.log1p(ratio) / dps
    midpoint = (tp_before + pos / 2) / (ps_before + dps / 2)
    mean_precision = np.where(ps_before == 0, pos / dps, np.where(ratio < 1e-6, midpoint, exact))
  used = pos > 0
  ap = float(np.sum(pos[used] / total_pos * mean_precision[used]))
  lo = _ratio(tp_before, tp_before + fp_after, 0.0)
  hi = _ratio(tp_after, tp_after + fp_before, 1.0)
  bound = float(np.sum(pos / total_pos * (hi - lo)))
  return ap, bound


def _exact_cumulative(scores: np.ndarray, pos: np.ndarray,
                      w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tp, fp at each distinct score, decreasing (scikit-learn's `_binary_clf_curve`)."""
  scores, pos = scores.ravel(), pos.ravel()
  if w is not None:
    w = w.ravel()
    nonzero = w != 0  # zero-weight pixels make no threshold (as scikit-learn)
    scores, pos, w = scores[nonzero], pos[nonzero], w[nonzero]
  order = np.argsort(scores, kind='mergesort')[::-1]
  s = scores[order]
  y = pos[order].astype(np.float64)
  ww = np.ones_like(y) if w is None else w[order]
  last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
  tps = np.cumsum(y * ww)[last_of_run]
  fps = np.cumsum((1 - y) * ww)[last_of_run]
  return tps, fps, s[last_of_run]


def pr_curve(probs: ArrayLike, labels: ArrayLike, num_bins: int | None = None,
             weights: ArrayLike | None = None) -> dict[str, np.ndarray]:
  """Precision-recall curve in scikit-learn's layout (host side).

  Args:
    probs: (...) float scores.
    labels: (...) {0, 1} mask.
    num_bins: None = exact (sorts all pixels; equals
      `sklearn.metrics.precision_recall_curve`); an int = binned (see
      `pr_curve_from_histogram`), memory O(num_bins) once counted.
    weights: optional pixel weights broadcastable to `probs.shape`.

  Returns:
    {'precision', 'recall'} (K + 1,) float64 and 'thresholds' (K,) increasing.
  """
  if num_bins is not None:
    h = score_histogram(np.asarray(probs), np.asarray(labels), num_bins,
                        None if weights is None else np.asarray(weights))
    return pr_curve_from_histogram(h['pos_hist'], h['neg_hist'])
  p, y, w = _host_inputs(probs, labels, weights, 'pr_curve')
  return _curve_from_cumulative(*_exact_cumulative(p, y, w))


def average_precision(probs: ArrayLike, labels: ArrayLike, num_bins: int | None = None,
                      weights: ArrayLike | None = None) -> float:
  """Average precision, sum_n (R_n - R_{n-1}) P_n, as scikit-learn defines it (host side).

  Args:
    probs: (...) float scores.
    labels: (...) {0, 1} mask.
    num_bins: None = exact by sorting (matches
      `sklearn.metrics.average_precision_score`; fine up to ~1e7 pixels); an int
      = from a `num_bins` histogram (error bounded, see
      `average_precision_from_histogram`; ~1e-4 at 1000 bins on smooth scores).
    weights: optional pixel weights broadcastable to `probs.shape`.

  Returns:
    AP as a float; NaN when no pixel is positive.
  """
  if num_bins is not None:
    h = score_histogram(np.asarray(probs), np.asarray(labels), num_bins,
                        None if weights is None else np.asarray(weights))
    return average_precision_from_histogram(h['pos_hist'], h['neg_hist'])[0]
  return _ap_from_curve(pr_curve(probs, labels, None, weights))


# ----------------------------------------------------------------------------- connected components


def _structure(connectivity: int) -> np.ndarray:
  if connectivity == 8:
    return np.ones((3, 3), bool)
  if connectivity == 4:
    return ndimage.generate_binary_structure(2, 1)
  raise ValueError(f'metrics: connectivity must be 4 or 8, got {connectivity}')


def component_counts(pred_mask: ArrayLike, true_mask: ArrayLike,
                     connectivity: int = 8) -> dict[str, np.ndarray]:
  """Per-slice connected-component statistics of a binary prediction (host side, scipy).

  Args:
    pred_mask: (B, H, W) binary prediction (e.g. probs >= 0.5).
    true_mask: (B, H, W) binary truth.
    connectivity: 8 (default, the paper's notion of a connected region) or 4.

  Returns:
    (B,) int64 arrays: 'pred_components', 'true_components',
    'isolated_pred_components' (predicted components sharing no pixel with the
    truth) and 'missed_true_components' (true lesions no predicted pixel touches).
  """
  pred = np.asarray(pred_mask).astype(bool)
  true = np.asarray(true_mask).astype(bool)
  if pred.shape != true.shape or pred.ndim != 3:
    raise ValueError(f'metrics.component_counts: masks must both be (B, H, W), got '
                     f'{pred.shape} and {true.shape}')
  structure = _structure(connectivity)
  out = {k: np.zeros(pred.shape[0], np.int64) for k in COMPONENT_KEYS}
  for b in range(pred.shape[0]):
    pred_lab, n_pred = ndimage.label(pred[b], structure)
    true_lab, n_true = ndimage.label(true[b], structure)
    hit_pred = np.unique(pred_lab[true[b]])
    hit_true = np.unique(true_lab[pred[b]])
    out['pred_components'][b] = n_pred
    out['true_components'][b] = n_true
    out['isolated_pred_components'][b] = n_pred - np.count_nonzero(hit_pred)
    out['missed_true_components'][b] = n_true - np.count_nonzero(hit_true)
  return out


# ----------------------------------------------------------------------------- accumulator


class SegmentationAccumulator:
  """Host-side eval accumulator: additive numpy state in, the full report out.

  Usage:
    acc = SegmentationAccumulator()
    for probs, labels, vol in batches:  # (B, H, W) each; vol (B,) ids
      acc.update(probs, labels, volume_ids=vol)
    report = acc.result()

  Volume ids are either non-negative ints (row = id) or names (str; row = the
  position in `volume_names`, given up front or grown in first-seen order).

  Across hosts: all-reduce (sum) every array of `state_dict()` and rebuild with
  `SegmentationAccumulator.from_state_dict(summed, **acc.config)`. For equal
  shapes and rows on every host, give `num_volumes` (int ids) or
  `volume_names` (names) up front; `merge` needs neither (it matches volumes
  by id or name).

  State (all float64, all additive):
    tp, fp, fn, tn (T,) at `thresholds`; pos_hist, neg_hist (num_bins,);
    paper_jaccard_sum, pixel_count (); operating_counts (4,) = tp, fp, fn, tn
    at `operating_threshold`; volume_counts (V, 4) = tp, fp, fn, slices per
    volume at `operating_threshold`; components (6,) = slices, sum over slices
    of |predicted - true component count|, predicted, true, isolated predicted
    and missed true components, at `operating_threshold`.
  """

  def __init__(self, thresholds: ArrayLike = PAPER_THRESHOLDS, num_bins: int = 1000, *,
               operating_threshold: float = 0.5, num_volumes: int | None = None,
               volume_names: Sequence[str] | None = None, connectivity: int = 8,
               paper_channels: int = 2, smooth: float = PAPER_SMOOTH) -> None:
    fn = 'SegmentationAccumulator'
    self.thresholds = _check_thresholds(thresholds, fn)
    if int(num_bins) < 1:
      raise ValueError(f'metrics.{fn}: num_bins must be >= 1, got {num_bins}')
    if num_volumes is not None and int(num_volumes) < 0:
      raise ValueError(f'metrics.{fn}: num_volumes must be >= 0, got {num_volumes}')
    if num_volumes is not None and volume_names is not None:
      raise ValueError(f'metrics.{fn}: give num_volumes (int ids) or volume_names, not both')
    if volume_names is not None and len(set(volume_names)) != len(volume_names):
      raise ValueError(f'metrics.{fn}: volume_names must be unique')
    if paper_channels not in (1, 2):
      raise ValueError(f'metrics.{fn}: paper_channels must be 1 or 2, got {paper_channels}')
    _structure(connectivity)
    self.num_bins = int(num_bins)
    self.operating_threshold = float(operating_threshold)
    self.num_volumes = None if num_volumes is None else int(num_volumes)
    self.connectivity = int(connectivity)
    self.paper_channels = int(paper_channels)
    self.smooth = float(smooth)
    # None: no names (int ids or nothing yet); a list: row i is volume names[i].
    self._names = None if volume_names is None else [str(v) for v in volume_names]
    self._fixed_names = volume_names is not None
    rows = self.num_volumes or (len(self._names) if self._names else 0)
    t, nb = self.thresholds.size, self.num_bins
    self._state = {
        'tp': np.zeros(t), 'fp': np.zeros(t), 'fn': np.zeros(t), 'tn': np.zeros(t),
        'pos_hist': np.zeros(nb), 'neg_hist': np.zeros(nb),
        'paper_jaccard_sum': np.zeros(()), 'pixel_count': np.zeros(()),
        'operating_counts': np.zeros(4),
        'volume_counts': np.zeros((rows, 4)),
        'components': np.zeros(6),
    }

  @property
  def config(self) -> dict[str, Any]:
    """Constructor arguments (not additive: keep them out of any all-reduce)."""
    return {'thresholds': self.thresholds.copy(), 'num_bins': self.num_bins,
            'operating_threshold': self.operating_threshold, 'num_volumes': self.num_volumes,
            'volume_names': None if self._names is None else list(self._names),
            'connectivity': self.connectivity, 'paper_channels': self.paper_channels,
            'smooth': self.smooth}

  def _volume_rows(self, volume_ids: ArrayLike, batch: int) -> np.ndarray:
    """(B,) ids (ints or names) -> (B,) row indices into volume_counts, growing it if needed."""
    fn = 'metrics.SegmentationAccumulator.update'
    vid = np.asarray(volume_ids)
    if vid.shape != (batch,):
      raise ValueError(f'{fn}: volume_ids must have shape ({batch},), got {vid.shape}')
    if vid.dtype.kind in 'USO':
      names = [str(v) for v in vid]
      if self._names is None:
        if self._state['volume_counts'].shape[0] or self.num_volumes is not None:
          raise ValueError(f'{fn}: volume_ids switched from ints to names')
        self._names = []
      index = {n: i for i, n in enumerate(self._names)}
      for n in names:
        if n not in index:
          if self._fixed_names:
            raise ValueError(f'{fn}: volume {n!r} is not in volume_names')
          index[n] = len(self._names)
          self._names.append(n)
      rows = np.array([index[n] for n in names], np.int64)
      need = len(self._names)
    else:
      if not np.issubdtype(vid.dtype, np.integer) or (vid < 0).any():
        raise ValueError(f'{fn}: volume_ids must be non-negative ints or names, got {vid!r}')
      if self._names is not None:
        raise ValueError(f'{fn}: volume_ids switched from names to ints')
      rows = vid.astype(np.int64)
      need = int(rows.max()) + 1 if batch else 0
      if self.num_volumes is not None and need > self.num_volumes:
        raise ValueError(f'{fn}: volume id {need - 1} >= num_volumes {self.num_volumes}')
    self._state['volume_counts'] = _grow(self._state['volume_counts'], need)
    return rows

  def update(self, probs: ArrayLike, labels: ArrayLike, volume_ids: ArrayLike | None = None,
             weights: ArrayLike | None = None) -> None:
    """Adds one batch.

    Args:
      probs: (B, H, W) or (B, H, W, 1) float lesion probabilities in [0, 1].
      labels: (B, H, W) or (B, H, W, 1) {0, 1} masks.
      volume_ids: optional (B,) volume of each slice, non-negative ints or
        names (one kind per accumulator); None skips the per-volume statistics.
      weights: optional (B,) slice weights (e.g. the 0/1 mask of a padded last
        batch) or pixel weights broadcastable to (B, H, W); slices whose
        weights are all 0 are left out of the per-slice statistics.
    """
    p = np.asarray(probs)
    y = np.asarray(labels)
    if p.ndim == 4 and p.shape[-1] == 1:
      p = p[..., 0]
    if y.ndim == 4 and y.shape[-1] == 1:
      y = y[..., 0]
    if p.ndim != 3:
      raise ValueError(f'metrics.SegmentationAccumulator.update: probs must be (B, H, W), '
                       f'got shape {np.shape(probs)}')
    if weights is not None and np.ndim(weights) == 1:
      weights = np.asarray(weights)[:, None, None]  # per slice, not broadcast along W
    p, y, w = _host_inputs(p, y, weights, 'SegmentationAccumulator.update')
    if p.size and (p.min() < 0 or p.max() > 1):
      raise ValueError(f'metrics.SegmentationAccumulator.update: probs must lie in [0, 1], got '
                       f'range [{p.min()}, {p.max()}]')
    batch = p.shape[0]
    rows = None if volume_ids is None else self._volume_rows(volume_ids, batch)
    s = self._state
    stats = batch_stats(p, y, self.thresholds, w, num_bins=self.num_bins,
                        paper_channels=self.paper_channels, smooth=self.smooth)
    for k in ('tp', 'fp', 'fn', 'tn', 'pos_hist', 'neg_hist', 'paper_jaccard_sum', 'pixel_count'):
      s[k] = s[k] + stats[k]

    # Per-slice statistics at the operating threshold.
    pred = p >= np.asarray(self.operating_threshold, p.dtype)
    wp = np.ones(p.shape) if w is None else w
    slice_tp = (wp * (pred & y)).reshape(batch, -1).sum(1)
    slice_fp = (wp * (pred & ~y)).reshape(batch, -1).sum(1)
    slice_fn = (wp * (~pred & y)).reshape(batch, -1).sum(1)
    slice_tn = (wp * (~pred & ~y)).reshape(batch, -1).sum(1)
    s['operating_counts'] = s['operating_counts'] + np.array(
        [slice_tp.sum(), slice_fp.sum(), slice_fn.sum(), slice_tn.sum()])
    valid = (wp > 0).reshape(batch, -1).any(1)
    if rows is not None:
      per_slice = np.stack([slice_tp, slice_fp, slice_fn, np.ones(batch)], axis=1)
      np.add.at(s['volume_counts'], rows[valid], per_slice[valid])

    # Components only where the pixel counts (padding masked out).
    keep = wp > 0
    cc = component_counts((pred & keep)[valid], (y & keep)[valid], self.connectivity)
    abs_error = np.abs(cc['pred_components'] - cc['true_components']).sum()
    s['components'] = s['components'] + np.array(
        [valid.sum(), abs_error] + [cc[k].sum() for k in COMPONENT_KEYS], np.float64)

  def merge(self, other: SegmentationAccumulator) -> SegmentationAccumulator:
    """Adds `other`'s statistics into this accumulator, matching volumes by id or name.

    Everything in `config` but the volume bookkeeping must be equal. Returns self.
    """
    ignore = ('num_volumes', 'volume_names')
    mine = {k: v for k, v in self.config.items() if k not in ignore}
    theirs = {k: v for k, v in other.config.items() if k not in ignore}
    same = all(np.array_equal(mine[k], theirs[k]) if k == 'thresholds' else mine[k] == theirs[k]
               for k in mine)
    if not same:
      raise ValueError(f'metrics.SegmentationAccumulator.merge: configs differ: {mine} vs {theirs}')
    state = other.state_dict()
    if other._names is not None and other._names:
      counts = state.pop('volume_counts')
      seen = counts[:, 3] > 0
      rows = self._volume_rows(np.array(other._names)[seen], int(seen.sum()))
      np.add.at(self._state['volume_counts'], rows, counts[seen])
    elif self._names is not None and state['volume_counts'].shape[0]:
      raise ValueError('metrics.SegmentationAccumulator.merge: one side has named volumes, '
                       'the other int ids')
    self._add_state(state)
    return self

  def _add_state(self, state: Mapping[str, np.ndarray]) -> None:
    for k, v in state.items():
      if k == 'volume_counts':
        n = max(self._state[k].shape[0], v.shape[0])
        self._state[k] = _grow(self._state[k], n) + _grow(np.asarray(v, np.float64), n)
      else:
        self._state[k] = self._state[k] + np.asarray(v, np.float64)

  def state_dict(self) -> dict[str, np.ndarray]:
    """Copies of the additive state: plain float64 numpy arrays (sum them to all-reduce)."""
    return {k: np.array(v, np.float64) for k, v in self._state.items()}

  @classmethod
  def from_state_dict(cls, state: Mapping[str, ArrayLike],
                      **config: Any) -> SegmentationAccumulator:
    """An accumulator holding `state` (e.g. all-reduced), built with `config` (`acc.config`)."""
    acc = cls(**config)
    expected = acc.state_dict()
    if set(state) != set(expected):
      raise ValueError(f'metrics.SegmentationAccumulator.from_state_dict: keys {sorted(state)} '
                       f'!= expected {sorted(expected)}')
    growable = acc.num_volumes is None and acc._names is None
    for k, v in state.items():
      v = np.asarray(v, np.float64)
      ok = v.shape == expected[k].shape or (
          k == 'volume_counts' and growable and v.ndim == 2 and v.shape[1] == 4)
      if not ok:
        raise ValueError(f'metrics.SegmentationAccumulator.from_state_dict: {k} has shape '
                         f'{v.shape}, config expects {expected[k].shape}')
    acc._add_state(state)
    return acc

  def result(self, zero_division: float = np.nan) -> dict[str, Any]:
    """Turns the sums into the report (see the module docstring for the conventions).

    Returns:
      `TABLE_KEYS` -> (T,) float64: the paper's table over pooled pixels;
      'operating_threshold' and 'operating': the same metrics (floats) there;
      'paper_miou_soft': float; 'average_precision' (binned, see
      `average_precision_from_histogram`) and 'average_precision_max_error';
      'pr_curve': {'precision', 'recall', 'thresholds'}; 'per_volume':
      {'volume_id' (ints or names), 'tp', 'fp', 'fn', 'num_slices', 'dice'} over
      the volumes seen; 'mean_volume_dice' (NaN-skipping mean), 'num_volumes',
      'num_volumes_undefined_dice' (empty truth and prediction); 'connectivity':
      {'num_slices', 'mean_pred_components', 'mean_true_components',
      'component_count_mae', 'isolated_fp_components_per_slice',
      'isolated_fp_fraction', 'missed_lesion_fraction'}; 'num_pixels'.
    """
    s = self.state_dict()
    kw = {'zero_division': zero_division, 'paper_channels': self.paper_channels,
          'smooth': self.smooth}
    table = metrics_from_counts({'threshold': self.thresholds, **{k: s[k] for k in COUNT_KEYS}},
                                **kw)
    op = metrics_from_counts(dict(zip(COUNT_KEYS, s['operating_counts'])), **kw)
    ap, ap_err = average_precision_from_histogram(s['pos_hist'], s['neg_hist'])

    vc = s['volume_counts']
    seen = np.flatnonzero(vc[:, 3] > 0)
    ids = seen if self._names is None else np.array(self._names, dtype=str)[seen]
    vtp, vfp, vfn = vc[seen, 0], vc[seen, 1], vc[seen, 2]
    vdice = _ratio(2 * vtp, 2 * vtp + vfp + vfn, zero_division)
    defined = ~np.isnan(vdice)

    n_slices, abs_error, n_pred, n_true, n_iso, n_missed = s['components']
    return {
        **table,
        'operating_threshold': self.operating_threshold,
        'operating': {k: float(v) for k, v in op.items()},
        'paper_miou_soft': float(_ratio(s['paper_jaccard_sum'], s['pixel_count'],
                                        zero_division)),
        'average_precision': ap,
        'average_precision_max_error': ap_err,
        'pr_curve': pr_curve_from_histogram(s['pos_hist'], s['neg_hist']),
        'per_volume': {'volume_id': ids, 'tp': vtp, 'fp': vfp, 'fn': vfn,
                       'num_slices': vc[seen, 3], 'dice': vdice},
        'mean_volume_dice': float(vdice[defined].mean()) if defined.any() else float('nan'),
        'num_volumes': int(seen.size),
        'num_volumes_undefined_dice': int((~defined).sum()),
        'connectivity': {
            'num_slices': int(n_slices),
            'mean_pred_components': float(_ratio(n_pred, n_slices, zero_division)),
            'mean_true_components': float(_ratio(n_true, n_slices, zero_division)),
            'component_count_mae': float(_ratio(abs_error, n_slices, zero_division)),
            'isolated_fp_components_per_slice': float(_ratio(n_iso, n_slices, zero_division)),
            'isolated_fp_fraction': float(_ratio(n_iso, n_pred, zero_division)),
            'missed_lesion_fraction': float(_ratio(n_missed, n_true, zero_division)),
        },
        'num_pixels': float(s['pixel_count']),
    }


def _grow(a: np.ndarray, rows: int) -> np.ndarray:
  """Pads (V, 4) with zero rows up to `rows` (unseen volumes are all-zero, hence additive)."""
  if a.shape[0] >= rows:
    return a
  return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:])], axis=0)


# ----------------------------------------------------------------------------- reporting


SUMMARY_TABLE_KEYS = ('dice', 'iou', 'class_mean_iou', 'precision', 'recall', 'specificity',
                      'accuracy', 'paper_miou')


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
  thresholds = np.asarray(result['threshold'], np.float64)
  hit = np.flatnonzero(np.isclose(thresholds, threshold, rtol=0, atol=1e-9))
  if hit.size:
    row = {k: float(result[k][hit[0]]) for k in SUMMARY_TABLE_KEYS}
  elif np.isclose(result.get('operating_threshold', np.nan), threshold, rtol=0, atol=1e-9):
    row = {k: float(result['operating'][k]) for k in SUMMARY_TABLE_KEYS}
  else:
    raise ValueError(f'metrics.summary_scalars: threshold {threshold} is neither in the table '
                     f'{thresholds.tolist()} nor the operating threshold')
  out = dict(row)
  for k, v in result.items():
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
      out.setdefault(k, float(v))
  out.update({k: float(v) for k, v in result.get('connectivity', {}).items()})
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
  raise TypeError(f'metrics.to_jsonable: cannot convert {type(obj).__name__}')
