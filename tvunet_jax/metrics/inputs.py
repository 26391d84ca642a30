"""Input validation shared by every metric: one path for numpy and jnp inputs.

This module owns how `probs`, `labels`, `weights` and `thresholds` are checked and converted
before any counting, so that the numpy (host) and the jnp (jit) paths agree on dtypes and on
what is an error. The conversions and the static (shape) checks are one function for both
array libraries; the host path adds the value checks that need concrete arrays.

Weights (implemented everywhere, tested): optional, non-negative, broadcastable to `probs`; a
pixel counts `weight` times (0 = padding, e.g. the padded entries of a last eval batch).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any  # numpy array, jax.Array or nested sequence


def _is_jax(*xs: Any) -> bool:
  return any(isinstance(x, jax.Array) for x in xs)


def _float_dtype(dtype: Any) -> Any:
  """float64 stays, everything else (bool, int, bf16, f16) compares as float32."""
  return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _check_thresholds(thresholds: ArrayLike, fn: str) -> np.ndarray:
  thr = np.asarray(thresholds, np.float64)
  if thr.ndim != 1 or thr.size == 0 or not np.isfinite(thr).all():
    raise ValueError(
      f"metrics.{fn}: thresholds must be a non-empty 1-D array of finite numbers, "
      f"got {thresholds!r}"
    )
  return thr


def _converted_inputs(
  probs: ArrayLike,
  labels: ArrayLike,
  weights: ArrayLike | None,
  fn: str,
  xp: Any,
  weight_dtype: Any = None,
) -> tuple[Any, Any, Any]:
  """probs as float, labels as given, weights broadcast to probs (or None); static checks only.

  `xp` is numpy or jax.numpy; `weight_dtype` None means the dtype of the converted probs.
  """
  probs = xp.asarray(probs)
  labels = xp.asarray(labels)
  if probs.shape != labels.shape:
    raise ValueError(f"metrics.{fn}: probs shape {probs.shape} != labels shape {labels.shape}")
  probs = probs.astype(_float_dtype(probs.dtype), copy=False)
  w = None
  if weights is not None:
    w = xp.asarray(weights, probs.dtype if weight_dtype is None else weight_dtype)
    try:
      w = xp.broadcast_to(w, probs.shape)
    except ValueError:
      raise ValueError(
        f"metrics.{fn}: weights shape {w.shape} does not broadcast to probs shape {probs.shape}"
      ) from None
  return probs, labels, w


def _host_inputs(
  probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None, fn: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Validated numpy (probs float, labels bool, weights float64 | None), same shape."""
  probs, labels, w = _converted_inputs(probs, labels, weights, fn, np, np.float64)
  if not np.isfinite(probs).all():
    raise ValueError(f"metrics.{fn}: probs contain NaN or inf")
  if labels.dtype != bool:
    if not ((labels == 0) | (labels == 1)).all():
      raise ValueError(f"metrics.{fn}: labels must be 0/1, got values {np.unique(labels)[:6]}")
    labels = labels.astype(bool)
  if w is not None and not (np.isfinite(w).all() and (w >= 0).all()):
    raise ValueError(f"metrics.{fn}: weights must be finite and >= 0")
  return probs, labels, w


def _device_inputs(
  probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None, fn: str
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """jnp (probs float, labels bool, weights | None); only static checks (values may be traced)."""
  probs, labels, w = _converted_inputs(probs, labels, weights, fn, jnp)
  return probs, labels.astype(bool), w
