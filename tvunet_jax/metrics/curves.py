"""Score histograms, the precision-recall curve and average precision.

This module owns the ranking metrics: `score_histogram` (positive / negative pixel counts in
`num_bins` equal bins of [0, 1], additive across batches, devices and hosts; their reverse
cumulative sums are the exact tp / fp at every bin edge), the PR curve and AP from such
histograms with a bound on the binning error, and the exact (sorting) curve and AP in
scikit-learn's layout.

Convention (tested): average precision with no positive pixel is NaN (scikit-learn returns 0.0
with a warning); the PR curve's recall is then NaN too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvunet_jax.metrics.counts import _ratio
from tvunet_jax.metrics.inputs import ArrayLike, _device_inputs, _host_inputs, _is_jax


def _replicated_spec(x: jax.Array) -> jax.sharding.PartitionSpec | None:
  """Out-sharding for a scatter whose indices may be sharded.

  Under a mesh with Explicit axes (`jax.make_mesh`'s default) XLA cannot infer
  where a scatter's output lives and asks for it; a histogram is replicated.
  """
  mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.PartitionSpec()
  return None


def _bin_edges(num_bins: int, dtype: Any) -> np.ndarray:
  # k * (1 / n) rounded in the compare dtype. Not k / n: XLA:CPU rewrites the
  # division as a reciprocal multiply (its f32 k / 1000 differed from numpy's
  # for 584 of 1000 k), while one IEEE multiply gives bit-identical edges in
  # numpy and in the jit path, which recomputes them elementwise.
  return np.arange(num_bins, dtype=dtype) * np.dtype(dtype).type(1 / num_bins)


def score_histogram(
  probs: ArrayLike, labels: ArrayLike, num_bins: int, weights: ArrayLike | None = None
) -> dict[str, Any]:
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
    raise ValueError(f"metrics.score_histogram: num_bins must be >= 1, got {num_bins}")
  if _is_jax(probs, labels, weights):
    p, y, w = _device_inputs(probs, labels, weights, "score_histogram")
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
    hist = jnp.zeros(2 * num_bins, vals.dtype).at[idx].add(vals, out_sharding=_replicated_spec(idx))
  else:
    p, y, w = _host_inputs(probs, labels, weights, "score_histogram")
    edges = _bin_edges(num_bins, p.dtype)
    k = np.searchsorted(edges, np.clip(p, 0, 1).ravel(), side="right") - 1
    idx = k + num_bins * y.ravel()
    hist = np.bincount(idx, weights=None if w is None else w.ravel(), minlength=2 * num_bins)
  return {"neg_hist": hist[:num_bins], "pos_hist": hist[num_bins:]}


def _check_histograms(
  pos_hist: ArrayLike, neg_hist: ArrayLike, fn: str
) -> tuple[np.ndarray, np.ndarray]:
  """float64 (num_bins,) positive and negative counts, checked to be 1-D of one shape."""
  pos = np.asarray(pos_hist, np.float64)
  neg = np.asarray(neg_hist, np.float64)
  if pos.ndim != 1 or pos.shape != neg.shape:
    raise ValueError(
      f"metrics.{fn}: histograms must be 1-D of one shape, got {pos.shape} and {neg.shape}"
    )
  return pos, neg


def _curve_from_cumulative(
  tps: np.ndarray, fps: np.ndarray, thresholds: np.ndarray
) -> dict[str, np.ndarray]:
  """scikit-learn's `precision_recall_curve` layout from cumulative counts (decreasing t)."""
  ps = tps + fps
  precision = _ratio(tps, ps, 0.0)  # sklearn's value for ps == 0 (never at a kept point)
  total_pos = tps[-1] if tps.size else 0.0
  recall = tps / total_pos if total_pos > 0 else np.full(tps.shape, np.nan)
  return {
    "precision": np.concatenate([precision[::-1], [1.0]]),
    "recall": np.concatenate([recall[::-1], [0.0]]),
    "thresholds": np.asarray(thresholds, np.float64)[::-1],
  }


def _ap_from_curve(curve: Mapping[str, np.ndarray]) -> float:
  # sum_n (R_n - R_{n-1}) P_n, as scikit-learn's average_precision_score.
  recall, precision = curve["recall"], curve["precision"]
  if recall.size == 0 or np.isnan(recall).any():
    return float("nan")
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
  pos, neg = _check_histograms(pos_hist, neg_hist, "pr_curve_from_histogram")
  edges = _bin_edges(pos.size, np.float64)
  keep = (pos + neg)[::-1] > 0
  tps = np.cumsum(pos[::-1])[keep]
  fps = np.cumsum(neg[::-1])[keep]
  return _curve_from_cumulative(tps, fps, edges[::-1][keep])


def average_precision_from_histogram(
  pos_hist: ArrayLike, neg_hist: ArrayLike
) -> tuple[float, float]:
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
  pos, neg = _check_histograms(pos_hist, neg_hist, "average_precision_from_histogram")
  pos, neg = pos[::-1], neg[::-1]  # highest scores first
  total_pos = pos.sum()
  if not total_pos > 0:
    return float("nan"), float("nan")
  tp_after, fp_after = np.cumsum(pos), np.cumsum(neg)
  tp_before, fp_before = tp_after - pos, fp_after - neg
  ps_before, dps = tp_before + fp_before, pos + neg
  # Mean of (c + a u) / (d + e u) over u in [0, 1] is
  # a / e + (c - a d / e) log(1 + e / d) / e; when d = 0 (the first non-empty
  # bin) c = 0 too and the ratio is the constant a / e; when e / d is tiny the
  # midpoint value is exact to O((e / d)^2) and avoids the cancellation.
  with np.errstate(divide="ignore", invalid="ignore"):
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


def _exact_cumulative(
  scores: np.ndarray, pos: np.ndarray, w: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tp, fp at each distinct score, decreasing (scikit-learn's `_binary_clf_curve`)."""
  scores, pos = scores.ravel(), pos.ravel()
  if w is not None:
    w = w.ravel()
    nonzero = w != 0  # zero-weight pixels make no threshold (as scikit-learn)
    scores, pos, w = scores[nonzero], pos[nonzero], w[nonzero]
  order = np.argsort(scores, kind="mergesort")[::-1]
  s = scores[order]
  y = pos[order].astype(np.float64)
  ww = np.ones_like(y) if w is None else w[order]
  last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
  tps = np.cumsum(y * ww)[last_of_run]
  fps = np.cumsum((1 - y) * ww)[last_of_run]
  return tps, fps, s[last_of_run]


def pr_curve(
  probs: ArrayLike, labels: ArrayLike, num_bins: int | None = None, weights: ArrayLike | None = None
) -> dict[str, np.ndarray]:
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
    h = score_histogram(
      np.asarray(probs),
      np.asarray(labels),
      num_bins,
      None if weights is None else np.asarray(weights),
    )
    return pr_curve_from_histogram(h["pos_hist"], h["neg_hist"])
  p, y, w = _host_inputs(probs, labels, weights, "pr_curve")
  return _curve_from_cumulative(*_exact_cumulative(p, y, w))


def average_precision(
  probs: ArrayLike, labels: ArrayLike, num_bins: int | None = None, weights: ArrayLike | None = None
) -> float:
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
    h = score_histogram(
      np.asarray(probs),
      np.asarray(labels),
      num_bins,
      None if weights is None else np.asarray(weights),
    )
    return average_precision_from_histogram(h["pos_hist"], h["neg_hist"])[0]
  return _ap_from_curve(pr_curve(probs, labels, None, weights))
