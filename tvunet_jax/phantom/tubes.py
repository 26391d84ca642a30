"""Straight cylinders: the phantom's vessels, airways, ribs and great vessels, grown and drawn.

This module owns the one primitive that every tubular structure is made of (`_Tubes`, in mm), the
space-filling trees that grow pulmonary vessels from their roots (`_territory_trees`) and the
slab-averaged, anti-aliased drawing of cylinders into slices (`_draw_tubes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class _Tubes:
  """Straight cylinders: start points a (N, 3), end points b (N, 3), radii r (N,), in mm."""

  a: np.ndarray
  b: np.ndarray
  r: np.ndarray

  @classmethod
  def of(cls, rows: Sequence[tuple[Sequence[float], Sequence[float], float]]) -> _Tubes:
    a = np.array([row[0] for row in rows], np.float64).reshape(-1, 3)
    b = np.array([row[1] for row in rows], np.float64).reshape(-1, 3)
    return cls(a, b, np.array([row[2] for row in rows], np.float64))


def _territory_trees(
  rng: np.random.Generator, pts: np.ndarray, tree: np.ndarray, roots: np.ndarray, r_leaf: float
) -> tuple[_Tubes, np.ndarray, np.ndarray]:
  """Space-filling vessel trees by recursive territory bisection.

  Tree t starts at roots[t] (T, 3) and owns the points pts[tree == t] (N, 3). Each node runs
  from its parent's branch point part way to its points' centroid and splits them in two along
  their widest axis (at a random quantile), until single points remain. Radii follow Murray's
  law, r = r_leaf * n**(1/3) for n points downstream. All trees grow together, one level per
  vectorized step. Returns the tubes, each tube's generation and each tube's tree.
  """
  group = tree.astype(np.int64)
  start = roots.astype(np.float64)  # (G, 3) start point of each group's segment
  tid = np.arange(len(roots))
  a_all, b_all, r_all, g_all, t_all = [], [], [], [], []
  gen = 0
  while len(group):
    ng = len(start)
    n = np.bincount(group, minlength=ng).astype(np.float64)
    cen = np.stack([np.bincount(group, pts[:, i], ng) for i in range(3)], 1) / n[:, None]
    var = np.stack([np.bincount(group, pts[:, i] ** 2, ng) for i in range(3)], 1) / n[:, None]
    var -= cen**2
    frac = rng.uniform(0.45, 0.7, ng)[:, None]
    end = np.where(n[:, None] > 1, start + frac * (cen - start), cen)
    # A little wobble of the branch points so that branches are not perfectly straight spokes;
    # leaves end exactly on their point.
    wobble = rng.normal(0, 0.06, (ng, 3)) * np.linalg.norm(end - start, axis=1, keepdims=True)
    end += np.where(n[:, None] > 1, wobble, 0.0)
    a_all.append(start), b_all.append(end), r_all.append(r_leaf * n ** (1 / 3))
    g_all.append(np.full(ng, gen)), t_all.append(tid)
    # Split every group with more than one point: widest axis, random quantile.
    axis = np.argmax(var * rng.uniform(0.7, 1.3, (ng, 3)), axis=1)
    proj = pts[np.arange(len(pts)), axis[group]]
    # Sort by group, then by the projection inside each group (one float key: group + [0, 1)).
    span = np.ptp(proj) + 1.0
    order = np.argsort(group + (proj - proj.min()) / span, kind="stable")
    group, pts = group[order], pts[order]
    rank = np.arange(len(group)) - np.searchsorted(group, np.arange(ng))[group]
    cut = np.maximum(1, np.round(n * rng.uniform(0.35, 0.65, ng))).astype(np.int64)
    child = 2 * group + (rank >= cut[group])  # non-decreasing, as group is sorted
    keep = n[group] > 1
    pts, child = pts[keep], child[keep]
    if not len(child):
      break
    new_group = np.concatenate([[True], child[1:] != child[:-1]])
    uniq = child[new_group]
    group = np.cumsum(new_group) - 1
    start, tid = end[uniq // 2], tid[uniq // 2]
    gen += 1
  tubes = _Tubes(np.concatenate(a_all), np.concatenate(b_all), np.concatenate(r_all))
  return tubes, np.concatenate(g_all), np.concatenate(t_all)


def _draw_tubes(
  tubes: _Tubes, x_ax: np.ndarray, y_ax: np.ndarray, zs: np.ndarray, half_slab: float, px: float
) -> np.ndarray:
  """Slab-averaged, anti-aliased coverage of straight cylinders.

  Args:
    tubes: N cylinders in mm.
    x_ax, y_ax: (W,), (H,) pixel-centre coordinates, mm, evenly spaced by `px`.
    zs: (Z,) increasing slice centres, mm; each slice integrates a slab of 2 * half_slab mm.

  Returns:
    (Z, H, W) float32 in [0, 1]. The part of a cylinder's axis within a slab is projected into
    the plane and drawn with its radius (anti-aliased over one pixel); the coverage is scaled by
    the fraction of the slab the cylinder fills vertically (partial volume), so thin horizontal
    vessels in thick slices look faint and oblique ones look like short streaks. Overlapping
    cylinders take the maximum.
  """
  nz, h, w = len(zs), len(y_ax), len(x_ax)
  cov = np.zeros((nz, h, w), np.float32)
  a, b, r = tubes.a, tubes.b, tubes.r
  d = b - a
  length = np.linalg.norm(d, axis=1)
  zlo = np.minimum(a[:, 2], b[:, 2]) - r
  zhi = np.maximum(a[:, 2], b[:, 2]) + r
  k0 = np.searchsorted(zs + half_slab, zlo, side="left")
  k1 = np.searchsorted(zs - half_slab, zhi, side="right")
  count = np.where((length > 1e-6) & (r >= 0.2 * px), np.maximum(k1 - k0, 0), 0)
  if count.sum() == 0:
    return cov
  # One row per (tube, slice) pair.
  i = np.repeat(np.arange(len(r)), count)
  k = k0[i] + np.arange(len(i)) - np.repeat(np.cumsum(count) - count, count)
  a, d, r, zc = a[i], d[i], r[i], zs[k]
  horiz = np.hypot(d[:, 0], d[:, 1]) / length[i]
  r_vert = r / np.maximum(horiz, 0.05)  # half height of the cylinder's vertical chord
  flat = np.abs(d[:, 2]) < 1e-9
  dz = np.where(flat, 1.0, d[:, 2])
  ta = (zc - half_slab - r - a[:, 2]) / dz
  tb = (zc + half_slab + r - a[:, 2]) / dz
  t0 = np.where(flat, 0.0, np.maximum(0.0, np.minimum(ta, tb)))
  t1 = np.where(flat, 1.0, np.minimum(1.0, np.maximum(ta, tb)))
  zm = a[:, 2] + 0.5 * (t0 + t1) * d[:, 2]
  overlap = np.minimum(zm + r_vert, zc + half_slab) - np.maximum(zm - r_vert, zc - half_slab)
  frac = np.minimum(1.0, np.maximum(overlap, 0.0) / (2 * half_slab))
  p0 = a[:, :2] + t0[:, None] * d[:, :2]
  e = (t1 - t0)[:, None] * d[:, :2]
  lo = (np.minimum(p0, p0 + e) - (r + 1.5 * px)[:, None] - [x_ax[0], y_ax[0]]) / px
  hi = (np.maximum(p0, p0 + e) + (r + 1.5 * px)[:, None] - [x_ax[0], y_ax[0]]) / px
  c0 = np.maximum(np.floor(lo[:, 0]), 0).astype(np.int64)
  r0 = np.maximum(np.floor(lo[:, 1]), 0).astype(np.int64)
  c1 = np.minimum(np.ceil(hi[:, 0]) + 1, w).astype(np.int64)
  r1 = np.minimum(np.ceil(hi[:, 1]) + 1, h).astype(np.int64)
  ok = (t0 <= t1) & (frac > 0) & (c1 > c0) & (r1 > r0)
  span = np.maximum(c1 - c0, r1 - r0)
  flat_cov = cov.reshape(-1)
  # Pairs are drawn in batches of equal (power-of-two) window size.
  stencil = 2 ** np.ceil(np.log2(np.maximum(span, 1))).astype(np.int64)
  for size in np.unique(stencil[ok]):
    sel = np.nonzero(ok & (stencil == size))[0]
    for chunk in np.array_split(sel, max(1, len(sel) * size * size // 2_000_000)):
      off = np.arange(size)
      rows = r0[chunk, None, None] + off[None, :, None]  # (P, S, 1)
      cols = c0[chunk, None, None] + off[None, None, :]  # (P, 1, S)
      valid = (rows < r1[chunk, None, None]) & (cols < c1[chunk, None, None])
      rows_c, cols_c = np.minimum(rows, h - 1), np.minimum(cols, w - 1)
      gx = (x_ax[cols_c] - p0[chunk, 0, None, None]).astype(np.float32)
      gy = (y_ax[rows_c] - p0[chunk, 1, None, None]).astype(np.float32)
      ex = e[chunk, 0, None, None].astype(np.float32)
      ey = e[chunk, 1, None, None].astype(np.float32)
      ee = np.maximum(ex * ex + ey * ey, 1e-12)
      t = np.clip((gx * ex + gy * ey) / ee, 0, 1)
      dist = np.sqrt((gx - t * ex) ** 2 + (gy - t * ey) ** 2)
      c = (
        np.clip((r[chunk, None, None] - dist) / px + 0.5, 0, 1) * frac[chunk, None, None]
      ).astype(np.float32)
      idx = (k[chunk, None, None] * h + rows_c) * w + cols_c
      valid &= c > 0
      np.maximum.at(flat_cov, idx[valid], c[valid])
  return cov
