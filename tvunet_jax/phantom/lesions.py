"""COVID-19 findings of the phantom: ground-glass and consolidation blobs, pleural effusion.

This module owns where findings go and their soft fields: clusters of anisotropic 3D Gaussian
blobs placed in the lungs, favouring subpleural and dependent regions (`_plan_lesions`,
`_blob_fields`), and dependent pleural fluid with a meniscus (`_effusion`). Label values, as in
MedSeg's masks: 0 background, 1 ground-glass, 2 consolidation, 3 pleural effusion. Rendering
turns the fields into HU and labels (`render`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from tvunet_jax.phantom.anatomy import LEFT_LUNG, RIGHT_LUNG

# MedSeg label values.
BACKGROUND, GROUND_GLASS, CONSOLIDATION, PLEURAL_EFFUSION = 0, 1, 2, 3


@dataclasses.dataclass
class _Blob:
  centre: np.ndarray  # (3,) mm
  sigma: np.ndarray  # (3,) mm: in-plane major, minor, z
  angle: float
  amp: float
  cons: bool  # has a consolidated core


def _plan_lesions(
  rng: np.random.Generator,
  lung: np.ndarray,
  x_ax: np.ndarray,
  y_ax: np.ndarray,
  zs: np.ndarray,
  half_slab: float,
  px: float,
  slices: np.ndarray,
  n_clusters: int,
  p_cons: float,
) -> list[_Blob]:
  """Places clusters of blobs in the lungs, favouring subpleural and dependent regions."""
  blobs = []
  area = lung[slices].reshape(len(slices), -1).sum(1).astype(np.float64)
  if area.sum() == 0:
    return blobs
  for _ in range(n_clusters):
    k = int(slices[rng.choice(len(slices), p=area / area.sum())])
    m = lung[k]
    d_mm = ndimage.distance_transform_edt(m) * px
    yy = y_ax[:, None]
    post = np.clip((yy - y_ax[m.any(1)].min()) / max(np.ptp(y_ax[m.any(1)]), 1.0), 0, 1)
    wgt = np.where(m, np.exp(-d_mm / 12.0) * (0.6 + post), 0.0).ravel()
    idx = rng.choice(wgt.size, p=wgt / wgt.sum())
    cy, cx = y_ax[idx // m.shape[1]], x_ax[idx % m.shape[1]]
    cz = zs[k] + rng.uniform(-half_slab, half_slab)
    cons = bool(rng.random() < p_cons)
    for j in range(int(rng.integers(1, 5))):
      off = np.zeros(3) if j == 0 else rng.normal(0, [9.0, 9.0, 5.0])
      # Patches of 1-5 cm across (2 sigma 16-50 mm), the size of typical COVID-19 opacities.
      sx, sy = sorted(rng.uniform(8, 25, 2), reverse=True)
      blobs.append(
        _Blob(
          np.array([cx, cy, cz]) + off,
          np.array([sx, sy, rng.uniform(6, 15)]),
          float(rng.uniform(0, np.pi)),
          float(rng.uniform(0.8, 1.3)),
          cons,
        )
      )
  return blobs


def _blob_fields(blobs: list[_Blob], x_ax, y_ax, zs, px) -> tuple[np.ndarray, np.ndarray]:
  """Sums of anisotropic Gaussians: (ground-glass field, consolidation field), each (Z, H, W)."""
  nz, h, w = len(zs), len(y_ax), len(x_ax)
  g = np.zeros((nz, h, w), np.float32)
  c = np.zeros((nz, h, w), np.float32)
  for bl in blobs:
    ext = 3.0 * bl.sigma
    k0, k1 = np.searchsorted(zs, bl.centre[2] - ext[2]), np.searchsorted(zs, bl.centre[2] + ext[2])
    r0 = max(int((bl.centre[1] - ext[0] - y_ax[0]) / px), 0)
    r1 = min(int((bl.centre[1] + ext[0] - y_ax[0]) / px) + 2, h)
    c0 = max(int((bl.centre[0] - ext[0] - x_ax[0]) / px), 0)
    c1 = min(int((bl.centre[0] + ext[0] - x_ax[0]) / px) + 2, w)
    if k0 >= k1 or r0 >= r1 or c0 >= c1:
      continue
    dz = (zs[k0:k1] - bl.centre[2])[:, None, None]
    dy = (y_ax[r0:r1] - bl.centre[1])[None, :, None]
    dx = (x_ax[c0:c1] - bl.centre[0])[None, None, :]
    co, si = float(np.cos(bl.angle)), float(np.sin(bl.angle))
    sx, sy, sz = (float(v) for v in bl.sigma)
    q = (
      ((dx * co + dy * si) / sx) ** 2 + ((-dx * si + dy * co) / sy) ** 2 + (dz / sz) ** 2
    ).astype(np.float32)
    g[k0:k1, r0:r1, c0:c1] += bl.amp * np.exp(-0.5 * q)
    if bl.cons:
      c[k0:k1, r0:r1, c0:c1] += bl.amp * np.exp(-0.5 * q / 0.65**2)
  return g, c


def _effusion(
  rng: np.random.Generator,
  side: np.ndarray,
  y_ax: np.ndarray,
  zs: np.ndarray,
  px: float,
  z_top: float,
) -> np.ndarray:
  """Dependent pleural fluid (Z, H, W) bool below height z_top, in the lung field.

  Supine patient: fluid layers at the back of the pleural space, deepest at the bases, with a
  meniscus that climbs along the chest wall.
  """
  eff = np.zeros(side.shape, bool)
  depth0 = rng.uniform(12, 30)
  which = [RIGHT_LUNG, LEFT_LUNG] if rng.random() < 0.4 else [int(rng.integers(1, 3))]
  yy = y_ax[:, None]
  for k, z in enumerate(zs):
    if z >= z_top:
      continue
    depth = depth0 * min(1.0, (z_top - z) / 40.0) ** 0.6
    for s in which:
      m = side[k] == s
      if not m.any():
        continue
      y_post = float(y_ax[m.any(1)].max())
      d_wall = ndimage.distance_transform_edt(m) * px
      eff[k] |= m & ((yy - (y_post - depth)) + 0.6 * depth * np.exp(-d_wall / 8.0) > 0)
  return eff
