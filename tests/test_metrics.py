"""Tests for tvunet_jax.metrics against hand-computed values, numpy, scipy and scikit-learn."""

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from tvunet_jax import metrics

NAN = float("nan")


def _random_batch(seed, shape=(4, 16, 16), pos_rate=0.2):
  rng = np.random.default_rng(seed)
  labels = rng.random(shape) < pos_rate
  probs = np.clip(rng.normal(0.3 + 0.35 * labels, 0.2), 0, 1).astype(np.float32)
  return probs, labels


def _sk(fn, y, pred, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn(y.ravel(), pred.ravel(), **kw)


def _same(a, b, tol=1e-12):
  """Equal up to tol, NaN equal to NaN."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(
    np.nan_to_num(a), np.nan_to_num(b), rtol=0, atol=tol
  )


# ----------------------------------------------------------------------------- counts and table


def test_confusion_counts_hand_3x3():
  probs = np.array([[0.1, 0.5, 0.9], [0.4, 0.6, 0.2], [0.7, 0.3, 0.8]], np.float32)
  labels = np.array([[0, 1, 1], [0, 1, 0], [1, 0, 0]])
  # t=0.5 (0.5 itself is positive: >=): predicted (0,1) (0,2) (1,1) (2,0) (2,2);
  #   tp = 4, fp = 1 ((2,2)), fn = 0, tn = 4.
  # t=0.85: predicted (0,2) only: tp 1, fp 0, fn 3, tn 5.  t=0: all: tp 4, fp 5.
  c = metrics.confusion_counts(probs, labels, [0.5, 0.85, 0.0])  # unsorted on purpose
  np.testing.assert_array_equal(c["tp"], [4, 1, 4])
  np.testing.assert_array_equal(c["fp"], [1, 0, 5])
  np.testing.assert_array_equal(c["fn"], [0, 3, 0])
  np.testing.assert_array_equal(c["tn"], [4, 5, 0])
  assert c["tp"].dtype == np.int64
  table = metrics.threshold_metrics(probs, labels, [0.5])
  # Dice = 2*4 / (2*4 + 1 + 0) = 8/9; IoU = 4/5; background IoU = 4/5; precision 4/5.
  np.testing.assert_allclose(table["dice"], [8 / 9])
  np.testing.assert_allclose(table["iou"], [4 / 5])
  np.testing.assert_allclose(table["class_mean_iou"], [4 / 5])
  np.testing.assert_allclose(table["precision"], [4 / 5])
  np.testing.assert_allclose(table["specificity"], [4 / 5])


def test_threshold_table_matches_sklearn():
  probs, labels = _random_batch(0)
  table = metrics.threshold_metrics(probs, labels)
  assert set(metrics.TABLE_KEYS) <= set(table)
  np.testing.assert_allclose(table["threshold"], np.arange(0.1, 1.0, 0.1))
  for i, t in enumerate(table["threshold"]):
    pred = probs >= np.float32(t)
    tn, fp, fn, tp = skm.confusion_matrix(labels.ravel(), pred.ravel(), labels=[0, 1]).ravel()
    assert (table["tp"][i], table["fp"][i], table["fn"][i], table["tn"][i]) == (tp, fp, fn, tn)
    np.testing.assert_allclose(
      table["precision"][i], skm.precision_score(labels.ravel(), pred.ravel())
    )
    np.testing.assert_allclose(table["recall"][i], skm.recall_score(labels.ravel(), pred.ravel()))
    np.testing.assert_allclose(table["dice"][i], skm.f1_score(labels.ravel(), pred.ravel()))
    np.testing.assert_allclose(table["iou"][i], skm.jaccard_score(labels.ravel(), pred.ravel()))
    np.testing.assert_allclose(
      table["class_mean_iou"][i],
      skm.jaccard_score(labels.ravel(), pred.ravel(), average="macro", labels=[0, 1]),
    )
    np.testing.assert_allclose(
      table["accuracy"][i], skm.accuracy_score(labels.ravel(), pred.ravel())
    )
    np.testing.assert_allclose(
      table["specificity"][i], skm.recall_score(labels.ravel(), pred.ravel(), pos_label=0)
    )


@pytest.mark.parametrize("case", ["empty_truth", "empty_prediction", "both_empty"])
def test_empty_mask_conventions_match_sklearn_zero_division(case):
  rng = np.random.default_rng(1)
  probs = rng.uniform(0, 0.9, (2, 6, 6)).astype(np.float32)
  labels = rng.random((2, 6, 6)) < 0.3
  if case in ("empty_truth", "both_empty"):
    labels[:] = False
  threshold = 0.95 if case in ("empty_prediction", "both_empty") else 0.5  # 0.95 > every prob
  pred = probs >= np.float32(threshold)
  for zd in (NAN, 0.0, 1.0):
    t = metrics.threshold_metrics(probs, labels, [threshold], zero_division=zd)
    sk_zd = np.nan if np.isnan(zd) else zd
    assert _same(t["precision"], [_sk(skm.precision_score, labels, pred, zero_division=sk_zd)])
    assert _same(t["recall"], [_sk(skm.recall_score, labels, pred, zero_division=sk_zd)])
    assert _same(t["dice"], [_sk(skm.f1_score, labels, pred, zero_division=sk_zd)])
    if not np.isnan(zd):  # sklearn's jaccard_score accepts only 0 / 1
      assert _same(t["iou"], [_sk(skm.jaccard_score, labels, pred, zero_division=zd)])
      assert _same(
        t["class_mean_iou"],
        [_sk(skm.jaccard_score, labels, pred, zero_division=zd, average="macro", labels=[0, 1])],
      )
  t = metrics.threshold_metrics(probs, labels, [threshold])  # default: NaN = undefined
  expected = {
    # No true lesion: recall undefined, the false positives are a defined failure.
    "empty_truth": dict(precision=0.0, recall=NAN, dice=0.0, iou=0.0),
    # Nothing predicted: precision undefined, the missed lesion a defined failure.
    "empty_prediction": dict(precision=NAN, recall=0.0, dice=0.0, iou=0.0),
    "both_empty": dict(precision=NAN, recall=NAN, dice=NAN, iou=NAN),
  }[case]
  for k, v in expected.items():
    assert _same(t[k], [v]), (k, t[k], v)
  if case == "both_empty":  # only the background class is defined, and perfect
    assert _same(t["class_mean_iou"], [1.0]) and _same(t["paper_miou"], [1.0])


def test_weights_match_sklearn_sample_weight_and_masking():
  probs, labels = _random_batch(2)
  rng = np.random.default_rng(3)
  w = rng.uniform(0, 2, probs.shape)
  t = metrics.threshold_metrics(probs, labels, [0.3, 0.6], weights=w)
  for i, thr in enumerate([0.3, 0.6]):
    pred = probs >= np.float32(thr)
    tn, fp, fn, tp = skm.confusion_matrix(
      labels.ravel(), pred.ravel(), sample_weight=w.ravel()
    ).ravel()
    np.testing.assert_allclose([t["tp"][i], t["fp"][i], t["fn"][i], t["tn"][i]], [tp, fp, fn, tn])
    np.testing.assert_allclose(
      t["dice"][i], skm.f1_score(labels.ravel(), pred.ravel(), sample_weight=w.ravel())
    )
  # A (B, 1, 1) padding mask == dropping the padded slices.
  mask = np.array([1, 0, 1, 0], np.float32)[:, None, None]
  masked = metrics.threshold_metrics(probs, labels, weights=mask)
  kept = metrics.threshold_metrics(probs[::2], labels[::2])
  for k in metrics.TABLE_KEYS:
    np.testing.assert_allclose(masked[k], kept[k])


# ----------------------------------------------------------------------------- paper_miou


def test_paper_miou_of_an_all_wrong_prediction_is_above_0_98():
  rng = np.random.default_rng(4)
  labels = rng.random((3, 8, 8)) < 0.3
  wrong = (~labels).astype(np.float32)
  # Every pixel wrong. Authors' one-hot channels: truth (0, 1), prediction (1, 0)
  # -> intersection 0, sum_ 2, jac = (0 + 100) / (2 - 0 + 100) = 100/102 = 0.98039.
  # Lesion channel only: (0 + 100) / (1 + 0 - 0 + 100) = 100/101 = 0.990099.
  assert metrics.paper_miou(wrong, labels, 0.5) == pytest.approx(100 / 102, abs=1e-12)
  assert metrics.paper_miou(wrong, labels, 0.5, paper_channels=1) == pytest.approx(
    100 / 101, abs=1e-12
  )
  table = metrics.threshold_metrics(wrong, labels)
  np.testing.assert_allclose(table["paper_miou"], 100 / 102, atol=1e-12)
  np.testing.assert_array_equal(table["iou"], 0.0)  # the real IoU says what happened
  np.testing.assert_array_equal(table["dice"], 0.0)
  assert metrics.paper_miou(labels.astype(np.float32), labels, 0.5) == 1.0


def test_paper_jaccard_hand_values():
  # One channel, smooth 100: (y*p + 100) / (y + p - y*p + 100).
  y = np.array([[1.0], [0.0], [1.0], [0.0]])
  p = np.array([[0.5], [0.5], [1.0], [0.0]])
  expected = [100.5 / 101, 100 / 100.5, 101 / 101, 100 / 100]
  np.testing.assert_allclose(metrics.paper_jaccard(y, p), expected, rtol=1e-15)
  # Two channels: y = (0, 1), p = (0.75, 0.25): I = 0.25, sum_ = 2 -> 100.25 / 101.75.
  np.testing.assert_allclose(metrics.paper_jaccard([[0.0, 1.0]], [[0.75, 0.25]]), [100.25 / 101.75])
  assert metrics.paper_miou(np.array([0.25]), np.array([1])) == pytest.approx(100.25 / 101.75)
  assert metrics.paper_miou(np.array([0.25]), np.array([1]), paper_channels=1) == pytest.approx(
    100.25 / 101
  )
  # Under jax too.
  np.testing.assert_allclose(
    metrics.paper_jaccard(jnp.asarray(y), jnp.asarray(p)), expected, rtol=1e-6
  )


def test_paper_miou_table_equals_the_authors_script():
  probs, labels = _random_batch(5)
  table = metrics.threshold_metrics(probs, labels)
  one_hot_true = np.stack([1 - labels, labels], -1).astype(np.float64)
  for i, t in enumerate(table["threshold"]):
    # The authors' lines, with their 2-channel layout and our >= rule.
    pred = (probs >= np.float32(t)).astype(np.float64)
    y_pred = np.stack([1 - pred, pred], -1)
    intersection = np.sum(one_hot_true * y_pred, axis=-1)
    sum_ = np.sum(np.abs(one_hot_true) + np.abs(y_pred), axis=-1)
    jac = (intersection + 100) / (sum_ - intersection + 100)
    np.testing.assert_allclose(table["paper_miou"][i], np.mean(jac), rtol=1e-13)
  # Soft version: same formula on probabilities.
  p64 = probs.astype(np.float64)
  y_soft = np.stack([1 - p64, p64], -1)
  intersection = np.sum(one_hot_true * y_soft, axis=-1)
  jac = (intersection + 100) / (np.sum(one_hot_true + y_soft, axis=-1) - intersection + 100)
  assert metrics.paper_miou(probs, labels) == pytest.approx(np.mean(jac), rel=1e-13)


# Both sigmoid outputs of the authors' head (background, lesion) on 6 pixels, NOT complementary;
# no value equals 0.1 or 0.9, so the script's `>` and our `>=` agree.
HEAD_PROBS = np.array(
  [[[0.95, 0.95], [0.05, 0.05], [0.5, 0.5]], [[0.95, 0.02], [0.3, 0.92], [0.08, 0.6]]], np.float32
)[None]  # (1, 2, 3, 2)
HEAD_MASK = np.array([[[1, 0, 1], [0, 1, 0]]])  # (1, 2, 3) lesion mask


def _authors_miou(mask, preds, tr, smooth=100):
  """main_TV_Unet_Split1.py, `jaccard_distance_loss`, one threshold (the script loops over them)."""
  num_class = 2
  label_test = np.full(mask.shape + (num_class,), 0)
  for ix in range(0, num_class):
    label_test[..., ix] = np.where(mask == ix, 1, 0)
  y_pred_t = (preds[:, :, :, :] > tr).astype(np.uint8)
  y_true_f = np.array(label_test[:, :, :, :])
  y_pred_f = np.array(y_pred_t)
  intersection = np.sum(y_true_f * y_pred_f, axis=-1)
  sum_ = np.sum(np.abs(y_true_f) + np.abs(y_pred_f), axis=-1)
  jac = (intersection + smooth) / (sum_ - intersection + smooth)
  return np.mean(jac)


def test_paper_miou_of_the_two_channel_head_follows_the_script():
  # Hand values, pixel by pixel, truth (1 - y, y) against each channel binarised on its own:
  # t = 0.1: (1,1)|y=1 -> 101/102; (0,0)|0 -> 100/101; (1,1)|1 -> 101/102; (1,0)|0 -> 1;
  #          (1,1)|1 -> 101/102; (0,1)|0 -> 100/102.
  # t = 0.9: (1,1)|1 -> 101/102; (0,0)|0 -> 100/101; (0,0)|1 -> 100/101; (1,0)|0 -> 1;
  #          (0,1)|1 -> 1; (0,0)|0 -> 100/101.
  hand = {
    0.1: (3 * 101 / 102 + 100 / 101 + 1 + 100 / 102) / 6,
    0.9: (101 / 102 + 3 * 100 / 101 + 2) / 6,
  }
  table = metrics.threshold_metrics(HEAD_PROBS, HEAD_MASK)
  for t, row in ((0.1, 0), (0.9, 8)):
    script = _authors_miou(HEAD_MASK, HEAD_PROBS, t)
    assert script == pytest.approx(hand[t], rel=1e-12)
    assert metrics.paper_miou(HEAD_PROBS, HEAD_MASK, t) == pytest.approx(script, rel=1e-12)
    # Labels as the training batches carry them, (B, H, W, 1).
    assert metrics.paper_miou(HEAD_PROBS, HEAD_MASK[..., None], t) == pytest.approx(
      script, rel=1e-12
    )
    assert table["paper_miou"][row] == pytest.approx(script, rel=1e-12)
    # The (1 - x, x) rebuild from the lesion channel gives another number on this head.
    rebuilt = metrics.paper_miou(HEAD_PROBS[..., 1], HEAD_MASK, t)
    assert abs(rebuilt - script) > 1e-3
  # The rest of the table reads the lesion channel.
  lesion_table = metrics.threshold_metrics(HEAD_PROBS[..., 1], HEAD_MASK)
  for k in ("dice", "iou", "precision", "recall", "tp", "fp", "fn", "tn"):
    np.testing.assert_array_equal(table[k], lesion_table[k])
  # Soft: the script's formula on the unthresholded outputs.
  t2 = np.stack([1 - HEAD_MASK, HEAD_MASK], -1).astype(np.float64)
  p2 = HEAD_PROBS.astype(np.float64)
  inter = np.sum(t2 * p2, -1)
  soft = np.mean((inter + 100) / (np.sum(t2 + p2, -1) - inter + 100))
  assert metrics.paper_miou(HEAD_PROBS, HEAD_MASK) == pytest.approx(soft, rel=1e-12)


def test_paper_miou_head_weights_jit_and_lesion_only():
  # Weight 0 on a pixel = the pixel removed (here the last one: the script on 5 pixels).
  w = np.ones(HEAD_MASK.shape)
  w[0, 1, 2] = 0
  kept = _authors_miou(HEAD_MASK[:, :1], HEAD_PROBS[:, :1], 0.1) * 3
  kept += _authors_miou(HEAD_MASK[:, 1:, :2], HEAD_PROBS[:, 1:, :2], 0.1) * 2
  assert metrics.paper_miou(HEAD_PROBS, HEAD_MASK, 0.1, weights=w) == pytest.approx(kept / 5)
  # Under jit, per threshold, the same sums as on the host.
  thr = np.array([0.1, 0.9])
  stats = jax.jit(functools.partial(metrics.paper_miou_stats, thresholds=jnp.asarray(thr)))(
    jnp.asarray(HEAD_PROBS), jnp.asarray(HEAD_MASK)
  )
  expected = [6 * _authors_miou(HEAD_MASK, HEAD_PROBS, t) for t in thr]
  np.testing.assert_allclose(stats["paper_jaccard_sum"], expected, rtol=1e-6)
  assert float(stats["pixel_count"]) == 6
  # paper_channels=1: the lesion channel alone, thresholded, against y.
  b = (HEAD_PROBS[..., 1] > 0.1).astype(np.float64)
  y = HEAD_MASK.astype(np.float64)
  one = np.mean((y * b + 100) / (y + b - y * b + 100))
  assert metrics.paper_miou(HEAD_PROBS, HEAD_MASK, 0.1, paper_channels=1) == pytest.approx(one)
  with pytest.raises(ValueError, match="probs shape"):
    metrics.paper_miou(np.zeros((1, 2, 3, 3)), HEAD_MASK, 0.5)


# ----------------------------------------------------------------------------- PR curve and AP


def test_exact_average_precision_and_curve_match_sklearn():
  rng = np.random.default_rng(6)
  labels = rng.random(3000) < 0.3
  probs = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)  # many ties
  w = rng.uniform(0, 3, probs.shape)
  w[:50] = 0
  for weights in (None, w):
    ap = metrics.average_precision(probs, labels, weights=weights)
    assert ap == pytest.approx(
      skm.average_precision_score(labels, probs, sample_weight=weights), abs=1e-12
    )
    curve = metrics.pr_curve(probs, labels, weights=weights)
    precision, recall, thresholds = skm.precision_recall_curve(labels, probs, sample_weight=weights)
    np.testing.assert_allclose(curve["precision"], precision, atol=1e-12)
    np.testing.assert_allclose(curve["recall"], recall, atol=1e-12)
    np.testing.assert_allclose(curve["thresholds"], thresholds, atol=0)


def test_histogram_average_precision_is_within_1e_3_on_1e5_pixels():
  rng = np.random.default_rng(7)
  labels = rng.random(100_000) < 0.2
  probs = np.where(labels, rng.beta(4, 2, labels.size), rng.beta(2, 4, labels.size))
  probs = probs.astype(np.float32)
  exact = skm.average_precision_score(labels, probs)
  hist = metrics.score_histogram(probs, labels, 1000)
  approx, bound = metrics.average_precision_from_histogram(hist["pos_hist"], hist["neg_hist"])
  assert abs(approx - exact) < 1e-3
  assert abs(approx - exact) <= bound
  assert metrics.average_precision(probs, labels, num_bins=1000) == approx
  # The binned curve is sklearn's curve of the scores rounded down to a bin edge
  # (1024 bins: edges k / 1024 are exact in float32, so the rounding is exact).
  curve = metrics.pr_curve(probs, labels, num_bins=1024)
  quantized = np.floor(probs * np.float32(1024)) / np.float32(1024)
  precision, recall, thresholds = skm.precision_recall_curve(labels, quantized)
  np.testing.assert_allclose(curve["precision"], precision, atol=1e-12)
  np.testing.assert_allclose(curve["recall"], recall, atol=1e-12)
  np.testing.assert_allclose(curve["thresholds"], thresholds, atol=0)


def test_score_histogram_hand_and_no_positive_ap():
  probs = np.array([0.0, 0.24, 0.25, 0.5, 0.99, 1.0], np.float32)
  labels = np.array([0, 1, 0, 1, 1, 0])
  h = metrics.score_histogram(probs, labels, 4)  # bins [0,.25) [.25,.5) [.5,.75) [.75,1]
  np.testing.assert_array_equal(h["pos_hist"], [1, 0, 1, 1])
  np.testing.assert_array_equal(h["neg_hist"], [1, 1, 0, 1])
  assert np.isnan(metrics.average_precision(probs, np.zeros(6)))
  assert np.isnan(metrics.average_precision(probs, np.zeros(6), num_bins=10))


# ----------------------------------------------------------------------------- jit / sharded paths


def _assert_stats_equal(got, want):
  assert set(got) == set(want)
  for k in want:
    if k == "paper_jaccard_sum":
      np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5)
    else:
      np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)


def _hard_bin_values(num_bins):
  """float32 values next to bin edges where floor(p * n) lands in the wrong bin."""
  edges = np.arange(num_bins, dtype=np.float32) * np.float32(1 / num_bins)  # the documented edges
  near = np.concatenate(
    [np.nextafter(edges, np.float32(0)), edges, np.nextafter(edges, np.float32(1))]
  )
  near = near[(near >= 0) & (near <= 1)].astype(np.float32)
  floor_bin = np.floor(near * np.float32(num_bins)).astype(int)
  true_bin = (near[:, None] >= edges).sum(1) - 1
  return near[floor_bin != true_bin], edges


def test_batch_stats_jit_equals_numpy():
  probs, labels = _random_batch(8)
  hard, edges = _hard_bin_values(1000)
  assert hard.size >= 8
  probs[0, 0, :9] = np.arange(1, 10) / 10  # values exactly on the thresholds
  probs[0, 1, :8] = hard[:8]  # and where naive binning goes wrong
  probs[0, 2, :4] = [0.0, 1.0, 0.25, 0.5]
  # Reference: the histogram's reverse cumulative sums are tp / fp at each edge.
  h = metrics.score_histogram(probs, labels, 1000)
  ge = probs.ravel()[:, None] >= edges
  np.testing.assert_array_equal(np.cumsum(h["pos_hist"][::-1])[::-1], ge[labels.ravel()].sum(0))
  np.testing.assert_array_equal(np.cumsum(h["neg_hist"][::-1])[::-1], ge[~labels.ravel()].sum(0))

  mask = np.array([1, 1, 0, 1], np.float32)[:, None, None]
  step = jax.jit(functools.partial(metrics.batch_stats, num_bins=1000))
  for weights in (None, mask):
    want = metrics.batch_stats(probs, labels, metrics.PAPER_THRESHOLDS, weights, num_bins=1000)
    got = step(
      jnp.asarray(probs),
      jnp.asarray(labels),
      metrics.PAPER_THRESHOLDS,
      None if weights is None else jnp.asarray(weights),
    )
    _assert_stats_equal(got, want)
  assert got["tp"].dtype == jnp.float32 and want["tp"].dtype == np.float64
  got = step(jnp.asarray(probs), jnp.asarray(labels), metrics.PAPER_THRESHOLDS, None)
  assert got["tp"].dtype == jnp.int32


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_batch_stats_under_a_sharded_jit(axis_type):
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  probs, labels = _random_batch(9, shape=(16, 8, 8))
  want = metrics.batch_stats(probs, labels, num_bins=32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  step = jax.jit(functools.partial(metrics.batch_stats, num_bins=32))
  with jax.set_mesh(mesh):
    got = step(jax.device_put(probs, sharding), jax.device_put(labels, sharding))
    got = jax.device_get(got)
  _assert_stats_equal(got, want)


# ----------------------------------------------------------------------------- accumulator


def test_accumulator_batches_equal_one_shot_and_merge():
  batches = [_random_batch(10 + i, shape=(b, 16, 16)) for i, b in enumerate((3, 5, 2))]
  vols = [np.array([0, 0, 1]), np.array([1, 1, 2, 2, 2]), np.array([3, 3])]
  probs = np.concatenate([p for p, _ in batches])
  labels = np.concatenate([y for _, y in batches])
  one = metrics.SegmentationAccumulator(num_bins=100)
  one.update(probs, labels, volume_ids=np.concatenate(vols))
  many = metrics.SegmentationAccumulator(num_bins=100)
  for (p, y), v in zip(batches, vols):
    many.update(p, y, volume_ids=v)
  # Two "hosts", merged by adding their state dicts (what an all-reduce does).
  a = metrics.SegmentationAccumulator(num_bins=100, num_volumes=4)
  b = metrics.SegmentationAccumulator(num_bins=100, num_volumes=4)
  a.update(*batches[0], volume_ids=vols[0])
  b.update(*batches[1], volume_ids=vols[1])
  b.update(*batches[2], volume_ids=vols[2])
  summed = {k: a.state_dict()[k] + b.state_dict()[k] for k in a.state_dict()}
  reduced = metrics.SegmentationAccumulator.from_state_dict(summed, **a.config)
  merged = metrics.SegmentationAccumulator(num_bins=100).merge(many)
  for acc in (many, reduced, merged):
    for k, v in one.state_dict().items():
      np.testing.assert_allclose(acc.state_dict()[k], v, rtol=1e-12, err_msg=k)

  r = many.result()
  direct = metrics.threshold_metrics(probs, labels)
  for k in metrics.TABLE_KEYS:
    np.testing.assert_allclose(r[k], direct[k], rtol=1e-12, err_msg=k)
  assert r["average_precision"] == pytest.approx(
    metrics.average_precision(probs, labels, num_bins=100), abs=1e-12
  )
  assert (
    abs(r["average_precision"] - skm.average_precision_score(labels.ravel(), probs.ravel()))
    <= r["average_precision_max_error"]
  )
  assert r["paper_miou_soft"] == pytest.approx(metrics.paper_miou(probs, labels), rel=1e-12)
  assert r["operating"]["dice"] == pytest.approx(
    skm.f1_score(labels.ravel(), (probs >= 0.5).ravel()), rel=1e-12
  )
  np.testing.assert_array_equal(r["per_volume"]["volume_id"], [0, 1, 2, 3])
  np.testing.assert_array_equal(r["per_volume"]["num_slices"], [2, 3, 3, 2])
  sl = slice(0, 2)  # volume 0 = the first two slices
  assert r["per_volume"]["dice"][0] == pytest.approx(
    skm.f1_score(labels[sl].ravel(), (probs[sl] >= 0.5).ravel()), rel=1e-12
  )


def test_device_sums_plus_host_slices_equal_update():
  """What evaluation does: the pixel sums made by `batch_stats` in jnp (weights masking padded
  rows), the per-slice part added on the host from the thresholded valid rows, equals `update`
  on the valid rows alone; the per-slice state of two "hosts" adds up to the whole."""
  (p, y), vols = _random_batch(21, shape=(6, 16, 16)), np.array(["a", "a", "b", "b", "c", ""])
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
  ref = metrics.SegmentationAccumulator(num_bins=100, volume_names=["a", "b", "c"])
  ref.update(p[:5], y[:5], volume_ids=vols[:5])
  acc = metrics.SegmentationAccumulator(num_bins=100, volume_names=["a", "b", "c"])
  stats = jax.jit(functools.partial(metrics.batch_stats, num_bins=100))(
    jnp.asarray(p),
    jnp.asarray(y),
    jnp.asarray(metrics.PAPER_THRESHOLDS),
    jnp.asarray(valid)[:, None, None],
  )
  acc.add_batch_stats(jax.device_get(stats))
  host_a = metrics.SegmentationAccumulator(num_bins=100, volume_names=["a", "b", "c"])
  host_b = metrics.SegmentationAccumulator(num_bins=100, volume_names=["a", "b", "c"])
  host_a.add_slices(p[:3] >= 0.5, y[:3], volume_ids=vols[:3])
  host_b.add_slices(p[3:5] >= 0.5, y[3:5], volume_ids=vols[3:5])
  acc.set_slice_state(
    {k: host_a.slice_state()[k] + host_b.slice_state()[k] for k in metrics.accumulator.SLICE_KEYS}
  )
  for k, v in ref.state_dict().items():
    # float32 device sums of <= 1280 pixels are exact integers; the Jaccard sum is float32
    np.testing.assert_allclose(acc.state_dict()[k], v, rtol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="add_batch_stats: tp has shape"):
    acc.add_batch_stats({**jax.device_get(stats), "tp": np.zeros(3)})
  with pytest.raises(ValueError, match="pred and labels must be"):
    acc.add_slices(p[:2] >= 0.5, y[:3])


def test_per_volume_dice_and_empty_volume_rule():
  labels = np.zeros((4, 4, 4), bool)
  probs = np.zeros((4, 4, 4), np.float32)
  labels[0, :2, :2] = True  # volume 0: truth 4 px, prediction 2 of them + 2 wrong
  probs[0, 0, :4] = 0.9  # tp 2, fp 2, fn 2 -> Dice 4 / 8 = 0.5
  # volume 1 (slices 1, 2): truth and prediction empty -> undefined, skipped
  labels[3, 1, 1] = True  # volume 2: a lesion, nothing predicted -> Dice 0
  acc = metrics.SegmentationAccumulator()
  acc.update(probs, labels, volume_ids=np.array([0, 1, 1, 2]))
  r = acc.result()
  np.testing.assert_array_equal(r["per_volume"]["tp"], [2, 0, 0])
  np.testing.assert_array_equal(r["per_volume"]["fp"], [2, 0, 0])
  np.testing.assert_array_equal(r["per_volume"]["fn"], [2, 0, 1])
  assert _same(r["per_volume"]["dice"], [0.5, NAN, 0.0])
  assert r["mean_volume_dice"] == 0.25
  assert r["num_volumes"] == 3 and r["num_volumes_undefined_dice"] == 1


def test_named_volumes_merge_by_name_and_report():
  probs, labels = _random_batch(12, shape=(6, 8, 8))
  names = np.array(["b", "a", "a", "c", "b", "c"])
  one = metrics.SegmentationAccumulator(num_bins=50)
  one.update(probs, labels, volume_ids=names)
  first = metrics.SegmentationAccumulator(num_bins=50)
  first.update(probs[:3], labels[:3], volume_ids=names[:3])
  second = metrics.SegmentationAccumulator(num_bins=50)
  second.update(probs[3:], labels[3:], volume_ids=names[3:])  # rows in another order
  merged = first.merge(second)
  r_one, r_merged = one.result(), merged.result()
  for r in (r_one, r_merged):
    order = np.argsort(r["per_volume"]["volume_id"])
    np.testing.assert_array_equal(r["per_volume"]["volume_id"][order], ["a", "b", "c"])
    for i, name in enumerate(["a", "b", "c"]):
      sel = names == name
      want = skm.f1_score(labels[sel].ravel(), (probs[sel] >= 0.5).ravel())
      assert r["per_volume"]["dice"][order][i] == pytest.approx(want, rel=1e-12)
  # Fixed names up front: same rows everywhere, so states add across hosts.
  fixed = dict(num_bins=50, volume_names=["a", "b", "c"])
  h1, h2 = metrics.SegmentationAccumulator(**fixed), metrics.SegmentationAccumulator(**fixed)
  h1.update(probs[:3], labels[:3], volume_ids=names[:3])
  h2.update(probs[3:], labels[3:], volume_ids=names[3:])
  summed = {k: h1.state_dict()[k] + h2.state_dict()[k] for k in h1.state_dict()}
  r_sum = metrics.SegmentationAccumulator.from_state_dict(summed, **h1.config).result()
  np.testing.assert_array_equal(r_sum["per_volume"]["volume_id"], ["a", "b", "c"])
  order = np.argsort(r_one["per_volume"]["volume_id"])
  np.testing.assert_allclose(r_sum["per_volume"]["dice"], r_one["per_volume"]["dice"][order])
  with pytest.raises(ValueError, match="not in volume_names"):
    h1.update(probs[:1], labels[:1], volume_ids=["z"])
  with pytest.raises(ValueError, match="switched"):
    h1.update(probs[:1], labels[:1], volume_ids=[0])


def test_summary_scalars_and_json():
  probs, labels = _random_batch(13)
  acc = metrics.SegmentationAccumulator(num_bins=20)
  acc.update(probs, labels, volume_ids=np.array([0, 0, 1, 1]))
  result = acc.result()
  result["loss"] = 0.25  # callers add their own numbers
  scalars = metrics.summary_scalars(result, threshold=0.5)
  assert scalars["dice"] == result["dice"][4] and scalars["loss"] == 0.25
  assert scalars["paper_miou_soft"] == result["paper_miou_soft"]
  assert scalars["isolated_fp_fraction"] == result["connectivity"]["isolated_fp_fraction"]
  assert all(isinstance(v, float) for v in scalars.values())
  with pytest.raises(ValueError, match="threshold"):
    metrics.summary_scalars(result, threshold=0.55)
  result["per_volume"]["dice"][0] = np.nan
  text = json.dumps(metrics.to_jsonable(result), allow_nan=False)
  back = json.loads(text)
  assert back["per_volume"]["dice"][0] is None
  np.testing.assert_allclose(back["precision"], result["precision"])


# ----------------------------------------------------------------------------- components


def _hand_drawn_8x8():
  truth = np.zeros((8, 8), bool)
  truth[1:3, 1:3] = True  # lesion A
  truth[4:6, 5:7] = True  # lesion B (missed)
  pred = np.zeros((8, 8), bool)
  pred[1:3, 1:4] = True  # overlaps A
  pred[1, 7] = True  # isolated speck
  pred[7, 0] = True  # isolated speck
  return pred, truth


def test_component_counts_on_a_hand_drawn_slice():
  pred, truth = _hand_drawn_8x8()
  cc = metrics.component_counts(pred[None], truth[None])
  assert cc["pred_components"][0] == 3 and cc["true_components"][0] == 2
  assert cc["isolated_pred_components"][0] == 2 and cc["missed_true_components"][0] == 1
  assert cc["pred_components"][0] == ndimage.label(pred, np.ones((3, 3)))[1]
  assert cc["true_components"][0] == ndimage.label(truth, np.ones((3, 3)))[1]

  acc = metrics.SegmentationAccumulator()
  probs = np.where(pred, 0.8, 0.1).astype(np.float32)[None]
  # A second, padded slice (weight 0) must not count.
  acc.update(
    np.concatenate([probs, np.ones_like(probs)]),
    np.concatenate([truth[None], np.zeros_like(truth[None])]),
    weights=np.array([1.0, 0.0]),
  )  # (B,) = per slice
  c = acc.result()["connectivity"]
  assert c["num_slices"] == 1
  assert c["mean_pred_components"] == 3 and c["mean_true_components"] == 2
  assert c["component_count_mae"] == 1
  assert c["isolated_fp_fraction"] == pytest.approx(2 / 3)
  assert c["isolated_fp_components_per_slice"] == 2
  assert c["missed_lesion_fraction"] == 0.5


def test_diagonal_pixels_are_one_component_under_8_connectivity_only():
  pred = np.zeros((1, 4, 4), bool)
  pred[0, 0, 0] = pred[0, 1, 1] = True
  truth = np.zeros_like(pred)
  assert metrics.component_counts(pred, truth)["pred_components"][0] == 1
  assert metrics.component_counts(pred, truth, connectivity=4)["pred_components"][0] == 2
  assert metrics.component_counts(pred, truth)["isolated_pred_components"][0] == 1


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_one_line_errors():
  probs, labels = _random_batch(11, shape=(2, 4, 4))
  with pytest.raises(ValueError, match="probs shape"):
    metrics.threshold_metrics(probs, labels[:, :3])
  with pytest.raises(ValueError, match="labels must be 0/1"):
    metrics.threshold_metrics(probs, labels * 2)
  with pytest.raises(ValueError, match="NaN"):
    metrics.threshold_metrics(np.full_like(probs, np.nan), labels)
  with pytest.raises(ValueError, match="thresholds"):
    metrics.confusion_counts(probs, labels, [[0.5]])
  with pytest.raises(ValueError, match="does not broadcast"):
    metrics.threshold_metrics(probs, labels, weights=np.ones(3))
  acc = metrics.SegmentationAccumulator()
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    acc.update(probs * 3, labels)
  with pytest.raises(ValueError, match="volume_ids"):
    acc.update(probs, labels, volume_ids=np.array([0]))
  with pytest.raises(ValueError, match="num_volumes"):
    metrics.SegmentationAccumulator(num_volumes=1).update(
      probs, labels, volume_ids=np.array([0, 1])
    )
  with pytest.raises(ValueError, match="configs differ"):
    acc.merge(metrics.SegmentationAccumulator(num_bins=10))
  with pytest.raises(ValueError, match="keys"):
    metrics.SegmentationAccumulator.from_state_dict({"tp": np.zeros(9)})
  with pytest.raises(ValueError, match="connectivity"):
    metrics.component_counts(labels, labels, connectivity=6)
  for err in ("probs shape", "labels must be 0/1"):
    try:
      metrics.threshold_metrics(probs, labels[:, :3] if err == "probs shape" else labels * 2)
    except ValueError as e:
      assert "\n" not in str(e) and str(e).startswith("metrics.")
