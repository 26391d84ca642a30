"""The study's statistics: paired differences, a hierarchical bootstrap CI, and the verdict rule.

A variant is compared with the plain U-Net run of the same seed (same initialisation and data
order), and, for per-volume metrics, on the same test volume. The 95% interval is a percentile
bootstrap that resamples seeds with replacement and, within every drawn seed, volumes with
replacement (the two sources of variation of this design); the statistic is the mean paired
difference. The RNG is fixed, so a report is reproducible from its runs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 20240  # fixed: the same runs always give the same interval
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean paired difference with its bootstrap percentile interval."""

  mean: float
  low: float
  high: float
  num_seeds: int
  num_volumes: int  # per seed; 1 for per-seed metrics


def bootstrap_ci(
  diff: np.ndarray,
  *,
  samples: int = BOOTSTRAP_SAMPLES,
  seed: int = BOOTSTRAP_SEED,
  confidence: float = CONFIDENCE,
) -> Interval:
  """Percentile CI of the mean of paired differences, resampling seeds then volumes.

  Args:
    diff: (S,) per-seed or (S, V) per-seed-and-volume float differences (variant - reference).
      NaN entries are not allowed (drop the seed before).
    samples: bootstrap replicates.
    seed: RNG seed (numpy `default_rng`).
    confidence: interval coverage, e.g. 0.95.

  Returns:
    `Interval(mean, low, high, num_seeds, num_volumes)`; with one seed only the volumes are
    resampled, with one seed and one volume the interval is the single value.

  Draw order (part of the contract, so a test can re-implement it): seed indices
  `integers(0, S, (samples, S))`, then volume indices `integers(0, V, (samples, S, V))`.
  """
  d = np.asarray(diff, np.float64)
  if d.ndim == 1:
    d = d[:, None]
  if d.ndim != 2 or d.size == 0:
    raise ValueError(f"bootstrap_ci: expected (S,) or (S, V) non-empty differences, got {d.shape}")
  if not np.all(np.isfinite(d)):
    raise ValueError("bootstrap_ci: differences must be finite (drop seeds with undefined values)")
  s, v = d.shape
  rng = np.random.default_rng(seed)
  seeds = rng.integers(0, s, (samples, s))
  vols = rng.integers(0, v, (samples, s, v))
  stats = d[seeds[..., None], vols].mean(axis=(1, 2))  # (samples,)
  alpha = (1.0 - confidence) / 2.0
  low, high = np.quantile(stats, [alpha, 1.0 - alpha])
  return Interval(float(d.mean()), float(low), float(high), s, v)


def direction(interval: Interval) -> str:
  """'above' (CI above 0), 'below' (CI below 0) or 'contains' (CI contains 0)."""
  if interval.low > 0:
    return "above"
  if interval.high < 0:
    return "below"
  return "contains"


def verdict(interval: Interval, *, higher_is_better: bool, metric: str) -> str:
  """One clause that follows from the interval alone.

  "improves <metric>" when the CI lies on the better side of 0, "worsens <metric>" on the other,
  "no detectable difference in <metric>" when it contains 0; fewer than 2 paired seeds give
  "not enough paired seeds for <metric>" (the volumes of one seed say nothing about seeds).
  """
  if interval.num_seeds < 2:
    return f"not enough paired seeds for {metric} ({interval.num_seeds})"
  side = direction(interval)
  if side == "contains":
    return f"no detectable difference in {metric}: CI contains 0"
  better = (side == "above") == higher_is_better
  return f"{'improves' if better else 'worsens'} {metric}: CI {side} 0"


def paired(
  reference: dict[int, np.ndarray], variant: dict[int, np.ndarray]
) -> tuple[list[int], np.ndarray]:
  """Seeds both have (with finite values), and the (S, V) differences variant - reference.

  Args:
    reference, variant: seed -> (V,) or scalar metric values; V must agree across seeds.
  """
  seeds = sorted(
    s
    for s in reference.keys() & variant.keys()
    if np.all(np.isfinite(reference[s])) and np.all(np.isfinite(variant[s]))
  )
  if not seeds:
    return [], np.zeros((0, 1))
  rows = [
    np.atleast_1d(np.asarray(variant[s], np.float64) - np.asarray(reference[s], np.float64))
    for s in seeds
  ]
  return seeds, np.stack(rows)


def mean_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; NaN for fewer than 2), NaN entries dropped."""
  v = np.array([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan
