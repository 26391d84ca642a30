"""Evaluation over many batches: additive per-batch statistics and the host-side accumulator.

This module owns `batch_stats` (the sums an eval step returns: tp / fp / fn / tn per threshold,
the `paper_miou` sums and the score histograms, jit-friendly) and `SegmentationAccumulator`,
which adds them up on the host together with per-volume counts and per-slice component counts
and turns the sums into the full report once, at the end.

Conventions (tested; the others are in `counts`, `curves` and `components`):
  * Slices whose weights are all 0 (padding) are skipped by the per-slice and
    per-volume statistics.
  * Means over slices or volumes (e.g. mean per-volume Dice) skip undefined
    (NaN) entries, as nnU-Net does for empty-empty cases, and the number skipped
    is reported beside the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tvunet_jax.metrics.components import COMPONENT_KEYS, _structure, component_counts
from tvunet_jax.metrics.counts import (
  COUNT_KEYS,
  PAPER_SMOOTH,
  PAPER_THRESHOLDS,
  _ratio,
  confusion_counts,
  metrics_from_counts,
  paper_miou_stats,
)
from tvunet_jax.metrics.curves import (
  average_precision_from_histogram,
  pr_curve_from_histogram,
  score_histogram,
)
from tvunet_jax.metrics.inputs import ArrayLike, _check_thresholds, _host_inputs


def batch_stats(
  probs: ArrayLike,
  labels: ArrayLike,
  thresholds: ArrayLike = PAPER_THRESHOLDS,
  weights: ArrayLike | None = None,
  *,
  num_bins: int = 0,
  paper_channels: int = 2,
  smooth: float = PAPER_SMOOTH,
) -> dict[str, Any]:
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
  out.update(
    paper_miou_stats(probs, labels, weights=weights, paper_channels=paper_channels, smooth=smooth)
  )
  if num_bins:
    out.update(score_histogram(probs, labels, num_bins, weights))
  return out


# The state's pixel-level sums (`add_batch_stats`) and per-slice sums (`add_slices`).
PIXEL_KEYS = ("tp", "fp", "fn", "tn", "pos_hist", "neg_hist", "paper_jaccard_sum", "pixel_count")
SLICE_KEYS = ("operating_counts", "volume_counts", "components")


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

  def __init__(
    self,
    thresholds: ArrayLike = PAPER_THRESHOLDS,
    num_bins: int = 1000,
    *,
    operating_threshold: float = 0.5,
    num_volumes: int | None = None,
    volume_names: Sequence[str] | None = None,
    connectivity: int = 8,
    paper_channels: int = 2,
    smooth: float = PAPER_SMOOTH,
  ) -> None:
    fn = "SegmentationAccumulator"
    self.thresholds = _check_thresholds(thresholds, fn)
    if int(num_bins) < 1:
      raise ValueError(f"metrics.{fn}: num_bins must be >= 1, got {num_bins}")
    if num_volumes is not None and int(num_volumes) < 0:
      raise ValueError(f"metrics.{fn}: num_volumes must be >= 0, got {num_volumes}")
    if num_volumes is not None and volume_names is not None:
      raise ValueError(f"metrics.{fn}: give num_volumes (int ids) or volume_names, not both")
    if volume_names is not None and len(set(volume_names)) != len(volume_names):
      raise ValueError(f"metrics.{fn}: volume_names must be unique")
    if paper_channels not in (1, 2):
      raise ValueError(f"metrics.{fn}: paper_channels must be 1 or 2, got {paper_channels}")
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
      "tp": np.zeros(t),
      "fp": np.zeros(t),
      "fn": np.zeros(t),
      "tn": np.zeros(t),
      "pos_hist": np.zeros(nb),
      "neg_hist": np.zeros(nb),
      "paper_jaccard_sum": np.zeros(()),
      "pixel_count": np.zeros(()),
      "operating_counts": np.zeros(4),
      "volume_counts": np.zeros((rows, 4)),
      "components": np.zeros(6),
    }

  @property
  def config(self) -> dict[str, Any]:
    """Constructor arguments (not additive: keep them out of any all-reduce)."""
    return {
      "thresholds": self.thresholds.copy(),
      "num_bins": self.num_bins,
      "operating_threshold": self.operating_threshold,
      "num_volumes": self.num_volumes,
      "volume_names": None if self._names is None else list(self._names),
      "connectivity": self.connectivity,
      "paper_channels": self.paper_channels,
      "smooth": self.smooth,
    }

  def _volume_rows(self, volume_ids: ArrayLike, batch: int) -> np.ndarray:
    """(B,) ids (ints or names) -> (B,) row indices into volume_counts, growing it if needed."""
    fn = "metrics.SegmentationAccumulator.update"
    vid = np.asarray(volume_ids)
    if vid.shape != (batch,):
      raise ValueError(f"{fn}: volume_ids must have shape ({batch},), got {vid.shape}")
    if vid.dtype.kind in "USO":
      names = [str(v) for v in vid]
      if self._names is None:
        if self._state["volume_counts"].shape[0] or self.num_volumes is not None:
          raise ValueError(f"{fn}: volume_ids switched from ints to names")
        self._names = []
      index = {n: i for i, n in enumerate(self._names)}
      for n in names:
        if n not in index:
          if self._fixed_names:
            raise ValueError(f"{fn}: volume {n!r} is not in volume_names")
          index[n] = len(self._names)
          self._names.append(n)
      rows = np.array([index[n] for n in names], np.int64)
      need = len(self._names)
    else:
      if not np.issubdtype(vid.dtype, np.integer) or (vid < 0).any():
        raise ValueError(f"{fn}: volume_ids must be non-negative ints or names, got {vid!r}")
      if self._names is not None:
        raise ValueError(f"{fn}: volume_ids switched from names to ints")
      rows = vid.astype(np.int64)
      need = int(rows.max()) + 1 if batch else 0
      if self.num_volumes is not None and need > self.num_volumes:
        raise ValueError(f"{fn}: volume id {need - 1} >= num_volumes {self.num_volumes}")
    self._state["volume_counts"] = _grow(self._state["volume_counts"], need)
    return rows

  def update(
    self,
    probs: ArrayLike,
    labels: ArrayLike,
    volume_ids: ArrayLike | None = None,
    weights: ArrayLike | None = None,
  ) -> None:
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
      raise ValueError(
        f"metrics.SegmentationAccumulator.update: probs must be (B, H, W), "
        f"got shape {np.shape(probs)}"
      )
    if weights is not None and np.ndim(weights) == 1:
      weights = np.asarray(weights)[:, None, None]  # per slice, not broadcast along W
    p, y, w = _host_inputs(p, y, weights, "SegmentationAccumulator.update")
    if p.size and (p.min() < 0 or p.max() > 1):
      raise ValueError(
        f"metrics.SegmentationAccumulator.update: probs must lie in [0, 1], got "
        f"range [{p.min()}, {p.max()}]"
      )
    self.add_batch_stats(
      batch_stats(
        p,
        y,
        self.thresholds,
        w,
        num_bins=self.num_bins,
        paper_channels=self.paper_channels,
        smooth=self.smooth,
      )
    )
    self._add_slices(p >= np.asarray(self.operating_threshold, p.dtype), y, volume_ids, w)

  def add_batch_stats(self, stats: Mapping[str, ArrayLike]) -> None:
    """Adds pixel-level sums made elsewhere, e.g. on the device: `batch_stats(probs, labels,
    self.thresholds, weights, num_bins=self.num_bins, paper_channels=self.paper_channels,
    smooth=self.smooth)` summed over the batch (and over devices and hosts)."""
    s = self._state
    for k in PIXEL_KEYS:
      v = np.asarray(stats[k], np.float64)
      if v.shape != s[k].shape:
        raise ValueError(
          f"metrics.SegmentationAccumulator.add_batch_stats: {k} has shape {v.shape}, the "
          f"accumulator's is {s[k].shape} (thresholds / num_bins differ)"
        )
      s[k] = s[k] + v

  def add_slices(
    self, pred: ArrayLike, labels: ArrayLike, volume_ids: ArrayLike | None = None
  ) -> None:
    """Adds the per-slice statistics of binary predictions at `operating_threshold`: the
    operating counts, the per-volume counts and the components (the part of `update` that needs
    whole slices; with `add_batch_stats` of the same batch it equals `update`).

    Args:
      pred: (B, H, W) bool, `probs >= operating_threshold`; labels: (B, H, W) {0, 1}.
      volume_ids: optional (B,) as in `update`.
    """
    p, y = np.asarray(pred, bool), np.asarray(labels)
    if p.ndim != 3 or y.shape != p.shape:
      raise ValueError(
        f"metrics.SegmentationAccumulator.add_slices: pred and labels must be (B, H, W) alike, "
        f"got {p.shape} and {y.shape}"
      )
    self._add_slices(p, y.astype(bool), volume_ids, None)

  def _add_slices(self, pred, y, volume_ids, w) -> None:
    batch = pred.shape[0]
    rows = None if volume_ids is None else self._volume_rows(volume_ids, batch)
    s = self._state
    wp = np.ones(pred.shape) if w is None else w
    slice_tp = (wp * (pred & y)).reshape(batch, -1).sum(1)
    slice_fp = (wp * (pred & ~y)).reshape(batch, -1).sum(1)
    slice_fn = (wp * (~pred & y)).reshape(batch, -1).sum(1)
    slice_tn = (wp * (~pred & ~y)).reshape(batch, -1).sum(1)
    s["operating_counts"] = s["operating_counts"] + np.array(
      [slice_tp.sum(), slice_fp.sum(), slice_fn.sum(), slice_tn.sum()]
    )
    valid = (wp > 0).reshape(batch, -1).any(1)
    if rows is not None:
      per_slice = np.stack([slice_tp, slice_fp, slice_fn, np.ones(batch)], axis=1)
      np.add.at(s["volume_counts"], rows[valid], per_slice[valid])

    # Components only where the pixel counts (padding masked out).
    keep = wp > 0
    cc = component_counts((pred & keep)[valid], (y & keep)[valid], self.connectivity)
    abs_error = np.abs(cc["pred_components"] - cc["true_components"]).sum()
    s["components"] = s["components"] + np.array(
      [valid.sum(), abs_error] + [cc[k].sum() for k in COMPONENT_KEYS], np.float64
    )

  def slice_state(self) -> dict[str, np.ndarray]:
    """Copies of the per-slice part of the state (`add_slices`'): what hosts that each added
    their own rows sum to combine (the pixel sums of `add_batch_stats` are global already)."""
    return {k: np.array(self._state[k], np.float64) for k in SLICE_KEYS}

  def set_slice_state(self, state: Mapping[str, ArrayLike]) -> None:
    """Replaces the per-slice part of the state, e.g. by its sum over hosts (same shapes)."""
    for k in SLICE_KEYS:
      v = np.asarray(state[k], np.float64)
      if v.shape != self._state[k].shape:
        raise ValueError(
          f"metrics.SegmentationAccumulator.set_slice_state: {k} has shape {v.shape}, "
          f"expected {self._state[k].shape}"
        )
      self._state[k] = v

  def merge(self, other: SegmentationAccumulator) -> SegmentationAccumulator:
    """Adds `other`'s statistics into this accumulator, matching volumes by id or name.

    Everything in `config` but the volume bookkeeping must be equal. Returns self.
    """
    ignore = ("num_volumes", "volume_names")
    mine = {k: v for k, v in self.config.items() if k not in ignore}
    theirs = {k: v for k, v in other.config.items() if k not in ignore}
    same = all(
      np.array_equal(mine[k], theirs[k]) if k == "thresholds" else mine[k] == theirs[k]
      for k in mine
    )
    if not same:
      raise ValueError(f"metrics.SegmentationAccumulator.merge: configs differ: {mine} vs {theirs}")
    state = other.state_dict()
    if other._names is not None and other._names:
      counts = state.pop("volume_counts")
      seen = counts[:, 3] > 0
      rows = self._volume_rows(np.array(other._names)[seen], int(seen.sum()))
      np.add.at(self._state["volume_counts"], rows, counts[seen])
    elif self._names is not None and state["volume_counts"].shape[0]:
      raise ValueError(
        "metrics.SegmentationAccumulator.merge: one side has named volumes, the other int ids"
      )
    self._add_state(state)
    return self

  def _add_state(self, state: Mapping[str, np.ndarray]) -> None:
    for k, v in state.items():
      if k == "volume_counts":
        n = max(self._state[k].shape[0], v.shape[0])
        self._state[k] = _grow(self._state[k], n) + _grow(np.asarray(v, np.float64), n)
      else:
        self._state[k] = self._state[k] + np.asarray(v, np.float64)

  def state_dict(self) -> dict[str, np.ndarray]:
    """Copies of the additive state: plain float64 numpy arrays (sum them to all-reduce)."""
    return {k: np.array(v, np.float64) for k, v in self._state.items()}

  @classmethod
  def from_state_dict(
    cls, state: Mapping[str, ArrayLike], **config: Any
  ) -> SegmentationAccumulator:
    """An accumulator holding `state` (e.g. all-reduced), built with `config` (`acc.config`)."""
    acc = cls(**config)
    expected = acc.state_dict()
    if set(state) != set(expected):
      raise ValueError(
        f"metrics.SegmentationAccumulator.from_state_dict: keys {sorted(state)} "
        f"!= expected {sorted(expected)}"
      )
    growable = acc.num_volumes is None and acc._names is None
    for k, v in state.items():
      v = np.asarray(v, np.float64)
      ok = v.shape == expected[k].shape or (
        k == "volume_counts" and growable and v.ndim == 2 and v.shape[1] == 4
      )
      if not ok:
        raise ValueError(
          f"metrics.SegmentationAccumulator.from_state_dict: {k} has shape "
          f"{v.shape}, config expects {expected[k].shape}"
        )
    acc._add_state(state)
    return acc

  def result(self, zero_division: float = np.nan) -> dict[str, Any]:
    """Turns the sums into the report (conventions: the docstrings of the metrics modules).

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
    kw = {
      "zero_division": zero_division,
      "paper_channels": self.paper_channels,
      "smooth": self.smooth,
    }
    table = metrics_from_counts(
      {"threshold": self.thresholds, **{k: s[k] for k in COUNT_KEYS}}, **kw
    )
    op = metrics_from_counts(dict(zip(COUNT_KEYS, s["operating_counts"])), **kw)
    ap, ap_err = average_precision_from_histogram(s["pos_hist"], s["neg_hist"])

    vc = s["volume_counts"]
    seen = np.flatnonzero(vc[:, 3] > 0)
    ids = seen if self._names is None else np.array(self._names, dtype=str)[seen]
    vtp, vfp, vfn = vc[seen, 0], vc[seen, 1], vc[seen, 2]
    vdice = _ratio(2 * vtp, 2 * vtp + vfp + vfn, zero_division)
    defined = ~np.isnan(vdice)

    n_slices, abs_error, n_pred, n_true, n_iso, n_missed = s["components"]
    return {
      **table,
      "operating_threshold": self.operating_threshold,
      "operating": {k: float(v) for k, v in op.items()},
      "paper_miou_soft": float(_ratio(s["paper_jaccard_sum"], s["pixel_count"], zero_division)),
      "average_precision": ap,
      "average_precision_max_error": ap_err,
      "pr_curve": pr_curve_from_histogram(s["pos_hist"], s["neg_hist"]),
      "per_volume": {
        "volume_id": ids,
        "tp": vtp,
        "fp": vfp,
        "fn": vfn,
        "num_slices": vc[seen, 3],
        "dice": vdice,
      },
      "mean_volume_dice": float(vdice[defined].mean()) if defined.any() else float("nan"),
      "num_volumes": int(seen.size),
      "num_volumes_undefined_dice": int((~defined).sum()),
      "connectivity": {
        "num_slices": int(n_slices),
        "mean_pred_components": float(_ratio(n_pred, n_slices, zero_division)),
        "mean_true_components": float(_ratio(n_true, n_slices, zero_division)),
        "component_count_mae": float(_ratio(abs_error, n_slices, zero_division)),
        "isolated_fp_components_per_slice": float(_ratio(n_iso, n_slices, zero_division)),
        "isolated_fp_fraction": float(_ratio(n_iso, n_pred, zero_division)),
        "missed_lesion_fraction": float(_ratio(n_missed, n_true, zero_division)),
      },
      "num_pixels": float(s["pixel_count"]),
    }


def _grow(a: np.ndarray, rows: int) -> np.ndarray:
  """Pads (V, 4) with zero rows up to `rows` (unseen volumes are all-zero, hence additive)."""
  if a.shape[0] >= rows:
    return a
  return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:])], axis=0)
