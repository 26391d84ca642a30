"""Tests for tvunet_jax.losses: hand-computed values, numpy/scikit-learn references, gradients."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from sklearn.metrics import log_loss

from tests.conftest import random_variables
from tvunet_jax import losses, models

# A 4x4 map whose differences are written out below.
P4 = np.array(
  [
    [0.0, 0.5, 0.5, 1.0],
    [0.0, 0.5, 1.0, 1.0],
    [0.2, 0.2, 0.2, 0.2],
    [1.0, 0.0, 0.0, 0.0],
  ],
  np.float32,
)
# Vertical |P[i+1,j] - P[i,j]| (12 terms):
#   row1-row0: 0, 0, .5, 0       -> 0.5
#   row2-row1: .2, .3, .8, .8    -> 2.1
#   row3-row2: .8, .2, .2, .2    -> 1.4      total 4.0
# Horizontal |P[i,j+1] - P[i,j]| (12 terms):
#   row0: .5, 0, .5 -> 1.0; row1: .5, .5, 0 -> 1.0; row2: 0; row3: 1, 0, 0 -> 1.0   total 3.0
P4_SUM = 7.0
P4_MEAN = 4.0 / 12 + 3.0 / 12


# Jitted entry points: one compile per shape instead of one per eager op, which
# keeps this file fast. test_total_loss_jit_matches_eager covers the eager path.
aniso = jax.jit(losses.anisotropic_tv, static_argnames="reduction")
iso = jax.jit(losses.isotropic_tv, static_argnames="reduction")
bce = jax.jit(losses.bce_with_logits)
dice = jax.jit(losses.soft_dice_loss)
total = jax.jit(losses.total_loss, static_argnames=("tv_reduction", "tv_kind", "tv_channels"))


def _close(a, b, tol=1e-6):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------- anisotropic TV


def test_anisotropic_tv_hand_values_4x4():
  p = P4[None]  # (1, 4, 4)
  _close(aniso(p, "sum"), P4_SUM)
  _close(aniso(p, "mean"), P4_MEAN)
  # (B, H, W, 1) gives the same numbers as (B, H, W).
  _close(aniso(p[..., None], "sum"), P4_SUM)


def test_anisotropic_tv_hand_values_3x3_cross():
  p = np.array([[[0, 1, 0], [0, 1, 0], [0, 0, 0]]], np.float32)
  # vertical: 0,0,0 | 0,1,0 -> 1 over 6 terms; horizontal: 1,1 | 1,1 | 0,0 -> 4 over 6 terms.
  _close(aniso(p, "sum"), 5.0)
  _close(aniso(p, "mean"), 1 / 6 + 4 / 6)


def test_anisotropic_tv_batch_reduction():
  # Second image constant (TV 0). 'sum' = per-image sum, batch mean: 7 / 2.
  # 'mean' = each difference map averaged over its 2 * 12 terms: 4/24 + 3/24.
  p = np.stack([P4, np.full((4, 4), 0.3, np.float32)])
  _close(aniso(p, "sum"), 3.5)
  _close(aniso(p, "mean"), 7 / 24)


def test_anisotropic_tv_matches_numpy_and_authors_form():
  rng = np.random.default_rng(0)
  p = rng.uniform(size=(3, 8, 6, 2)).astype(np.float32)
  dh, dw = np.abs(np.diff(p, axis=1)), np.abs(np.diff(p, axis=2))
  # Authors (TV_UNET.py): reduce_mean(|dh|) + reduce_mean(|dw|).
  _close(aniso(p, "mean"), dh.mean() + dw.mean(), 1e-5)
  _close(aniso(p, "sum"), (dh.sum(axis=(1, 2, 3)) + dw.sum(axis=(1, 2, 3))).mean(), 1e-5)


def test_tv_zero_on_constant_map_with_zero_gradient():
  p = jnp.full((2, 5, 5, 1), 0.7)
  for fn in (aniso, iso):
    for red in losses.REDUCTIONS:
      assert float(fn(p, red)) == pytest.approx(0.0, abs=1e-7)
  # |d| has subgradient 0 at d = 0: flat regions feel no TV force.
  g = jax.jit(jax.grad(lambda q: aniso(q, "sum")))(p)
  assert float(jnp.max(jnp.abs(g))) == 0.0


def test_tv_grows_with_isolated_specks():
  # Each isolated interior speck of 1 on 0 adds 4 unit differences.
  positions = [(2, 2), (2, 10), (10, 2), (10, 10)]
  values = []
  for k in range(len(positions) + 1):
    p = np.zeros((1, 16, 16), np.float32)
    for r, c in positions[:k]:
      p[0, r, c] = 1.0
    values.append(float(aniso(p, "sum")))
    # mean: 2 vertical + 2 horizontal unit differences per speck, 15*16 terms each.
    _close(aniso(p, "mean"), 2 * k / 240 + 2 * k / 240)
    # isotropic, speck at (r, c): term (r, c) has dx = dy = -1 -> sqrt(2); term
    # (r, c-1) has dx = 1 -> 1; term (r-1, c) has dy = 1 -> 1.
    _close(iso(p, "sum", eps=0.0), k * (2 + math.sqrt(2)), 1e-5)
  assert values == [0.0, 4.0, 8.0, 12.0, 16.0]


def test_tv_weights_exclude_padding():
  # Last column is padding (weight 0); its differences must not count.
  w = np.ones((1, 4, 4), np.float32)
  w[:, :, 3] = 0
  p = P4[None]
  # vertical over columns 0..2: .5 + (.2+.3+.8) + (.8+.2+.2) = 3.0 over 9 terms;
  # horizontal over pairs (0,1), (1,2): .5 + 1.0 + 0 + 1.0 = 2.5 over 8 terms.
  _close(aniso(p, "sum", weights=w), 5.5)
  _close(aniso(p, "mean", weights=w), 3.0 / 9 + 2.5 / 8)
  # Masking the column equals cropping it away, whatever the padded values are.
  p_garbage = p.copy()
  p_garbage[:, :, 3] = np.array([0.9, -3.0, 7.0, 0.1])
  for red in losses.REDUCTIONS:
    for fn in (aniso, iso):
      _close(fn(p_garbage, red, weights=w), fn(p[:, :, :3], red), 1e-6)
  # Top row padded too: a pair counts only if *both* pixels have weight. The crop
  # P[1:, :3] = [[0, .5, 1], [.2, .2, .2], [1, 0, 0]] has vertical differences
  # .2 + .3 + .8 + .8 + .2 + .2 = 2.5 (6 terms), horizontal .5 + .5 + 0 + 0 + 1 + 0
  # = 2.0 (6 terms).
  w[:, 0, :] = 0
  p_garbage[:, 0, :] = np.array([5.0, -1.0, 3.0, 2.0])
  _close(aniso(p_garbage, "sum", weights=w), 4.5)
  _close(aniso(p_garbage, "mean", weights=w), 2.5 / 6 + 2.0 / 6)
  for red in losses.REDUCTIONS:
    _close(iso(p_garbage, red, weights=w), iso(p[:, 1:, :3], red), 1e-6)


def test_tv_sum_ignores_fully_padded_batch_entries():
  p = np.stack([P4, np.random.default_rng(1).uniform(size=(4, 4)).astype(np.float32)])
  w = np.stack([np.ones((4, 4)), np.zeros((4, 4))]).astype(np.float32)
  _close(aniso(p, "sum", weights=w), P4_SUM)  # not 7 / 2
  _close(aniso(p, "mean", weights=w), P4_MEAN)
  # All weights zero: 0, not NaN, and a finite gradient.
  z = np.zeros_like(w)
  for red in losses.REDUCTIONS:
    assert float(aniso(p, red, weights=z)) == 0.0
    g = jax.grad(lambda q, r=red: aniso(q, r, weights=z))(p)
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------- isotropic TV


def test_isotropic_tv_hand_values_3x3():
  p = np.array([[[0, 1, 0], [0, 1, 0], [0, 0, 0]]], np.float32)
  # Terms at (i, j) in {0,1}^2 with dx = P[i,j+1]-P[i,j], dy = P[i+1,j]-P[i,j]:
  # (0,0): dx=1, dy=0 -> 1; (0,1): dx=-1, dy=0 -> 1; (1,0): dx=1, dy=0 -> 1;
  # (1,1): dx=-1, dy=-1 -> sqrt(2).
  _close(iso(p, "sum", eps=0.0), 3 + math.sqrt(2))
  _close(iso(p, "mean", eps=0.0), (3 + math.sqrt(2)) / 4)
  # The default eps moves each term by less than sqrt(eps) = 1e-4.
  _close(iso(p, "sum"), 3 + math.sqrt(2), 1e-4)


# ------------------------------------------------------------------------- BCE


def test_bce_hand_values():
  x = np.array([[[0.0, 2.0], [-1.0, 100.0]]], np.float32)
  y = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  # x=0,y=1: log 2 = 0.6931472;  x=2,y=0: log(1+e^2) = 2.1269280;
  # x=-1,y=0: log(1+e^-1) = 0.3132617;  x=100,y=1: log(1+e^-100) ~ 0.
  _close(bce(x, y), (0.6931472 + 2.1269280 + 0.3132617) / 4)
  # Weights keep the first column only: (0.6931472 + 0.3132617) / 2.
  w = np.array([[[1.0, 0.0], [1.0, 0.0]]], np.float32)
  _close(bce(x, y, weights=w), (0.6931472 + 0.3132617) / 2)
  # (B, H, W) weights broadcast over channels of (B, H, W, C) logits.
  _close(bce(x[..., None], y[..., None], weights=w), (0.6931472 + 0.3132617) / 2)


def test_bce_matches_sklearn_log_loss():
  rng = np.random.default_rng(2)
  x = rng.normal(scale=3, size=(2, 5, 5, 2))
  y = (rng.uniform(size=x.shape) < 0.3).astype(np.float64)
  ref = log_loss(y.ravel(), 1 / (1 + np.exp(-x.ravel())), labels=[0, 1])
  _close(bce(x.astype(np.float32), y.astype(np.float32)), ref, 1e-5)


def test_bce_gradient_is_sigmoid_minus_label_including_zero():
  x = jnp.array([[[0.0, 0.0, 1.5, -2.0]]])
  y = jnp.array([[[1.0, 0.3, 0.0, 1.0]]])
  g = jax.jit(jax.grad(losses.bce_with_logits))(x, y)
  _close(g, (jax.nn.sigmoid(x) - y) / 4)  # (0.5 - 0.3) / 4 at x=0: not (0 - 0.3) / 4


def test_no_nan_for_extreme_logits():
  x = jnp.array([[[[100.0], [-100.0]], [[100.0], [-100.0]]]])  # (1, 2, 2, 1)
  y = jnp.array([[[[1.0], [1.0]], [[0.0], [0.0]]]])
  value = bce(x, y)
  # Elements: ~0, 100, 100, ~0 -> mean 50.
  _close(value, 50.0, 1e-5)
  g = jax.jit(jax.grad(losses.bce_with_logits))(x, y)
  _close(g, (jnp.array([[[[1.0], [0.0]], [[1.0], [0.0]]]]) - y) / 4)
  for tv_kind in losses.TV_KINDS:
    fn = lambda z, k=tv_kind: total(z, y, tv_weight=1.0, dice_weight=1.0, tv_kind=k)[0]
    val, grad = jax.jit(jax.value_and_grad(fn))(x)
    assert np.isfinite(float(val)) and np.all(np.isfinite(grad))


# ------------------------------------------------------------------------ Dice


def test_soft_dice_hand_values():
  p = np.array([[[0.5, 1.0], [0.0, 0.5]]], np.float32)
  y = np.array([[[1.0, 1.0], [0.0, 0.0]]], np.float32)
  # intersection 0.5 + 1 = 1.5; sum p = 2, sum y = 2.
  _close(dice(p, y, smooth=1.0), 1 - (2 * 1.5 + 1) / (4 + 1))  # 0.2
  _close(dice(p, y, smooth=0.0), 1 - 3 / 4)
  # Weight 0 on the second row: p = (.5, 1), y = (1, 1): 1 - (2*1.5) / (1.5 + 2).
  w = np.array([[[1.0, 1.0], [0.0, 0.0]]], np.float32)
  _close(dice(p, y, weights=w, smooth=0.0), 1 - 3 / 3.5)
  # Empty prediction and empty mask: loss 0 thanks to smooth.
  assert float(dice(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))) == 0.0


# -------------------------------------------------------------------- total_loss


def _batch(seed=3, shape=(2, 6, 5, 2)):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2, size=shape).astype(np.float32)
  labels = (rng.uniform(size=shape) < 0.4).astype(np.float32)
  return jnp.asarray(logits), jnp.asarray(labels)


def test_total_loss_composition_and_aux():
  logits, labels = _batch()
  loss, aux = total(logits, labels, tv_weight=0.3, dice_weight=0.5)
  probs = jax.nn.sigmoid(logits)
  _close(aux["bce"], bce(logits, labels))
  _close(aux["tv"], aniso(probs, "mean"))
  _close(aux["dice"], dice(probs, labels))
  _close(loss, aux["bce"] + 0.3 * aux["tv"] + 0.5 * aux["dice"])
  # tv_weight=0 is the baseline: loss is the BCE alone.
  base, _ = total(logits, labels, tv_weight=0.0)
  _close(base, aux["bce"])
  loss_iso, aux_iso = total(logits, labels, tv_weight=1.0, tv_kind="isotropic", tv_reduction="sum")
  _close(aux_iso["tv"], iso(probs, "sum"))
  _close(loss_iso, aux_iso["bce"] + aux_iso["tv"])


def test_total_loss_authors_channel_selection():
  logits, labels = _batch()
  _, aux = total(logits, labels, tv_weight=2.4e-7, tv_channels=(1,))
  _close(aux["tv"], aniso(jax.nn.sigmoid(logits)[..., 1], "mean"))
  with pytest.raises(ValueError, match="tv_channels"):
    total(logits, labels, tv_weight=1.0, tv_channels=(2,))


def test_total_loss_jit_matches_eager():
  logits, labels = _batch()
  w = jnp.ones(logits.shape[:3]).at[:, -1].set(0)
  fn = functools.partial(losses.total_loss, tv_weight=0.1, tv_reduction="sum", dice_weight=0.2)
  eager = fn(logits, labels, weights=w)
  jitted = jax.jit(fn)(logits, labels, weights=w)
  jax.tree_util.tree_map(lambda a, b: _close(a, b, 1e-6), eager, jitted)
  # A traced tv_weight (e.g. a schedule) is fine too.
  traced = jax.jit(lambda lam: losses.total_loss(logits, labels, tv_weight=lam)[0])(0.1)
  _close(traced, losses.total_loss(logits, labels, tv_weight=0.1)[0])


def test_gradients_match_finite_differences_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    # Generic random values: no difference is exactly 0, so |.| is differentiable.
    p = jnp.asarray(rng.uniform(size=(2, 5, 4, 2)))
    w = jnp.asarray((rng.uniform(size=(2, 5, 4)) > 0.2).astype(np.float64))
    logits = jnp.asarray(rng.normal(size=(2, 5, 4, 2)))
    labels = jnp.asarray(rng.uniform(size=(2, 5, 4, 2)))
    assert p.dtype == jnp.float64
    # Jitted, and plain + weighted in one function: check_grads evaluates each
    # function dozens of times and every compile costs.
    for red in losses.REDUCTIONS:
      for fn in (losses.anisotropic_tv, losses.isotropic_tv):
        both = jax.jit(lambda q, f=fn, r=red: f(q, r) + 0.37 * f(q, r, weights=w))
        check_grads(both, (p,), order=1, modes=["rev"])
    check_grads(jax.jit(lambda z: losses.bce_with_logits(z, labels, weights=w)), (logits,), order=2)
    # BCE + TV + Dice together.
    check_grads(
      jax.jit(lambda z: losses.total_loss(z, labels, tv_weight=0.7, dice_weight=0.3, weights=w)[0]),
      (logits,),
      order=1,
      modes=["rev"],
    )


def test_bfloat16_inputs_are_computed_in_float32():
  logits, labels = _batch()
  loss16, _ = losses.total_loss(logits.astype(jnp.bfloat16), labels, tv_weight=0.5)
  loss32, _ = losses.total_loss(
    logits.astype(jnp.bfloat16).astype(jnp.float32), labels, tv_weight=0.5
  )
  assert loss16.dtype == jnp.float32
  _close(loss16, loss32)


def test_bad_inputs_raise_clear_errors():
  p = np.zeros((1, 4, 4), np.float32)
  with pytest.raises(ValueError, match="reduction"):
    losses.anisotropic_tv(p, "median")
  with pytest.raises(ValueError, match=r"weights must have shape \(B, H, W\)"):
    losses.anisotropic_tv(p, weights=np.ones((1, 4, 3)))
  with pytest.raises(ValueError, match="probs must be"):
    losses.anisotropic_tv(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="H and W must be >= 2"):
    losses.isotropic_tv(np.zeros((1, 1, 4)))
  with pytest.raises(ValueError, match="same shape"):
    losses.bce_with_logits(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match="tv_kind"):
    losses.total_loss(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 1)), tv_weight=1.0, tv_kind="l2")


# ------------------------------------------------------- the authors' 2-channel head


def _keras_bce_numpy(logits, lesion):
  """Keras' `binary_crossentropy(K.flatten(one_hot), K.flatten(sigmoid(logits)))`, in numpy.

  Transcribed from Keras (backend `binary_crossentropy`, from_logits=False): float32 sigmoid
  outputs, clip to [epsilon, 1 - epsilon] with epsilon = 1e-7, then
  -(y log p + (1 - y) log(1 - p)), mean over every element of the flattened tensors.
  """
  x = np.asarray(logits, np.float64)
  p = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)  # the float32 model output
  eps = np.float32(1e-7)
  p = np.clip(p, eps, np.float32(1.0) - eps).astype(np.float64)
  y = np.asarray(lesion, np.float64)
  t = np.concatenate([1.0 - y, y], axis=-1)  # one-hot (background, lesion), as the script
  t, p = t.ravel(), p.ravel()
  return np.mean(-(t * np.log(p) + (1.0 - t) * np.log(1.0 - p)))


def _paper_batch(seed=7, shape=(2, 6, 5)):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3, size=shape + (2,))
  # Large magnitudes, where sigmoid saturates and the clip decides the value.
  big = rng.uniform(size=logits.shape) < 0.3
  logits[big] = rng.choice([-100.0, -30.0, -17.0, 17.0, 30.0, 100.0], size=big.sum())
  lesion = (rng.uniform(size=shape + (1,)) < 0.4).astype(np.float32)
  return logits.astype(np.float32), lesion


def test_lesion_channel():
  assert losses.lesion_channel(1) == 0
  assert losses.lesion_channel(2) == 1
  with pytest.raises(ValueError, match="num_outputs must be 1 or 2"):
    losses.lesion_channel(3)


def test_paper_head_bce_hand_value_where_the_clip_bites():
  # One pixel, lesion (targets (0, 1)), logits (100, -100): both sigmoids saturate, wrong way.
  # Background: p = 1 -> 1 - float32(1 - 1e-7) = 2**-23 -> -log = 23 ln 2 = 15.9423851.
  # Lesion: p = 0 -> float32(1e-7) -> -log = 16.1180956. Mean over the 2 elements: 16.0302404.
  x = np.array([100.0, -100.0], np.float32).reshape(1, 1, 1, 2)
  y = np.ones((1, 1, 1, 1), np.float32)
  value = losses.keras_binary_crossentropy(jax.nn.sigmoid(jnp.asarray(x)), np.array([[[[0, 1]]]]))
  _close(value, (15.9423851 + 16.1180956) / 2, 1e-6)
  # total_loss needs H, W >= 2 for TV: tile the pixel (same mean).
  xt, yt = np.tile(x, (1, 2, 2, 1)), np.tile(y, (1, 2, 2, 1))
  _, aux = total(xt, yt, tv_weight=0.0)
  _close(aux["bce"], (15.9423851 + 16.1180956) / 2, 1e-6)
  # The logits form (no clip) would say 100 per element.
  _close(bce(xt, np.concatenate([1 - yt, yt], -1)), 100.0, 1e-5)


def test_paper_head_bce_equals_keras_numpy_transcription():
  logits, lesion = _paper_batch()
  ref = _keras_bce_numpy(logits, lesion)
  for red in losses.REDUCTIONS:
    _, aux = total(logits, lesion, tv_weight=0.5, tv_reduction=red)
    _close(aux["bce"], ref, 1e-5)
  # Not the unclipped logits form on the same targets: the clip bites on this batch.
  unclipped = float(bce(logits, np.concatenate([1 - lesion, lesion], -1)))
  assert abs(unclipped - ref) > 0.5
  # Pixel weights: the mean over the kept pixels and both channels.
  w = np.ones(lesion.shape[:3], np.float32)
  w[:, :, -1] = 0
  _, aux_w = total(logits, lesion, tv_weight=0.0, weights=w)
  _close(aux_w["bce"], _keras_bce_numpy(logits[:, :, :-1], lesion[:, :, :-1]), 1e-5)


def test_paper_head_tv_and_dice_see_the_lesion_channel_only():
  logits, lesion = _paper_batch(8)
  p1 = 1.0 / (1.0 + np.exp(-logits[..., 1].astype(np.float64)))
  dh, dw = np.abs(np.diff(p1, axis=1)), np.abs(np.diff(p1, axis=2))
  tv_ref = {"mean": dh.mean() + dw.mean(), "sum": (dh.sum((1, 2)) + dw.sum((1, 2))).mean()}
  y = lesion[..., 0].astype(np.float64)
  dice_ref = 1 - (2 * np.sum(p1 * y) + 1) / (np.sum(p1) + np.sum(y) + 1)
  other = logits.copy()
  other[..., 0] = np.random.default_rng(9).normal(scale=5, size=other.shape[:3])
  for red in losses.REDUCTIONS:
    loss, aux = total(logits, lesion, tv_weight=0.3, tv_reduction=red, dice_weight=0.2)
    _close(aux["tv"], tv_ref[red], 1e-5)
    _close(aux["dice"], dice_ref, 1e-5)
    _close(loss, aux["bce"] + 0.3 * aux["tv"] + 0.2 * aux["dice"])
    # Another background channel: same TV and Dice, another BCE.
    _, aux_other = total(other, lesion, tv_weight=0.3, tv_reduction=red, dice_weight=0.2)
    assert float(aux_other["tv"]) == float(aux["tv"])
    assert float(aux_other["dice"]) == float(aux["dice"])
    assert float(aux_other["bce"]) != float(aux["bce"])


def test_paper_head_gradient_is_finite_and_zero_where_clipped():
  logits, lesion = _paper_batch(10)
  for tv_kind in losses.TV_KINDS:
    fn = lambda z, k=tv_kind: losses.total_loss(
      z, lesion, tv_weight=1.0, tv_kind=k, dice_weight=1.0
    )[0]
    g = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(logits)))
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  # BCE alone: saturated background logits (|x| = 100) get no gradient, as in Keras.
  g_bce = np.asarray(jax.jit(jax.grad(lambda z: total(z, lesion, tv_weight=0.0)[0]))(logits))
  saturated = np.abs(logits[..., 0]) == 100.0
  assert saturated.any() and np.all(g_bce[..., 0][saturated] == 0)


def test_paper_head_bad_labels_raise():
  with pytest.raises(ValueError, match="same shape"):
    losses.total_loss(np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 3)), tv_weight=1.0)
  with pytest.raises(ValueError, match=r"labels must be \(B, H, W, 1\)"):
    losses.paper_targets(np.zeros((1, 4, 4, 2)))


def test_paper_head_tiny_unet_trains():
  model = models.UNet(base=4, depth=2, num_outputs=2, conv_backend="xla", dropout=0.0)
  rng = np.random.default_rng(11)
  x = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
  yy, xx = np.mgrid[:16, :16]
  disc = ((yy - 8) ** 2 + (xx - 7) ** 2 < 16).astype(np.float32)
  # The lesion is where the image is bright (image 0; image 1 has none): learnable in a few
  # steps.
  x[0, ..., 0] += 2 * disc
  lesion = np.stack([disc, np.zeros_like(disc)])[..., None]
  variables = jax.tree.map(jnp.asarray, random_variables(model, x.shape, seed=3))
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(1e-2)

  def loss_fn(params, stats):
    logits, new = model.apply(
      {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    loss, _ = losses.total_loss(logits, lesion, tv_weight=0.1, tv_reduction="mean")
    return loss, new["batch_stats"]

  @jax.jit
  def step(params, stats, opt_state):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  opt_state = tx.init(params)
  history = []
  for _ in range(8):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    history.append(float(loss))
  assert all(np.isfinite(history))
  assert history[-1] < 0.85 * history[0], history
  assert all(b < a for a, b in zip(history, history[1:])), history


def test_matched_sum_weight_is_the_mean_loss_on_square_images():
  """On H = W images both difference maps have H (H - 1) terms, so sum-TV = H (H - 1) mean-TV
  and lambda / (H (H - 1)) with 'sum' is the same loss as lambda with 'mean': values and
  gradients agree to float32 rounding (why the study runs its matched sum arms on one seed).
  On a non-square image the two differ."""
  rng = np.random.default_rng(7)
  for h, w, same in ((128, 128, True), (128, 96, False)):
    logits = jnp.asarray(rng.normal(size=(3, h, w, 1)), jnp.float32)
    labels = jnp.asarray(rng.random((3, h, w, 1)) < 0.1, jnp.float32)

    def loss(lg, lb, reduction, lam):
      return losses.total_loss(lg, lb, tv_weight=lam, tv_reduction=reduction)[0]

    mean_loss, mean_grad = jax.value_and_grad(loss)(logits, labels, "mean", 0.1)
    sum_loss, sum_grad = jax.value_and_grad(loss)(logits, labels, "sum", 0.1 / (h * (h - 1)))
    if same:
      assert float(sum_loss) == pytest.approx(float(mean_loss), rel=1e-6)
      np.testing.assert_allclose(sum_grad, mean_grad, rtol=1e-4, atol=1e-9)
    else:
      tv_mean = float(losses.anisotropic_tv(jax.nn.sigmoid(logits), "mean"))
      tv_sum = float(losses.anisotropic_tv(jax.nn.sigmoid(logits), "sum"))
      assert abs(tv_sum / (h * (h - 1)) - tv_mean) > 1e-3 * tv_mean
