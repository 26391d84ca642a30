"""Lesion-wise metrics of one 3D volume: BraTS 2023 lesion-wise Dice / HD95, autoPET FP / FN volume.

This module owns every score computed on 3D connected components of a binary prediction against
a binary ground truth: which predicted component belongs to which true lesion, the per-lesion
Dice and HD95, lesion detection counts and the false-positive / false-negative lesion volumes.
It is pure numpy / scipy and knows no files, devices or model.

BraTS 2023 lesion-wise Dice and HD95 (rachitsaluja/BraTS-2023-Metrics, `metrics.py`), followed
step by step:
  1. Ground-truth lesions: the truth mask is dilated `dilation_iterations` times with the
     18-neighbourhood (`generate_binary_structure(3, 2)`), the dilated mask is labelled
     (`connectivity`, 26 in BraTS), and every true voxel takes the label of the dilated component
     it lies in. Lesions closer than about twice the dilation therefore merge into one lesion; a
     lesion is made of true voxels only (the dilation defines identity, never extent).
  2. Predicted components: the prediction labelled with the same connectivity.
  3. Matching: a predicted component is matched to a lesion when it overlaps the lesion's own
     dilation (`dilation_iterations` times, same structure), so a prediction a few voxels away
     is a hit, with Dice 0 for that lesion. A component may match several lesions.
  4. Per lesion: Dice and HD95 between the lesion and the union of its matched components (whole
     components, also where they reach beyond the lesion). A missed lesion has Dice 0 and HD95
     infinity, replaced by the penalty (`hd95_penalty_mm`, 374 mm in BraTS, the diagonal of its
     240 x 240 x 155 mm volume). Finite HD95s are not capped.
  5. False positives: predicted components matched to no lesion.
  6. Minimum volume: lesions of volume <= `min_lesion_volume_mm3` are left out of the sums and of
     the TP / FN counts (their matched predictions are still not false positives). BraTS sets it
     per challenge (50 mm^3 for gliomas, 2 mm^3 for metastases); no value exists for COVID-19 CT,
     so the default here is 0 (every lesion counts).
  7. Scores: lesion_dice = sum(lesion Dice) / (lesions + FP); lesion_hd95 = (sum(lesion HD95) +
     FP * penalty) / (lesions + FP). When that denominator is 0 (both masks empty, or only
     lesions below the minimum volume and no FP), Dice is 1 and HD95 is 0, as BraTS sets them.
  The BraTS defaults (gliomas) are dilation 3, connectivity 26; metastases use dilation 1.

HD95 (`robust_hausdorff`) is the one BraTS uses: DeepMind's `surface_distance`
(`compute_surface_distances` + `compute_robust_hausdorff(..., 95)`), reimplemented and tested
against it. Surface elements sit on the voxel-corner grid: a corner whose 2x2x2 neighbourhood is
neither all in nor all out is a surface element, weighted by the area of the marching-cubes
surface inside that neighbourhood (scaled by the spacing). Distances are Euclidean in mm to the
nearest surface element of the other mask; the 95th percentile is the first distance at which
the area-weighted cumulative share reaches 0.95, and HD95 is the larger of the two directions
(infinite when a mask is empty). This is not medpy's `hd95` (voxel-face surfaces, unweighted,
interpolated percentile). The area table is built here from first principles (triangles at edge
midpoints; ambiguous faces separate the minority corners; each polygon triangulated to its
largest area), which reproduces surface_distance's table for every code and spacing (tested).

autoPET false-positive / false-negative volume (lab-midas/autoPET, `val_script.py`): components
with 18-connectivity (`volume_connectivity`); FP volume = total volume of predicted components
sharing no voxel with the truth, FN volume = total volume of true components sharing no voxel
with the prediction; mL = voxels * spacing product / 1000. No dilation, no merging.

Detection (same matching as BraTS): lesion_tp = lesions with a matched component, lesion_fn =
lesions without, lesion_fp = unmatched predicted components; precision = tp / (tp + fp),
recall = tp / (tp + fn), F1 = 2 tp / (2 tp + fp + fn), NaN where the denominator is 0.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

BRATS_DILATION_ITERATIONS = 3
BRATS_CONNECTIVITY = 26
BRATS_HD95_PENALTY_MM = 374.0
AUTOPET_CONNECTIVITY = 18

# Keys of `lesionwise_scores` that are ratios (averaged over volumes) and counts (summed).
RATIO_KEYS = (
  "lesion_dice",
  "lesion_hd95",
  "lesion_precision",
  "lesion_recall",
  "lesion_f1",
)
COUNT_KEYS = (
  "lesion_tp",
  "lesion_fp",
  "lesion_fn",
  "fp_volume_ml",
  "fn_volume_ml",
  "num_gt_components",
  "num_gt_lesions",
  "num_pred_components",
)

# Bit of each corner (a, b, c) of a 2x2x2 neighbourhood, as surface_distance encodes it: corner
# index 4a + 2b + c has weight 2 ** (7 - index). `ndimage.correlate` with this kernel gives, at
# grid point (i, j, k), the code of the voxels (i - 1 .. i, j - 1 .. j, k - 1 .. k).
_CODE_KERNEL = (1 << (7 - np.arange(8))).reshape(2, 2, 2)
_CORNERS = tuple(itertools.product((0, 1), repeat=3))


def _structure(connectivity: int) -> np.ndarray:
  ranks = {6: 1, 18: 2, 26: 3}
  if connectivity not in ranks:
    raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
  return ndimage.generate_binary_structure(3, ranks[connectivity])


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
  # scipy reads iterations=0 as "until nothing changes"; here 0 means no dilation.
  if iterations == 0:
    return mask
  return ndimage.binary_dilation(mask, _structure(18), iterations=iterations)


# ------------------------------------------------------------------ surface elements and HD95


def _triangulations(poly: tuple) -> Iterable[list[tuple]]:
  """All triangulations of a polygon given as a vertex sequence."""
  if len(poly) == 3:
    yield [poly]
    return
  # The triangle on the edge (first, last) has some apex k; both sides recurse.
  for k in range(1, len(poly) - 1):
    left = list(_triangulations(poly[: k + 1])) if k >= 2 else [[]]
    right = list(_triangulations(poly[k:])) if len(poly) - k >= 3 else [[]]
    for a, b in itertools.product(left, right):
      yield [*a, *b, (poly[0], poly[k], poly[-1])]


def _code_polygons(code: int) -> list[tuple]:
  """Marching-cubes polygons of one code; a vertex is a cube edge (a pair of corners), crossed
  at its midpoint."""
  inside = {c for i, c in enumerate(_CORNERS) if code & (1 << (7 - i))}
  # The surface is the same for a code and its complement; only ambiguous faces (two diagonal
  # corners on each side) need a rule, and surface_distance's table separates the minority.
  minority = inside if len(inside) <= 4 else set(_CORNERS) - inside
  segments = []
  for axis, side in itertools.product(range(3), (0, 1)):
    u, v = (a for a in range(3) if a != axis)
    ring = []
    for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):
      c = [0, 0, 0]
      c[axis], c[u], c[v] = side, du, dv
      ring.append(tuple(c))
    edges = [tuple(sorted((ring[i], ring[(i + 1) % 4]))) for i in range(4)]
    cut = [e for e in edges if (e[0] in minority) != (e[1] in minority)]
    if len(cut) == 2:
      segments.append(tuple(cut))
    elif len(cut) == 4:
      segments += [tuple(e for e in edges if c in e) for c in ring if c in minority]
  neighbours: dict[tuple, list[tuple]] = {}
  for a, b in segments:
    neighbours.setdefault(a, []).append(b)
    neighbours.setdefault(b, []).append(a)
  polygons, seen = [], set()
  for start in neighbours:  # every cut edge lies on two faces: the segments form cycles
    if start in seen:
      continue
    cycle, seen_here = [start], {start}
    while nxt := [e for e in neighbours[cycle[-1]] if e not in seen_here]:
      cycle.append(nxt[0])
      seen_here.add(nxt[0])
    seen |= seen_here
    polygons.append(tuple(cycle))
  return polygons


@functools.cache
def _code_triangles() -> tuple[np.ndarray, np.ndarray]:
  """Triangle area vectors (T, 3) float64 (unit voxel) and their codes (T,) int64."""
  normals, codes = [], []
  for code in range(1, 255):
    for poly in _code_polygons(code):
      pts = tuple(np.mean(np.array(edge, np.float64), axis=0) for edge in poly)
      index = {edge: p for edge, p in zip(poly, pts)}
      best, best_area = None, -1.0
      for tri in _triangulations(poly):
        vecs = [0.5 * np.cross(index[b] - index[a], index[c] - index[a]) for a, b, c in tri]
        area = sum(float(np.linalg.norm(n)) for n in vecs)
        if area > best_area + 1e-12:  # non-planar polygons: the table uses the largest area
          best, best_area = vecs, area
      normals += best
      codes += [code] * len(best)
  return np.array(normals), np.array(codes, np.int64)


@functools.lru_cache(maxsize=64)
def _surfel_areas(spacing_mm: tuple[float, float, float]) -> np.ndarray:
  """Surface area in mm^2 inside a 2x2x2 neighbourhood, per code: (256,) float64."""
  normals, codes = _code_triangles()
  s0, s1, s2 = spacing_mm
  areas = np.zeros(256)
  for n, code in zip(normals, codes):
    # Each area-vector component scales with the product of the other two voxel sizes.
    scaled = np.array([n[0] * s1 * s2, n[1] * s0 * s2, n[2] * s0 * s1])
    areas[code] += np.linalg.norm(scaled)
  return areas


def _percentile_distance(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
  if distances.size == 0:
    return math.inf
  order = np.lexsort((areas, distances))  # by distance, then area, as surface_distance sorts
  distances, areas = distances[order], areas[order]
  share = np.cumsum(areas) / np.sum(areas)
  idx = int(np.searchsorted(share, percent / 100.0))
  return float(distances[min(idx, distances.size - 1)])


def robust_hausdorff(
  mask_a: np.ndarray, mask_b: np.ndarray, spacing_mm: Sequence[float], percent: float = 95.0
) -> float:
  """Surface-based percentile Hausdorff distance in mm, as surface_distance computes it.

  Args:
    mask_a, mask_b: (X, Y, Z) bool masks of the same shape.
    spacing_mm: the 3 voxel sizes in mm, in the axis order of the masks.
    percent: the percentile, 95 for HD95.

  Returns:
    max of the two directed area-weighted percentile distances; inf if either mask is empty.
  """
  a, b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
  spacing = tuple(float(s) for s in spacing_mm)
  if not (a.any() and b.any()):
    return math.inf
  # Only the bounding box of both masks matters: every surface element lies in it.
  where = np.nonzero(a | b)
  box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
  table = _surfel_areas(spacing)
  codes, borders, dist = [], [], []
  for m in (a, b):
    # One empty plane after the box: the corner grid has one point more than voxels per axis.
    crop = np.zeros([s.stop - s.start + 1 for s in box], np.uint8)
    crop[:-1, :-1, :-1] = m[box]
    code = ndimage.correlate(crop, _CODE_KERNEL, mode="constant", cval=0)
    border = (code != 0) & (code != 255)
    codes.append(code)
    borders.append(border)
    dist.append(ndimage.distance_transform_edt(~border, sampling=spacing))
  a_to_b = _percentile_distance(dist[1][borders[0]], table[codes[0][borders[0]]], percent)
  b_to_a = _percentile_distance(dist[0][borders[1]], table[codes[1][borders[1]]], percent)
  return max(a_to_b, b_to_a)


# ------------------------------------------------------------------ lesion-wise scores


def _binary(name: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 3:
    raise ValueError(f"lesionwise_scores: {name} must be a 3D (X, Y, Z) mask, got shape {x.shape}")
  if x.dtype != bool:
    if not np.isin(x, (0, 1)).all():
      raise ValueError(
        f"lesionwise_scores: {name} must be binary (bool or 0/1), got values outside {{0, 1}}"
      )
    x = x.astype(bool)
  return x


def _ratio(num: float, den: float) -> float:
  return num / den if den else math.nan


def _grown(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
  return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _unmatched_volume(labels: np.ndarray, n: int, other: np.ndarray) -> int:
  """Voxels of the labelled components that share no voxel with `other`."""
  sizes = np.bincount(labels.ravel(), minlength=n + 1)
  touching = np.unique(labels[other])
  return int(sizes[1:].sum() - sizes[touching[touching > 0]].sum())


def lesionwise_scores(
  pred: np.ndarray,
  truth: np.ndarray,
  spacing_mm: Sequence[float],
  *,
  dilation_iterations: int = BRATS_DILATION_ITERATIONS,
  connectivity: int = BRATS_CONNECTIVITY,
  hd95_penalty_mm: float = BRATS_HD95_PENALTY_MM,
  min_lesion_volume_mm3: float = 0.0,
  volume_connectivity: int = AUTOPET_CONNECTIVITY,
) -> dict[str, float | int]:
  """BraTS 2023 lesion-wise Dice / HD95, detection counts and autoPET FP / FN volume of a volume.

  Args:
    pred, truth: (X, Y, Z) bool masks (or 0/1 integers) of the same shape.
    spacing_mm: the 3 voxel sizes in mm, in the axis order of the masks.
    dilation_iterations: BraTS dilation factor (lesion merging and matching), >= 0.
    connectivity: 6, 18 or 26, for the BraTS components (truth, dilated truth, prediction).
    hd95_penalty_mm: HD95 of a missed lesion and of a false-positive component.
    min_lesion_volume_mm3: lesions of at most this volume are not scored (see module doc).
    volume_connectivity: 6, 18 or 26, for the autoPET components (18 in autoPET).

  Returns:
    float: lesion_dice, lesion_hd95 (mm), lesion_precision, lesion_recall, lesion_f1 (NaN where
    undefined), fp_volume_ml, fn_volume_ml; int: lesion_tp, lesion_fp, lesion_fn,
    num_gt_components (before merging), num_gt_lesions (after merging, every volume),
    num_pred_components.
  """
  pred, truth = _binary("pred", pred), _binary("truth", truth)
  if pred.shape != truth.shape:
    raise ValueError(f"lesionwise_scores: pred shape {pred.shape} != truth shape {truth.shape}")
  spacing = tuple(float(s) for s in spacing_mm)
  if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"lesionwise_scores: spacing_mm must be 3 positive sizes, got {spacing_mm!r}")
  if int(dilation_iterations) != dilation_iterations or dilation_iterations < 0:
    raise ValueError(
      f"lesionwise_scores: dilation_iterations must be an integer >= 0, got {dilation_iterations!r}"
    )
  k = int(dilation_iterations)
  structure = _structure(connectivity)
  voxel_mm3 = spacing[0] * spacing[1] * spacing[2]

  # 1. Lesions: true voxels labelled by the dilated component they lie in. With connectivity 6
  # a dilated component may hold no true voxel; only those that do are lesions.
  _, num_gt_components = ndimage.label(truth, structure)
  dilated_labels, _ = ndimage.label(_dilate(truth, k), structure)
  ids = np.unique(dilated_labels[truth])
  relabel = np.zeros(dilated_labels.max() + 1, np.int64)
  relabel[ids] = np.arange(1, ids.size + 1)
  lesions = np.where(truth, relabel[dilated_labels], 0)
  num_lesions = int(ids.size)

  # 2. Predicted components.
  pred_labels, num_pred = ndimage.label(pred, structure)
  pred_sizes = np.bincount(pred_labels.ravel(), minlength=num_pred + 1)
  pred_boxes = ndimage.find_objects(pred_labels)

  # 3-4. Per lesion, inside its box grown by the dilation (the dilation cannot reach further).
  matched_any = np.zeros(num_pred + 1, bool)
  dice_sum = hd95_sum = 0.0
  tp = fn = 0
  for i, box in enumerate(ndimage.find_objects(lesions), start=1):
    grown = _grown(box, k, truth.shape)
    lesion = lesions[grown] == i
    matched = np.unique(pred_labels[grown][_dilate(lesion, k)])
    matched = matched[matched > 0]
    matched_any[matched] = True
    size = int(lesion.sum())
    if matched.size:
      inter = int((lesion & np.isin(pred_labels[grown], matched)).sum())
      dice = 2.0 * inter / (size + int(pred_sizes[matched].sum()))
      union = [box] + [pred_boxes[j - 1] for j in matched]
      hbox = tuple(
        slice(min(b[a].start for b in union), max(b[a].stop for b in union)) for a in range(3)
      )
      hd95 = robust_hausdorff(lesions[hbox] == i, np.isin(pred_labels[hbox], matched), spacing)
    else:
      dice, hd95 = 0.0, hd95_penalty_mm
    # Same product order as BraTS (voxels * sx * sy * sz) for the threshold comparison.
    if size * spacing[0] * spacing[1] * spacing[2] <= min_lesion_volume_mm3:
      continue
    dice_sum += dice
    hd95_sum += hd95
    tp, fn = tp + bool(matched.size), fn + (not matched.size)

  # 5-7. False positives and the lesion-wise scores.
  fp = int(num_pred - matched_any[1:].sum())
  den = tp + fn + fp
  lesion_dice = dice_sum / den if den else 1.0
  lesion_hd95 = (hd95_sum + fp * hd95_penalty_mm) / den if den else 0.0

  # autoPET volumes: plain overlap of components with the other mask.
  vstructure = _structure(volume_connectivity)
  pred_v, n_pred_v = ndimage.label(pred, vstructure)
  truth_v, n_truth_v = ndimage.label(truth, vstructure)
  voxel_ml = voxel_mm3 / 1000.0
  return {
    "lesion_dice": float(lesion_dice),
    "lesion_hd95": float(lesion_hd95),
    "lesion_tp": tp,
    "lesion_fp": fp,
    "lesion_fn": fn,
    "lesion_precision": _ratio(tp, tp + fp),
    "lesion_recall": _ratio(tp, tp + fn),
    "lesion_f1": _ratio(2 * tp, 2 * tp + fp + fn),
    "fp_volume_ml": _unmatched_volume(pred_v, n_pred_v, truth) * voxel_ml,
    "fn_volume_ml": _unmatched_volume(truth_v, n_truth_v, pred) * voxel_ml,
    "num_gt_components": int(num_gt_components),
    "num_gt_lesions": num_lesions,
    "num_pred_components": int(num_pred),
  }


def summarize(per_volume: Iterable[Mapping[str, float | int]]) -> dict[str, float | int]:
  """Aggregate per-volume `lesionwise_scores` results over volumes.

  Args:
    per_volume: one `lesionwise_scores` result per volume.

  Returns:
    `mean_<key>` for every ratio key (NaN entries skipped; NaN when none is defined) with
    `num_volumes_undefined_<key>` beside it; `total_<key>` for every count and volume key;
    `pooled_lesion_precision`, `pooled_lesion_recall`, `pooled_lesion_f1` from the summed counts;
    `num_volumes`.
  """
  rows = list(per_volume)
  out: dict[str, float | int] = {"num_volumes": len(rows)}
  for key in RATIO_KEYS:
    vals = np.array([r[key] for r in rows], np.float64)
    defined = ~np.isnan(vals)
    out[f"mean_{key}"] = float(vals[defined].mean()) if defined.any() else math.nan
    out[f"num_volumes_undefined_{key}"] = int((~defined).sum())
  for key in COUNT_KEYS:
    total = sum(r[key] for r in rows)
    out[f"total_{key}"] = float(total) if key.endswith("_ml") else int(total)
  tp, fp, fn = (out[f"total_lesion_{c}"] for c in ("tp", "fp", "fn"))
  out["pooled_lesion_precision"] = _ratio(tp, tp + fp)
  out["pooled_lesion_recall"] = _ratio(tp, tp + fn)
  out["pooled_lesion_f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
  return out
