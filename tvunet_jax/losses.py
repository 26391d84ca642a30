"""TV-UNet losses: BCE on logits + lambda * total variation of the probability map (+ Dice).

Pure `jax.numpy`; every function is jit-compatible and differentiable, returns a
float32 scalar (float64 under x64 for float64 inputs) and takes optional pixel
weights (B, H, W), e.g. 0 on padded pixels or padded batch entries.

The regulariser (paper: 2D anisotropic total variation) is applied to the
sigmoid probabilities P, for P of shape (B, H, W) or (B, H, W, C):

    TV(P) = sum_ij |P[i+1, j] - P[i, j]| + |P[i, j+1] - P[i, j]|

`lambda` (`tv_weight`) and `reduction` must be chosen together:

  * reduction='mean' (default) is the authors' Keras code
    (github.com/narges-sa/COVID-CT-Segmentation, `TV_UNET.py`, `TV_bin_loss`):
    `reduce_mean(|dP/dh|) + reduce_mean(|dP/dw|)`, each difference map averaged
    over its own (B, H-1, W, C) / (B, H, W-1, C) elements, then added. TV lies
    in [0, 2]; for a binary lesion it is about (boundary length) / (H*W), e.g.
    0.005 for a disc of radius 10 at 128x128, so lambda must be about 0.01-1 to
    matter next to a BCE of 0.01-0.1.
  * reduction='sum' is the textbook TV: summed over pixels (and channels) of
    each image, then averaged over the images, so that lambda does not depend
    on the batch size. It scales with H*W (about 80 for that disc); lambda is
    about 1e-4..1e-3 at 128x128.

The authors use lambda = 2.4e-7 with 'mean', on channel 1 (lesion) of their
2-channel sigmoid output only (`total_loss` on 2-channel logits with the
(B, H, W, 1) lesion mask does that by default). At that weight the TV
gradient is at most ~1e-6..1e-4 of the BCE gradient per pixel: the term is
numerically negligible, and `tv_weight=0` (the plain U-Net baseline) trains
essentially the same network.

Two heads (`lesion_channel` says which channel is the lesion):

  * 1 output (B, H, W, 1): the lesion logit; BCE from logits (`bce_with_logits`),
    which stays finite and keeps its gradient for saturated logits.
  * 2 outputs (B, H, W, 2), the authors' head: channel 0 background, channel 1
    ground-glass (lesion), each its own sigmoid. Labels stay the (B, H, W, 1)
    lesion mask y; `total_loss` builds the one-hot targets (1 - y, y) and uses
    Keras' `binary_crossentropy` on probabilities (`keras_binary_crossentropy`):
    sigmoid, clipped to [1e-7, 1 - 1e-7], averaged over B*H*W*2, as the authors'
    `TV_bin_loss` does on their flattened 2-channel output. The clip zeroes the
    gradient of saturated pixels, as in their training. TV and Dice see channel 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
REDUCTIONS = ("mean", "sum")
TV_KINDS = ("anisotropic", "isotropic")
# Keras' `backend.epsilon()` default: the clip of `binary_crossentropy` on probabilities.
KERAS_EPSILON = 1e-7


def lesion_channel(num_outputs: int) -> int:
  """Index of the lesion (ground-glass) channel in a head with `num_outputs` channels.

  0 for the 1-output head (the lesion logit alone); 1 for the authors' 2-output
  head (channel 0 background, channel 1 ground-glass, each its own sigmoid).
  Everything that reads a lesion probability out of the logits (TV, Dice,
  thresholds, predict, evaluate) takes `probs[..., lesion_channel(C)]`.

  Raises:
    ValueError: for any other number of outputs.
  """
  if num_outputs == 1:
    return 0
  if num_outputs == 2:
    return 1
  raise ValueError(f"losses.lesion_channel: num_outputs must be 1 or 2, got {num_outputs!r}")


def _float(x: Any) -> Array:
  """At least float32 (bf16 -> f32; f64 kept so x64 gradient checks stay exact)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.custom_jvp
def _abs(x: Array) -> Array:
  return jnp.abs(x)


