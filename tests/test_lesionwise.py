"""Tests for tvunet_jax.metrics.lesionwise against cc3d + surface_distance and hand-computed values.

The reference below follows the BraTS 2023 lesion-wise procedure and the autoPET FP / FN volume
definition with other libraries' primitives only: cc3d (connected-components-3d) labels the
components, scipy dilates full volumes lesion by lesion, DeepMind's surface_distance computes
HD95. It never calls the module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from tvunet_jax.metrics import lesionwise

cc3d = pytest.importorskip("cc3d")
sd_metrics = pytest.importorskip("surface_distance.metrics")
sd_tables = pytest.importorskip("surface_distance.lookup_tables")

# surface_distance 0.1 reads scipy's deprecated ndimage.filters / ndimage.morphology names.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PENALTY = 374.0


@pytest.fixture(autouse=True)
def _numpy_inf_alias(monkeypatch):
  # surface_distance 0.1 writes `np.Inf` (removed in NumPy 2) when a mask has no surface, i.e.
  # exactly for a missed lesion; give it the alias back for the reference computation only.
  monkeypatch.setattr(np, "Inf", np.inf, raising=False)


# ----------------------------------------------------------------------------- the reference


def _reference_hd95(a, b, spacing):
  dists = sd_metrics.compute_surface_distances(a.astype(bool), b.astype(bool), spacing)
  return sd_metrics.compute_robust_hausdorff(dists, 95)


def _reference(pred, truth, spacing, dilation=3, connectivity=26, min_volume=0.0):
  """BraTS 2023 lesion-wise scores and autoPET volumes, from cc3d / scipy / surface_distance."""
  pred, truth = pred.astype(bool), truth.astype(bool)
  ball = ndimage.generate_binary_structure(3, 2)

  def dilate(m):
    return ndimage.binary_dilation(m, ball, iterations=dilation) if dilation else m.copy()

  gt_cc = cc3d.connected_components(truth.astype(np.uint8), connectivity=connectivity)
  pred_cc, num_pred = cc3d.connected_components(
    pred.astype(np.uint8), connectivity=connectivity, return_N=True
  )
  dil_cc, num_dil = cc3d.connected_components(
    dilate(truth).astype(np.uint8), connectivity=connectivity, return_N=True
  )
  # Lesion identity from the dilated components, extent from the true voxels.
  lesion_map = np.where(gt_cc > 0, dil_cc, 0)
  vox = spacing[0] * spacing[1] * spacing[2]
  rows, hit = [], set()
  for lab in range(1, int(num_dil) + 1):
    gt = lesion_map == lab
    found = set(np.unique(pred_cc[dilate(gt)]).tolist()) - {0}
    hit |= found
    p = np.isin(pred_cc, sorted(found))
    dice = 2.0 * np.logical_and(gt, p).sum() / (gt.sum() + p.sum())
    hd = _reference_hd95(gt, p, spacing)
    rows.append((gt.sum() * vox, bool(found), dice, PENALTY if math.isinf(hd) else hd))
  fp = int(num_pred) - len(hit)
  kept = [r for r in rows if r[0] > min_volume]
  tp = sum(r[1] for r in kept)
  fn = len(kept) - tp
  den = len(kept) + fp
  out = {
    "lesion_dice": sum(r[2] for r in kept) / den if den else 1.0,
    "lesion_hd95": (sum(r[3] for r in kept) + fp * PENALTY) / den if den else 0.0,
    "lesion_tp": tp,
    "lesion_fp": fp,
    "lesion_fn": fn,
    "num_gt_components": int(gt_cc.max()),
    "num_gt_lesions": int(num_dil),
    "num_pred_components": int(num_pred),
  }
  # autoPET: 18-connected components that share no voxel with the other mask.
  for key, a, b in (("fp_volume_ml", pred, truth), ("fn_volume_ml", truth, pred)):
    cc = cc3d.connected_components(a.astype(np.uint8), connectivity=18)
    voxels = sum(
      int((cc == j).sum())
      for j in range(1, int(cc.max()) + 1)
      if not np.logical_and(cc == j, b).any()
    )
    out[key] = voxels * vox / 1000.0
  return out


def _check_against_reference(got, ref):
  for key, want in ref.items():
    if isinstance(want, int):
      assert got[key] == want, key
    else:
      assert got[key] == pytest.approx(want, rel=1e-12, abs=1e-12), key
  tp, fp, fn = ref["lesion_tp"], ref["lesion_fp"], ref["lesion_fn"]
  for key, num, den in (
    ("lesion_precision", tp, tp + fp),
    ("lesion_recall", tp, tp + fn),
    ("lesion_f1", 2 * tp, 2 * tp + fp + fn),
  ):
    if den:
      assert got[key] == pytest.approx(num / den), key
    else:
      assert math.isnan(got[key]), key


def _box(shape, *slices):
  m = np.zeros(shape, bool)
  for s in slices:
    m[s] = True
  return m


# ----------------------------------------------------------------------------- HD95


def test_surfel_areas_equal_surface_distance_table():
  rng = np.random.default_rng(0)
  spacings = [(1.0, 1.0, 1.0), (0.7, 0.7, 5.0)] + [tuple(rng.uniform(0.2, 4, 3)) for _ in range(6)]
  for spacing in spacings:
    want = sd_tables.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_allclose(lesionwise._surfel_areas(spacing), want, rtol=1e-15, atol=0)


def test_robust_hausdorff_equals_surface_distance_on_random_masks():
  rng = np.random.default_rng(1)
  for _ in range(60):
    shape = tuple(rng.integers(3, 10, 3))
    a = rng.random(shape) < rng.uniform(0.05, 0.6)
    b = rng.random(shape) < rng.uniform(0.05, 0.6)
    spacing = tuple(rng.uniform(0.3, 3, 3))
    want = _reference_hd95(a, b, spacing)
    assert lesionwise.robust_hausdorff(a, b, spacing) == pytest.approx(want, rel=1e-12)
    assert lesionwise.robust_hausdorff(a, b, spacing, 100.0) == pytest.approx(
      sd_metrics.compute_robust_hausdorff(sd_metrics.compute_surface_distances(a, b, spacing), 100),
      rel=1e-12,
    )


def test_robust_hausdorff_hand_values():
  # Two single voxels 3 apart along axis 2: each surface is the 8 corners of its voxel, all of
  # equal area; 4 corners lie 2 voxels from the other surface, 4 lie 3 voxels away. The 95%
  # share is reached at the eighth (farthest) corner: 3 voxels = 6 mm at 2 mm per voxel.
  a = _box((3, 3, 8), (1, 1, 2))
  b = _box((3, 3, 8), (1, 1, 5))
  assert lesionwise.robust_hausdorff(a, b, (1.0, 1.0, 2.0)) == 6.0
  assert lesionwise.robust_hausdorff(a, b, (0.5, 0.5, 1.0)) == 3.0
  assert lesionwise.robust_hausdorff(a, a, (0.5, 0.7, 3.0)) == 0.0
  assert math.isinf(lesionwise.robust_hausdorff(a, np.zeros_like(a), (1.0, 1.0, 1.0)))


# ----------------------------------------------------------------------------- hand-made volumes

SHAPE = (24, 12, 10)
LESION_A = (slice(2, 6), slice(2, 6), slice(2, 5))  # 48 voxels
LESION_B = (slice(14, 19), slice(3, 7), slice(4, 8))  # 80 voxels, 8 voxels from A


def test_two_lesions_found_exactly():
  truth = _box(SHAPE, LESION_A, LESION_B)
  got = lesionwise.lesionwise_scores(truth, truth, (0.8, 0.8, 2.5))
  assert got["lesion_dice"] == 1.0 and got["lesion_hd95"] == 0.0
  assert (got["lesion_tp"], got["lesion_fp"], got["lesion_fn"]) == (2, 0, 0)
  assert got["lesion_precision"] == got["lesion_recall"] == got["lesion_f1"] == 1.0
  assert got["fp_volume_ml"] == 0.0 and got["fn_volume_ml"] == 0.0
  assert got["num_gt_lesions"] == got["num_gt_components"] == got["num_pred_components"] == 2


def test_two_lesions_partly_found():
  truth = _box(SHAPE, LESION_A, LESION_B)
  pred = _box(
    SHAPE, (slice(3, 7), slice(2, 6), slice(2, 5)), (slice(14, 19), slice(3, 7), slice(5, 9))
  )
  spacing = (0.8, 0.8, 2.5)
  got = lesionwise.lesionwise_scores(pred, truth, spacing)
  _check_against_reference(got, _reference(pred, truth, spacing))
  # Dice by hand: A and its prediction share 3 x 4 x 3 of 48 voxels each, B 5 x 4 x 3 of 80.
  assert got["lesion_dice"] == pytest.approx((2 * 36 / 96 + 2 * 60 / 160) / 2)


def test_false_positive_voxel():
  spacing = (0.7, 0.9, 3.0)
  truth = _box(SHAPE, LESION_A)
  pred = _box(SHAPE, LESION_A, (22, 10, 8))
  got = lesionwise.lesionwise_scores(pred, truth, spacing)
  assert got["lesion_dice"] == 0.5
  assert got["lesion_hd95"] == PENALTY / 2
  assert (got["lesion_tp"], got["lesion_fp"], got["lesion_fn"]) == (1, 1, 0)
  assert got["lesion_precision"] == 0.5 and got["lesion_recall"] == 1.0
  assert got["lesion_f1"] == pytest.approx(2 / 3)
  assert got["fp_volume_ml"] == pytest.approx(0.7 * 0.9 * 3.0 / 1000)
  assert got["fn_volume_ml"] == 0.0
  _check_against_reference(got, _reference(pred, truth, spacing))


def test_missed_lesion():
  spacing = (1.0, 1.0, 1.0)
  truth = _box(SHAPE, LESION_A, LESION_B)
  pred = _box(SHAPE, LESION_A)
  got = lesionwise.lesionwise_scores(pred, truth, spacing, hd95_penalty_mm=100.0)
  assert got["lesion_dice"] == 0.5 and got["lesion_hd95"] == 50.0
  assert (got["lesion_tp"], got["lesion_fp"], got["lesion_fn"]) == (1, 0, 1)
  assert got["fn_volume_ml"] == pytest.approx(80 / 1000)
  _check_against_reference(
    lesionwise.lesionwise_scores(pred, truth, spacing), _reference(pred, truth, spacing)
  )


def test_lesions_merge_after_dilation():
  # Two components with a 4-voxel gap: dilated 3 times they touch (one lesion), once they don't.
  part1 = (slice(2, 5), slice(2, 5), slice(2, 5))  # 27 voxels
  part2 = (slice(9, 11), slice(2, 5), slice(2, 5))  # 18 voxels
  truth = _box(SHAPE, part1, part2)
  pred = _box(SHAPE, part1)
  spacing = (1.0, 1.0, 1.5)
  merged = lesionwise.lesionwise_scores(pred, truth, spacing, dilation_iterations=3)
  assert merged["num_gt_components"] == 2 and merged["num_gt_lesions"] == 1
  assert merged["lesion_dice"] == pytest.approx(2 * 27 / (45 + 27))
  assert (merged["lesion_tp"], merged["lesion_fn"]) == (1, 0)
  _check_against_reference(merged, _reference(pred, truth, spacing, dilation=3))
  apart = lesionwise.lesionwise_scores(pred, truth, spacing, dilation_iterations=1)
  assert apart["num_gt_lesions"] == 2 and apart["lesion_dice"] == 0.5
  assert (apart["lesion_tp"], apart["lesion_fn"]) == (1, 1)
  _check_against_reference(apart, _reference(pred, truth, spacing, dilation=1))
  # autoPET does not merge: the second part is a missed component in both cases.
  assert merged["fn_volume_ml"] == apart["fn_volume_ml"] == pytest.approx(18 * 1.5 / 1000)


def test_nearby_prediction_is_a_hit_with_dice_zero():
  # BraTS matches on the lesion's dilation: a voxel 3 away along axis 2 (2 mm per voxel) is a
  # hit with Dice 0 and HD95 6 mm (see test_robust_hausdorff_hand_values) at dilation 3, and
  # a false positive next to a missed lesion at dilation 1.
  truth = _box((3, 3, 8), (1, 1, 2))
  pred = _box((3, 3, 8), (1, 1, 5))
  spacing = (1.0, 1.0, 2.0)
  near = lesionwise.lesionwise_scores(pred, truth, spacing, dilation_iterations=3)
  assert (near["lesion_dice"], near["lesion_hd95"]) == (0.0, 6.0)
  assert (near["lesion_tp"], near["lesion_fp"], near["lesion_fn"]) == (1, 0, 0)
  far = lesionwise.lesionwise_scores(pred, truth, spacing, dilation_iterations=1)
  assert (far["lesion_dice"], far["lesion_hd95"]) == (0.0, PENALTY)
  assert (far["lesion_tp"], far["lesion_fp"], far["lesion_fn"]) == (0, 1, 1)
  # autoPET sees no overlap either way.
  assert near["fp_volume_ml"] == near["fn_volume_ml"] == pytest.approx(2.0 / 1000)
  for k, got in ((3, near), (1, far)):
    _check_against_reference(got, _reference(pred, truth, spacing, dilation=k))


def test_empty_and_empty():
  empty = np.zeros(SHAPE, bool)
  got = lesionwise.lesionwise_scores(empty, empty, (1.0, 1.0, 1.0))
  assert got["lesion_dice"] == 1.0 and got["lesion_hd95"] == 0.0
  assert (got["lesion_tp"], got["lesion_fp"], got["lesion_fn"]) == (0, 0, 0)
  assert all(math.isnan(got[k]) for k in ("lesion_precision", "lesion_recall", "lesion_f1"))
  assert got["fp_volume_ml"] == got["fn_volume_ml"] == 0.0
  assert got["num_gt_lesions"] == got["num_pred_components"] == 0


def test_empty_truth_with_predictions():
  spacing = (0.5, 0.5, 2.0)
  truth = np.zeros(SHAPE, bool)
  pred = _box(SHAPE, LESION_A, LESION_B)
  got = lesionwise.lesionwise_scores(pred, truth, spacing)
  assert got["lesion_dice"] == 0.0 and got["lesion_hd95"] == PENALTY
  assert (got["lesion_tp"], got["lesion_fp"], got["lesion_fn"]) == (0, 2, 0)
  assert got["lesion_precision"] == 0.0 and math.isnan(got["lesion_recall"])
  assert got["lesion_f1"] == 0.0
  assert got["fp_volume_ml"] == pytest.approx(128 * 0.5 / 1000)
  _check_against_reference(got, _reference(pred, truth, spacing))
  # And the reverse: nothing predicted, two lesions missed.
  rev = lesionwise.lesionwise_scores(truth, pred, spacing)
  assert (rev["lesion_dice"], rev["lesion_hd95"], rev["lesion_fn"]) == (0.0, PENALTY, 2)
  assert rev["lesion_precision"] != rev["lesion_precision"] and rev["lesion_recall"] == 0.0
  _check_against_reference(rev, _reference(truth, pred, spacing))


def test_anisotropic_spacing():
  truth = _box(SHAPE, LESION_A, LESION_B)
  pred = _box(
    SHAPE,
    (slice(2, 7), slice(1, 6), slice(3, 6)),
    (slice(15, 18), slice(3, 8), slice(4, 7)),
    (21, 0, 0),
  )
  for spacing in ((0.6, 0.6, 5.0), (3.0, 0.4, 1.2)):
    got = lesionwise.lesionwise_scores(pred, truth, spacing)
    _check_against_reference(got, _reference(pred, truth, spacing))
  # Spacing changes HD95 but not Dice or the counts.
  a = lesionwise.lesionwise_scores(pred, truth, (0.6, 0.6, 5.0))
  b = lesionwise.lesionwise_scores(pred, truth, (3.0, 0.4, 1.2))
  assert a["lesion_dice"] == b["lesion_dice"] and a["lesion_hd95"] != b["lesion_hd95"]


def test_minimum_lesion_volume():
  # A 1-voxel lesion (2 mm^3) under a 5 mm^3 threshold is not scored, and the prediction that
  # touches it is not a false positive; missed, it is not a false negative either.
  spacing = (1.0, 1.0, 2.0)
  small = (15, 8, 2)
  truth = _box(SHAPE, LESION_A, small)
  pred = _box(SHAPE, LESION_A, (15, 8, 3))
  got = lesionwise.lesionwise_scores(pred, truth, spacing, min_lesion_volume_mm3=5.0)
  assert (got["lesion_dice"], got["lesion_tp"], got["lesion_fp"], got["lesion_fn"]) == (
    1.0,
    1,
    0,
    0,
  )
  _check_against_reference(got, _reference(pred, truth, spacing, min_volume=5.0))
  missed = lesionwise.lesionwise_scores(
    _box(SHAPE, LESION_A), truth, spacing, min_lesion_volume_mm3=5.0
  )
  assert (missed["lesion_dice"], missed["lesion_fn"]) == (1.0, 0)
  # Only a small lesion and no false positive: the empty-case rule.
  only_small = lesionwise.lesionwise_scores(
    np.zeros(SHAPE, bool), _box(SHAPE, small), spacing, min_lesion_volume_mm3=5.0
  )
  assert (only_small["lesion_dice"], only_small["lesion_hd95"]) == (1.0, 0.0)
  # At the threshold itself the lesion is still left out (BraTS drops volume <= threshold).
  at = lesionwise.lesionwise_scores(
    np.zeros(SHAPE, bool), _box(SHAPE, small), spacing, min_lesion_volume_mm3=2.0
  )
  assert at["lesion_fn"] == 0


# ----------------------------------------------------------------------------- random volumes


def _blobs(rng, shape, sigma, fraction):
  field = ndimage.gaussian_filter(rng.random(shape), sigma)
  return field > np.quantile(field, 1 - fraction)


def test_random_volumes_equal_reference():
  rng = np.random.default_rng(2025)
  for seed in range(24):
    shape = tuple(int(n) for n in rng.integers(8, 15, 3))
    truth = _blobs(rng, shape, rng.uniform(0.8, 1.6), rng.uniform(0.03, 0.15))
    kind = seed % 3
    if kind == 0:  # independent blobs
      pred = _blobs(rng, shape, rng.uniform(0.8, 1.6), rng.uniform(0.03, 0.15))
    elif kind == 1:  # the truth shifted, with scattered voxels
      pred = np.roll(truth, tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
      pred ^= rng.random(shape) < 0.01
    else:  # the truth eroded or dilated, with a few stray voxels
      op = ndimage.binary_erosion if rng.random() < 0.5 else ndimage.binary_dilation
      pred = op(truth) | (rng.random(shape) < 0.005)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, 3))
    dilation = int(rng.integers(0, 4))
    connectivity = (26, 18)[seed % 2]
    min_volume = float(rng.choice([0.0, 5.0, 20.0]))
    got = lesionwise.lesionwise_scores(
      pred,
      truth,
      spacing,
      dilation_iterations=dilation,
      connectivity=connectivity,
      min_lesion_volume_mm3=min_volume,
    )
    want = _reference(
      pred, truth, spacing, dilation=dilation, connectivity=connectivity, min_volume=min_volume
    )
    _check_against_reference(got, want)


# ----------------------------------------------------------------------------- aggregation, errors


def test_summarize_means_skip_nan_and_pools_counts():
  empty = np.zeros(SHAPE, bool)
  two = _box(SHAPE, LESION_A, LESION_B)
  rows = [
    lesionwise.lesionwise_scores(two, two, (1.0, 1.0, 1.0)),  # dice 1, tp 2
    lesionwise.lesionwise_scores(_box(SHAPE, LESION_A), two, (1.0, 1.0, 1.0)),  # 0.5, tp 1 fn 1
    lesionwise.lesionwise_scores(empty, empty, (1.0, 1.0, 1.0)),  # dice 1, precision NaN
  ]
  got = lesionwise.summarize(rows)
  assert got["num_volumes"] == 3
  assert got["mean_lesion_dice"] == pytest.approx(2.5 / 3)
  assert got["num_volumes_undefined_lesion_dice"] == 0
  assert got["mean_lesion_recall"] == pytest.approx(0.75)  # (1 + 0.5) / 2, the NaN skipped
  assert got["num_volumes_undefined_lesion_recall"] == 1
  assert (got["total_lesion_tp"], got["total_lesion_fp"], got["total_lesion_fn"]) == (3, 0, 1)
  assert got["pooled_lesion_recall"] == 0.75 and got["pooled_lesion_precision"] == 1.0
  assert got["total_fn_volume_ml"] == pytest.approx(0.08)
  assert math.isnan(lesionwise.summarize([rows[2]])["mean_lesion_precision"])


def test_bad_inputs_raise_one_line_errors():
  m = np.zeros((4, 4, 4), bool)
  cases = [
    ((m, np.zeros((4, 4, 5), bool), (1, 1, 1)), {}, "shape"),
    ((m[0], m[0], (1, 1, 1)), {}, "3D"),
    ((m, m, (1, 1)), {}, "spacing"),
    ((m, m, (1, 0, 1)), {}, "spacing"),
    ((np.full((4, 4, 4), 2, np.uint8), m, (1, 1, 1)), {}, "binary"),
    ((m, m, (1, 1, 1)), {"connectivity": 8}, "connectivity"),
    ((m, m, (1, 1, 1)), {"dilation_iterations": -1}, "dilation"),
  ]
  for args, kwargs, word in cases:
    with pytest.raises(ValueError, match=word) as err:
      lesionwise.lesionwise_scores(*args, **kwargs)
    assert "\n" not in str(err.value)
  # 0/1 integers are accepted as masks.
  assert lesionwise.lesionwise_scores(m.astype(np.uint8), m, (1, 1, 1))["lesion_dice"] == 1.0