@_abs.defjvp
def _abs_jvp(primals, tangents):
  # jnp.abs has derivative 1 at 0; the subgradient 0 keeps TV from pushing on
  # flat regions (equal neighbours), e.g. saturated probabilities.
  (x,), (t,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * t


def _safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (all pixels masked), with finite gradients."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _pixel_weights(weights: Any, shape: tuple[int, ...], fn: str) -> Array:
  """(B, H, W) weights -> (B, H, W, 1), checked against a (B, H, W, C) shape."""
  w = _float(weights)
  if w.shape != shape[:3]:
    raise ValueError(f"losses.{fn}: weights must have shape (B, H, W) = {shape[:3]}, got {w.shape}")
  return w[..., None]


def _maps(probs: Any, weights: Any, fn: str) -> tuple[Array, Array | None]:
  """Probabilities as (B, H, W, C) float and weights as (B, H, W, 1) or None."""
  p = _float(probs)
  if p.ndim == 3:
    p = p[..., None]
  if p.ndim != 4:
    raise ValueError(f"losses.{fn}: probs must be (B, H, W) or (B, H, W, C), got shape {p.shape}")
  if p.shape[1] < 2 or p.shape[2] < 2:
    raise ValueError(f"losses.{fn}: H and W must be >= 2 for a difference, got shape {p.shape}")
  w = None if weights is None else _pixel_weights(weights, p.shape, fn)
  return p, w


def _reduce(
  terms: Sequence[tuple[Array, Array | None]], w: Array | None, reduction: str, fn: str
) -> Array:
  """Reduces difference maps (each with its pair weight) to the TV scalar."""
  if reduction == "mean":
    total = 0.0
    for d, wd in terms:
      if wd is None:
        total = total + jnp.mean(d)
      else:
        total = total + _safe_div(jnp.sum(d * wd), jnp.sum(jnp.broadcast_to(wd, d.shape)))
    return total
  if reduction == "sum":
    total = sum(jnp.sum(d if wd is None else d * wd) for d, wd in terms)
    if w is None:
      return total / terms[0][0].shape[0]
    # Batch mean over the images that have any weight: fully padded batch
    # entries must not dilute the loss.
    n_images = jnp.sum(jnp.any(w > 0, axis=(1, 2, 3)))
    return _safe_div(total, n_images.astype(total.dtype))
  raise ValueError(f"losses.{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def anisotropic_tv(probs: Any, reduction: str = "mean", weights: Any = None) -> Array:
  """Anisotropic total variation sum |P[i+1,j] - P[i,j]| + |P[i,j+1] - P[i,j]|.

  Args:
    probs: (B, H, W) or (B, H, W, C) float, H, W >= 2; channels are summed
      ('sum') or averaged with the pixels ('mean').
    reduction: 'mean' = the authors' Keras form, mean(|dP/dh|) + mean(|dP/dw|)
      with each difference map averaged over its own elements (result in
      [0, 2] for P in [0, 1]); 'sum' = per-image sum over pixels and channels,
      then the mean over images (result scales with H*W, not with B).
    weights: optional (B, H, W) pixel weights. A difference counts with weight
      w[i+1,j] * w[i,j] (resp. w[i,j+1] * w[i,j]), so one touching a
      zero-weight pixel is dropped; 'mean' divides by the summed pair weights,
      'sum' averages over the images with any positive weight.

  Returns:
    Scalar float32 (float64 for float64 input). The derivative of |d| at d = 0
    is taken as 0.
  """
  p, w = _maps(probs, weights, "anisotropic_tv")
  dh = _abs(p[:, 1:] - p[:, :-1])  # (B, H-1, W, C)
  dw = _abs(p[:, :, 1:] - p[:, :, :-1])  # (B, H, W-1, C)
  wh = None if w is None else w[:, 1:] * w[:, :-1]
  ww = None if w is None else w[:, :, 1:] * w[:, :, :-1]
  return _reduce(((dh, wh), (dw, ww)), w, reduction, "anisotropic_tv")


def isotropic_tv(
  probs: Any, reduction: str = "mean", weights: Any = None, eps: float = 1e-8
) -> Array:
  """Isotropic total variation sum sqrt(dx^2 + dy^2 + eps) - sqrt(eps).

  Forward differences dy = P[i+1,j] - P[i,j], dx = P[i,j+1] - P[i,j] on the
  (H-1, W-1) pixels that have both. `eps` makes the gradient finite at 0; the
  constant sqrt(eps) is subtracted so that a constant map has TV exactly 0
  (this changes no gradient).

  Args:
    probs: (B, H, W) or (B, H, W, C) float, H, W >= 2.
    reduction: 'mean' (over the (B, H-1, W-1, C) terms) or 'sum' (per image,
      then mean over images), as in `anisotropic_tv`.
    weights: optional (B, H, W); a term counts with w[i,j] * w[i+1,j] * w[i,j+1].
    eps: smoothing inside the square root.

  Returns:
    Scalar float32 (float64 for float64 input).
  """
  p, w = _maps(probs, weights, "isotropic_tv")
  dy = p[:, 1:, :-1] - p[:, :-1, :-1]  # (B, H-1, W-1, C)
  dx = p[:, :-1, 1:] - p[:, :-1, :-1]
  mag = jnp.sqrt(dx * dx + dy * dy + eps) - jnp.sqrt(jnp.asarray(eps, p.dtype))
  wm = None if w is None else w[:, :-1, :-1] * w[:, 1:, :-1] * w[:, :-1, 1:]
  return _reduce(((mag, wm),), w, reduction, "isotropic_tv")


def _check_pair(a: Array, b: Array, names: str, fn: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"losses.{fn}: {names} must have the same shape, got {a.shape} and {b.shape}")
  if a.ndim < 3:
    raise ValueError(f"losses.{fn}: expected (B, H, W) or (B, H, W, C) arrays, got shape {a.shape}")


def _elementwise_weights(weights: Any, x: Array, fn: str) -> Array | None:
  """(B, H, W) weights broadcast against (B, H, W) or (B, H, W, C) values."""
  if weights is None:
    return None
  if x.ndim == 3:
    return _pixel_weights(weights, x.shape + (1,), fn)[..., 0]
  return jnp.broadcast_to(_pixel_weights(weights, x.shape, fn), x.shape)


def bce_with_logits(logits: Any, labels: Any, weights: Any = None) -> Array:
  """Mean binary cross-entropy of sigmoid(logits) against labels.

  Per element max(x, 0) - x * y + log1p(exp(-|x|)), written as
  logaddexp(x, 0) - x * y: the same stable expression, whose derivative is
  exactly sigmoid(x) - y also at x = 0 (the literal form gets 0.5 - y wrong
  there, since JAX differentiates |x| at 0 as 1 and max(x, 0) as 1/2). Finite
  value and gradient for any finite logit (e.g. +-100).

  Args:
    logits: (B, H, W) or (B, H, W, C) float.
    labels: same shape, float in [0, 1] (soft labels allowed) or {0, 1}.
    weights: optional (B, H, W) pixel weights, shared by the channels.

  Returns:
    Scalar: the (weighted) mean over all elements; 0 if all weights are 0.
  """
  x, y = _float(logits), _float(labels)
  _check_pair(x, y, "logits and labels", "bce_with_logits")
  per_element = jnp.logaddexp(x, 0) - x * y
  w = _elementwise_weights(weights, x, "bce_with_logits")
  if w is None:
    return jnp.mean(per_element)
  return _safe_div(jnp.sum(per_element * w), jnp.sum(w))


def keras_binary_crossentropy(
  probs: Any, labels: Any, weights: Any = None, epsilon: float = KERAS_EPSILON
) -> Array:
  """Keras' `binary_crossentropy` on probabilities, averaged over all elements.

  Per element, as Keras 3 (`keras/src/backend/*/nn.py`, `from_logits=False`):
  p = clip(probs, epsilon, 1 - epsilon), then -[y log p + (1 - y) log(1 - p)].
  The clip bounds each element by -log(epsilon) = 16.1 and gives saturated
  elements a zero gradient, as in the authors' Keras training. Standalone
  Keras 2.x (the authors' imports) clips the same way, then goes back to
  logits, log(p / (1 - p)), for `sigmoid_cross_entropy_with_logits`: the same
  value. tf.keras 2.x instead adds epsilon inside both logs, which moves the
  clipped elements (-log(2e-7) instead of -log(1e-7)); that variant is not
  what this function computes.

  Args:
    probs: (B, H, W) or (B, H, W, C) probabilities (e.g. sigmoid outputs).
    labels: same shape, in [0, 1].
    weights: optional (B, H, W) pixel weights, shared by the channels.
    epsilon: the clip (Keras' `backend.epsilon()`, 1e-7).

  Returns:
    Scalar: the (weighted) mean over all elements; 0 if all weights are 0.
  """
  p, y = _float(probs), _float(labels)
  _check_pair(p, y, "probs and labels", "keras_binary_crossentropy")
  p = jnp.clip(p, epsilon, 1.0 - epsilon)
  per_element = -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))
  w = _elementwise_weights(weights, p, "keras_binary_crossentropy")
  if w is None:
    return jnp.mean(per_element)
  return _safe_div(jnp.sum(per_element * w), jnp.sum(w))


def paper_targets(labels: Any) -> Array:
  """(B, H, W, 1) lesion mask y -> (B, H, W, 2) one-hot (background, lesion) = (1 - y, y)."""
  y = _float(labels)
  if y.ndim != 4 or y.shape[-1] != 1:
    raise ValueError(f"losses.paper_targets: labels must be (B, H, W, 1), got shape {y.shape}")
  return jnp.concatenate([1 - y, y], axis=-1)


def soft_dice_loss(probs: Any, labels: Any, weights: Any = None, smooth: float = 1.0) -> Array:
  """1 - soft Dice over the whole batch (all pixels and channels pooled).

  dice = (2 sum(w p y) + smooth) / (sum(w p) + sum(w y) + smooth).

  Args:
    probs: (B, H, W) or (B, H, W, C) probabilities.
    labels: same shape, in [0, 1].
    weights: optional (B, H, W) pixel weights.
    smooth: added to numerator and denominator; keeps empty masks at loss 0.

  Returns:
    Scalar in [0, 1].
  """
  p, y = _float(probs), _float(labels)
  _check_pair(p, y, "probs and labels", "soft_dice_loss")
  w = _elementwise_weights(weights, p, "soft_dice_loss")
  if w is None:
    w = jnp.ones((), p.dtype)
  inter = jnp.sum(w * p * y)
  return 1.0 - (2.0 * inter + smooth) / (jnp.sum(w * p) + jnp.sum(w * y) + smooth)


def total_loss(
  logits: Any,
  labels: Any,
  *,
  tv_weight: float | Array,
  tv_reduction: str = "mean",
  tv_kind: str = "anisotropic",
  dice_weight: float | Array = 0.0,
  weights: Any = None,
  tv_channels: Sequence[int] | None = None,
) -> tuple[Array, dict[str, Array]]:
  """BCE + tv_weight * TV(sigmoid(logits)) + dice_weight * (1 - soft Dice).

  Two layouts, chosen by the shapes:

    * logits and labels of one shape (B, H, W, C): C = 1 is the lesion head
      (BCE from logits); C > 1 treats each channel as its own target (per-class
      channels). TV on the channels `tv_channels` (default all), Dice over all.
    * logits (B, H, W, 2) with labels (B, H, W, 1): the authors' head (channel 0
      background, channel 1 ground-glass). Targets (1 - y, y), Keras' clipped
      `binary_crossentropy` over both channels (mean over B*H*W*2), TV and Dice
      on channel `lesion_channel(2)` = 1 (`tv_channels` may override the TV's).

  Args:
    logits: (B, H, W, C) float logits.
    labels: (B, H, W, C) float in [0, 1] or {0, 1}; or (B, H, W, 1) {0, 1}
      lesion mask for 2-channel logits.
    tv_weight: lambda; 0 gives the plain U-Net baseline (TV still reported).
    tv_reduction: 'mean' (authors) or 'sum' (per image); see the module
      docstring for the matching lambda range.
    tv_kind: 'anisotropic' (paper) or 'isotropic'.
    dice_weight: weight of the soft Dice loss.
    weights: optional (B, H, W) pixel weights (0 on padding), used by all terms.
    tv_channels: channels the TV sees; None (default) = all channels, except
      for the authors' head where it is the lesion channel (1).

  Returns:
    (loss, {'bce': ..., 'tv': ..., 'dice': ...}), all scalars; 'tv' and 'dice'
    are the unweighted terms.
  """
  x, y = _float(logits), _float(labels)
  paper_head = x.ndim == 4 and x.shape[-1] == 2 and y.shape == x.shape[:3] + (1,)
  if not paper_head:
    _check_pair(x, y, "logits and labels", "total_loss")
  if x.ndim != 4:
    raise ValueError(f"losses.total_loss: logits must be (B, H, W, C), got shape {x.shape}")
  if tv_kind not in TV_KINDS:
    raise ValueError(f"losses.total_loss: tv_kind must be one of {TV_KINDS}, got {tv_kind!r}")
  probs = jax.nn.sigmoid(x)
  if tv_channels is None and paper_head:
    tv_channels = (lesion_channel(2),)
  if tv_channels is None:
    tv_probs = probs
  else:
    channels = [int(c) for c in tv_channels]
    if not channels or any(not 0 <= c < x.shape[-1] for c in channels):
      raise ValueError(
        f"losses.total_loss: tv_channels must be non-empty indices in [0, {x.shape[-1]}), "
        f"got {tuple(tv_channels)}"
      )
    tv_probs = probs[..., channels]
  tv_fn = anisotropic_tv if tv_kind == "anisotropic" else isotropic_tv
  # Term order as before the 2-channel head: the 1-channel gradient stays bit for bit.
  lesion = lesion_channel(2)
  if paper_head:
    bce = keras_binary_crossentropy(probs, paper_targets(y), weights)
  else:
    bce = bce_with_logits(x, y, weights)
  tv = tv_fn(tv_probs, reduction=tv_reduction, weights=weights)
  if paper_head:
    dice = soft_dice_loss(probs[..., lesion : lesion + 1], y, weights)
  else:
    dice = soft_dice_loss(probs, y, weights)
  loss = bce + tv_weight * tv + dice_weight * dice
  return loss, {"bce": bce, "tv": tv, "dice": dice}
