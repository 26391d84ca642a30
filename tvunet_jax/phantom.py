"""Synthetic chest-CT phantom written in the MedSeg "COVID-19 CT segmentation" file layout.

This module owns the project's embedded default dataset. No real CT can be shipped, so it simulates
patients (body wall, ribs, spine, mediastinum, heart, great vessels, two lungs with branching
vessels and airways, diaphragm domes) in millimetres, adds COVID-19 findings (ground-glass
opacities, consolidation, pleural effusion) as 3D blobs, renders slices in Hounsfield units with a
scanner blur, slab partial volume and noise, and writes them exactly as MedSeg ships its data:

  tr_im.nii.gz, tr_mask.nii.gz, tr_lungmasks_updated.nii.gz   (H, W, 100): one patient per slice
  rp_im/{1..9}.nii.gz, rp_msk/{1..9}.nii.gz, rp_lung_msk/{1..9}.nii.gz   whole volumes
  phantom.json                                                 generator parameters (provenance)

Masks: 0 background, 1 ground-glass, 2 consolidation, 3 pleural effusion. Lung masks: 1 right lung,
2 left lung. The lung mask is the lung field as the pleura bounds it, so it contains vessels,
lesions and the pleural effusion (label 3 sits in the space the lung occupied); labels 1-3 are
always inside it.

Coordinates: arrays returned by the generators are in display orientation (rows, cols[, Z]): row 0
anterior, column 0 the patient's right, slice 0 the most caudal. Files hold `to_storage(display)`
with an affine whose axis codes are ('L', 'A', 'S') and whose zooms are (pixel, pixel, slice) mm.

  python -m tvunet_jax.phantom --out data/medseg_phantom [--seed 0] [--tr-slices 100] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from tvunet_jax import nifti_io

# The storage rotation lives in nifti_io (every reader goes through it); re-exported here so the
# writer and its readers cannot disagree. Contract, for (X, Y, Z) stored / (rows, cols, Z) display:
#   display = np.rot90(stored, k=STORAGE_ROT90_K, axes=(0, 1))
STORAGE_ROT90_K = nifti_io.STORAGE_ROT90_K
to_storage = nifti_io.to_storage
from_storage = nifti_io.from_storage

# MedSeg label values.
BACKGROUND, GROUND_GLASS, CONSOLIDATION, PLEURAL_EFFUSION = 0, 1, 2, 3
RIGHT_LUNG, LEFT_LUNG = 1, 2

TR_IMAGE, TR_MASK, TR_LUNG = nifti_io.TR_IMAGE, nifti_io.TR_MASK, nifti_io.TR_LUNG
RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR = (nifti_io.RP_IMAGE_DIR, nifti_io.RP_MASK_DIR,
                                          nifti_io.RP_LUNG_DIR)
PROVENANCE = "phantom.json"
GENERATOR_VERSION = 2  # bump when the same seed would produce different arrays

# CT numbers are clipped to what a 12-bit scanner stores.
HU_MIN, HU_MAX = -1024.0, 3071.0


class Tissue(enum.IntEnum):
  """Classes of the internal tissue map (ground truth for tests and debugging, not written)."""
  AIR = 0  # outside the body
  FAT = 1  # subcutaneous and mediastinal fat
  MUSCLE = 2  # chest-wall and intercostal muscle
  SOFT = 3  # heart, great vessels, esophagus, liver/spleen, skin, cartilage, discs, spinal canal
  BONE = 4  # vertebrae, ribs, sternum, scapulae (cancellous and cortical)
  LUNG = 5  # aerated lung parenchyma
  VESSEL = 6  # pulmonary vessels (and hilar vessels in mediastinal fat)
  AIRWAY = 7  # air inside trachea and bronchi
  GROUND_GLASS = 8
  CONSOLIDATION = 9
  EFFUSION = 10
  TABLE = 11  # scanner couch


class Phantom(NamedTuple):
  """Rendered phantom, display orientation; (H, W) for a slice, (H, W, Z) for a volume."""
  hu: np.ndarray  # float32 Hounsfield units
  labels: np.ndarray  # uint8 in {0, 1, 2, 3}
  lung: np.ndarray  # uint8 in {0, 1 right, 2 left}
  tissue: np.ndarray  # uint8 `Tissue` values before blur and noise
  z_mm: np.ndarray  # (Z,) float32 slice centres, mm above the lowest point of the lungs


# --------------------------------------------------------------------------------------------
# Patient model. Millimetres; x grows toward the patient's left (display right), y toward
# posterior (display down), z toward the head; z = 0 is the lowest point of the lungs.
# --------------------------------------------------------------------------------------------


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


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _level(x, y, cx: float, cy: float, a: float, b_ant: float, b_post: float,
           shape_p: tuple[float, float, float]) -> np.ndarray:
  """Superellipse level, < 1 inside; anterior and posterior halves have their own height/power."""
  dx = np.abs(x - cx) / max(a, 1.0)
  dy = y - cy
  ant = (np.abs(dy) / max(b_ant, 1.0)) ** shape_p[1]
  post = (np.abs(dy) / max(b_post, 1.0)) ** shape_p[2]
  return dx ** shape_p[0] + np.where(dy < 0, ant, post)


def _ellipse(x, y, cx, cy, rx, ry, angle: float = 0.0) -> np.ndarray:
  """Rotated-ellipse level, < 1 inside; radii may be arrays and may be 0 (nothing inside)."""
  dx, dy = x - cx, y - cy
  # Python floats keep float32 inputs float32 (NumPy scalars would promote to float64).
  c, s = float(np.cos(angle)), float(np.sin(angle))
  rx = max(float(rx), 1e-6) if np.ndim(rx) == 0 else np.maximum(rx, 1e-6)
  ry = max(float(ry), 1e-6) if np.ndim(ry) == 0 else np.maximum(ry, 1e-6)
  return ((dx * c + dy * s) / rx) ** 2 + ((-dx * s + dy * c) / ry) ** 2


def _smoothstep(v, lo: float, hi: float):
  t = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
  return t * t * (3 - 2 * t)


@dataclasses.dataclass
class _Patient:
  """One simulated patient: shapes, positions and CT numbers (trees added after the shapes)."""
  yc: float  # body centre
  body: tuple[float, float, float]  # half width, anterior and posterior half height
  fat: tuple[float, float, float]  # subcutaneous fat: lateral, anterior, posterior thickness
  muscle: tuple[float, float, float]  # chest-wall muscle thickness, same order
  rib_t: float  # radial thickness of the rib layer
  shape_p: tuple[float, float, float]  # superellipse exponents: x, anterior y, posterior y
  lung_h: float  # cranio-caudal height of the lungs
  x_mc: float  # centre line of the mediastinum
  med_w: tuple[float, float]  # mediastinum half width: anterior junction, posterior/superior
  heart: tuple[float, ...]  # cx, cy, cz, rx, ry, rz, in-plane angle
  domes: tuple[tuple[float, ...], ...]  # right, left: cx, cy, z_top, rx, ry, height
  envelope: tuple[float, float, float, float, float]  # lung apex/base shape: ex, ey, rx, ry, z0
  vb: tuple[float, float]  # vertebral body centre y and radius
  disc_phase: float  # z offset of the intervertebral discs
  scapula: bool
  hu: dict[str, float]
  noise_sd: float
  tubes: _Tubes | None = None  # mediastinal soft-tissue tubes (aorta, pulmonary arteries, ...)
  big_lumen: _Tubes | None = None  # trachea and main bronchi: lumen
  big_wall: _Tubes | None = None  # ... and outer wall
  vessels: _Tubes | None = None  # pulmonary arteries and veins
  aw_lumen: _Tubes | None = None  # lobar and segmental bronchi: lumen
  aw_wall: _Tubes | None = None  # ... and outer wall
  ribs: _Tubes | None = None  # bony ribs
  cartilage: _Tubes | None = None  # costal cartilages

  def cavity_box(self) -> tuple[float, float, float, float]:
    """Half width, anterior y, posterior y of the thoracic cavity; its height."""
    a, b_ant, b_post = self.body
    ca = a - self.fat[0] - self.muscle[0] - self.rib_t
    cav_ant = self.yc - b_ant + self.fat[1] + self.muscle[1] + self.rib_t
    cav_post = self.yc + b_post - self.fat[2] - self.muscle[2] - self.rib_t
    return ca, cav_ant, cav_post, cav_post - cav_ant


class _Cavity(NamedTuple):
  """Masks of the thoracic cavity's contents (broadcast shape of x, y, z)."""
  cavity: np.ndarray
  liver: np.ndarray  # right dome and below
  spleen: np.ndarray  # left dome and below
  pericardium: np.ndarray  # heart with its fat coat
  heart: np.ndarray
  side: np.ndarray  # lung field: 0, RIGHT_LUNG, LEFT_LUNG (before tubes and airways cut it)
  upper_wall: np.ndarray  # soft tissue between the narrowing upper lungs and the rib cage


def _cavity_parts(p: _Patient, x, y, z, cavity: np.ndarray | None = None) -> _Cavity:
  """Lung field and the organs that bound it; x, y, z broadcast (z may vary per point).

  `cavity`, the thoracic cavity mask on the same grid, may be passed in when already known.
  """
  if cavity is None:
    ca, cav_ant, cav_post, _ = p.cavity_box()
    cavity = _level(x, y, 0, p.yc, ca, p.yc - cav_ant, cav_post - p.yc, p.shape_p) < 1
  # Diaphragm domes: an ellipsoid cap above a cylinder; the low chest is mostly abdomen.
  grow = 1.0 + 0.15 * np.clip(1 - z / (0.15 * p.lung_h), 0, 1)
  organs = []
  for dcx, dcy, z_top, drx, dry, dh in p.domes:
    zc = z_top - dh
    f = np.where(z <= zc, 1.0, np.sqrt(np.clip(1 - ((z - zc) / dh) ** 2, 0, 1))) * grow
    organs.append(cavity & (_ellipse(x, y, dcx, dcy, drx * f, dry * f) < 1))
  hcx, hcy, hcz, hrx, hry, hrz, hang = p.heart
  hf = np.sqrt(np.clip(1 - ((z - hcz) / hrz) ** 2, 0, 1))
  peri = cavity & (hf > 0) & (_ellipse(x, y, hcx, hcy, hrx * hf + 4, hry * hf + 4, hang) < 1)
  heart = peri & (_ellipse(x, y, hcx, hcy, hrx * hf, hry * hf, hang) < 1)
  # Mediastinal band: a thin anterior junction, wider behind the heart, wider still above it;
  # the great vessels (tubes) add their own bulges.
  w_ant, w_post = p.med_w
  w_post_z = w_post + 8 * _smoothstep(z, hcz + 0.4 * hrz, hcz + hrz)
  w = w_ant + (w_post_z - w_ant) * _smoothstep(y, hcy - 0.9 * hry, hcy + 0.2 * hry)
  band = np.abs(x - p.x_mc) < w
  y_vb, r_vb = p.vb
  spine = (_ellipse(x, y, 0, y_vb, r_vb + 7, r_vb + 6) < 1) | ((np.abs(x) < r_vb) & (y > y_vb))
  # Lung envelope: rounds the apices and tapers the bases (the domes carve the recesses).
  ex, ey, erx, ery, z_env = p.envelope
  top = np.sqrt(np.clip(1 - ((z - z_env) / (p.lung_h - z_env)) ** 2, 0, 1))
  fz = np.where(z > z_env, top, np.sqrt(np.clip(z / 25.0, 0, 1)))
  grow_mid = 1 + 0.5 * _smoothstep(fz, 0.8, 1.0)  # mid-chest: the cavity alone bounds the lung
  env_r = _ellipse(x, y, -ex, ey, erx * fz * grow_mid, ery * fz * grow_mid) < 1
  env_l = _ellipse(x, y, ex, ey, erx * fz * grow_mid, ery * fz * grow_mid) < 1
  field = cavity & ~peri & ~band & ~spine & ~organs[0] & ~organs[1]
  side = np.where(field & (x < p.x_mc) & env_r, RIGHT_LUNG,
                  np.where(field & (x >= p.x_mc) & env_l, LEFT_LUNG, 0)).astype(np.uint8)
  upper_wall = field & (side == 0) & (z > z_env)
  return _Cavity(cavity, organs[0], organs[1], peri, heart, side, upper_wall)


def _territory_trees(rng: np.random.Generator, pts: np.ndarray, tree: np.ndarray,
                     roots: np.ndarray, r_leaf: float) -> tuple[_Tubes, np.ndarray, np.ndarray]:
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
    var -= cen ** 2
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


def _sample_lung_points(rng: np.random.Generator, p: _Patient,
                        n: int) -> tuple[np.ndarray, np.ndarray]:
  """n points per lung, uniform in the lung field: points (2n, 3) and their side (2n,)."""
  ca, cav_ant, cav_post, _ = p.cavity_box()
  lo, hi = np.array([-ca, cav_ant, 0.0]), np.array([ca, cav_post, p.lung_h])
  got = {RIGHT_LUNG: [], LEFT_LUNG: []}
  for _ in range(50):
    c = rng.uniform(lo, hi, (4 * n, 3))
    side = _cavity_parts(p, c[:, 0], c[:, 1], c[:, 2]).side
    for s in got:
      got[s].append(c[side == s])
    if all(sum(len(q) for q in v) >= n for v in got.values()):
      break
  pts = [np.concatenate(got[s])[:n] for s in (RIGHT_LUNG, LEFT_LUNG)]
  return np.concatenate(pts), np.repeat([RIGHT_LUNG, LEFT_LUNG], [len(q) for q in pts])


def _wall_point(p: _Patient, t: np.ndarray, inset: float) -> tuple[np.ndarray, np.ndarray]:
  """Points (x, y) on the body outline shrunk by the fat, muscle and `inset` mm, at angles t.

  t in [-1, 1]: 0 the posterior midline, +-1 the anterior midline, positive on the patient's
  left. Solves the superellipse equation along each ray from the body centre by bisection.
  """
  a, b_ant, b_post = p.body
  dims = (a - p.fat[0] - p.muscle[0] - inset, b_ant - p.fat[1] - p.muscle[1] - inset,
          b_post - p.fat[2] - p.muscle[2] - inset)
  dx, dy = np.sin(np.pi * t), np.cos(np.pi * t)
  lo, hi = np.zeros_like(t), np.full_like(t, 400.0)
  for _ in range(24):  # 400 mm / 2**24: far below a pixel
    mid = 0.5 * (lo + hi)
    inside = _level(mid * dx, p.yc + mid * dy, 0, p.yc, *dims, p.shape_p) < 1
    lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
  return lo * dx, p.yc + lo * dy


def _rib_tubes(rng: np.random.Generator, p: _Patient) -> tuple[_Tubes, _Tubes]:
  """Ribs as chains of short cylinders in the rib layer, each descending from back to front."""
  spacing, drop = rng.uniform(24, 28), rng.uniform(100, 140)
  z0 = 0.1 * p.lung_h - 30 + np.arange(14) * spacing + rng.uniform(-8, 8)
  t = np.linspace(0.08, 0.94, 28)
  bone, cart = [], []
  xs, ys = _wall_point(p, np.concatenate([-t, t]), 0.5 * p.rib_t)
  for x, y in ((xs[:len(t)], ys[:len(t)]), (xs[len(t):], ys[len(t):])):
    for zk in z0:
      z = zk - drop * t ** 1.15
      pts = np.stack([x, y, z], 1)
      r = 0.5 * p.rib_t * np.ones(len(t) - 1)
      for lo, hi, out in ((0.0, 0.78, bone), (0.78, 1.0, cart)):
        sel = (t[:-1] >= lo) & (t[:-1] < hi)
        out.append((pts[:-1][sel], pts[1:][sel], r[sel]))
  def cat(parts):
    return _Tubes(*(np.concatenate([q[i] for q in parts]) for i in range(3)))
  return cat(bone), cat(cart)


def _sample_patient(rng: np.random.Generator) -> _Patient:
  """Draws one patient's anatomy and CT numbers."""
  u = rng.uniform
  a, b_ant, b_post = u(132, 160), u(96, 116), u(92, 108)
  yc = u(-8, 8)
  fat = (u(5, 22), u(6, 22), u(8, 24))
  muscle = (u(7, 12), u(10, 18), u(22, 30))
  rib_t = u(6, 8)
  shape_p = (u(2.0, 2.4), u(1.8, 2.1), u(2.6, 3.2))
  lung_h = u(215, 270)
  ca = a - fat[0] - muscle[0] - rib_t
  cav_ant = yc - b_ant + fat[1] + muscle[1] + rib_t
  cav_post = yc + b_post - fat[2] - muscle[2] - rib_t
  cav_h = cav_post - cav_ant
  r_vb = u(15, 19)
  y_vb = cav_post - r_vb - u(1, 5)
  z_dome_r = u(0.17, 0.27) * lung_h
  z_dome_l = z_dome_r - u(0, 18)
  dome_h = u(0.2, 0.26) * lung_h
  domes = ((-0.36 * ca, cav_ant + 0.45 * cav_h, z_dome_r, 0.68 * ca, 0.5 * cav_h, dome_h),
           (0.42 * ca, cav_ant + 0.45 * cav_h, z_dome_l, 0.6 * ca, 0.46 * cav_h, dome_h))
  hrx, hry, hrz = u(55, 68), u(40, 50), u(52, 62)
  heart = (u(14, 26), cav_ant + hry + u(2, 10), z_dome_l + u(28, 42), hrx, hry, hrz,
           u(-0.75, -0.45))
  hu = {
      "fat": u(-110, -90), "muscle": u(44, 58), "soft": u(34, 46), "liver": u(52, 64),
      "skin": u(20, 40), "cartilage": u(100, 140), "disc": u(70, 95), "canal": u(25, 35),
      "bone": u(430, 520), "cortex": u(850, 1000), "lung": u(-895, -855), "lung_grad": u(40, 80),
      "vessel": u(35, 50), "air": -1000.0, "ggo": u(-620, -450), "cons": u(-40, 25),
      "effusion": u(3, 17), "table": u(60, 140),
  }
  p = _Patient(
      yc=yc, body=(a, b_ant, b_post), fat=fat, muscle=muscle, rib_t=rib_t, shape_p=shape_p,
      lung_h=lung_h, x_mc=u(2, 8), med_w=(u(1.5, 4), u(11, 15)), heart=heart, domes=domes,
      envelope=(0.42 * ca, cav_ant + 0.55 * cav_h, 0.72 * ca, 0.62 * cav_h, u(0.3, 0.42) * lung_h),
      vb=(y_vb, r_vb), disc_phase=u(0, 26), scapula=bool(rng.random() < 0.85), hu=hu,
      noise_sd=u(10, 20))
  p.ribs, p.cartilage = _rib_tubes(rng, p)

  # Mediastinal tubes: descending and ascending aorta with the arch, pulmonary trunk and
  # arteries, superior vena cava, arch branches, esophagus. Slices cut them to their z-range.
  top = lung_h + 80
  z_hil = u(0.5, 0.58) * lung_h
  z_arch = min(z_hil + u(30, 45), lung_h - 35)
  r_ao = u(12, 15)
  x_da, y_da = r_vb + r_ao + u(2, 5), y_vb - 0.5 * r_vb
  x_aa, y_aa = u(-16, -8), y_vb - r_vb - u(48, 62)
  y_h = y_aa + u(28, 36)
  hil_r, hil_l = np.array([-0.5 * ca, y_h, z_hil]), np.array([0.46 * ca, y_h + 4, z_hil + 8])
  hz = heart[2]
  y_es = y_vb - r_vb - 8
  arch_mid = ((x_aa + x_da) / 2 + 6, (y_aa + y_da) / 2, z_arch + 12)
  p.tubes = _Tubes.of([
      ((x_da, y_da, -60), (x_da, y_da, z_arch), r_ao * 0.85),
      ((x_aa, y_aa, hz), (x_aa, y_aa, z_arch), r_ao),
      ((x_aa, y_aa, z_arch), arch_mid, r_ao * 0.95),
      (arch_mid, (x_da, y_da, z_arch), r_ao * 0.9),
      ((8, heart[1] - 10, hz + 25), (14, y_aa + 4, z_hil - 4), u(12, 14)),
      ((14, y_aa + 4, z_hil - 4), (hil_r[0] * 0.8, y_h - 2, z_hil), u(9, 11)),
      ((14, y_aa + 4, z_hil - 4), (hil_l[0] * 0.8, y_h + 2, z_hil + 8), u(9, 11)),
      ((x_aa - 22, y_aa + 4, hz + 20), (x_aa - 22, y_aa + 4, top), u(8, 10)),
      ((x_aa + 2, y_aa, z_arch + 8), (x_aa - 6, y_aa - 4, top), u(5, 7)),
      ((3, y_aa + 10, z_arch + 12), (6, y_aa + 8, top), u(3.5, 5)),
      ((14, y_aa + 16, z_arch + 12), (22, y_aa + 20, top), u(4, 6)),
      ((5, y_es, -60), (5, y_es, top), u(6, 8)),
  ])
  # Trachea and main bronchi (air), from the carina to the hila.
  y_tr = y_es - u(18, 22)
  z_car = z_hil + u(8, 16)
  tr_r = u(7.5, 9.5)
  big = [((0, y_tr, z_car), (0, y_tr + 3, top), tr_r),
         ((0, y_tr, z_car), (hil_r[0] * 0.85, y_h + 10, z_hil - 10), tr_r * 0.72),
         ((0, y_tr, z_car), (hil_l[0] * 0.85, y_h + 12, z_hil - 2), tr_r * 0.65)]
  p.big_lumen = _Tubes.of(big)
  p.big_wall = _Tubes.of([(p0, p1, r + 1.8) for p0, p1, r in big])

  # Pulmonary arteries from the hila and veins from the left atrium, each a space-filling tree
  # over its own random points in the lung, so the two interleave as they do in a real lung.
  _, hcy, hcz, _, hry, hrz, _ = heart
  vein_r = np.array([p.x_mc - 30, hcy + 0.7 * hry, hcz + 0.3 * hrz])
  vein_l = np.array([p.x_mc + 26, hcy + 0.75 * hry, hcz + 0.35 * hrz])
  pts, side = _sample_lung_points(rng, p, 1800)
  # Per lung, half of the points feed the arteries (tree 0 right, 1 left), half the veins (2, 3).
  half = (np.arange(len(side)) % 2).astype(np.int64)
  tree = (side == LEFT_LUNG) + 2 * half
  p.vessels, gen, tid = _territory_trees(rng, pts, tree, np.stack([hil_r, hil_l, vein_r, vein_l]),
                                         r_leaf=u(0.5, 0.6))
  # Bronchi run beside the larger arteries (bronchovascular bundles): the same segments, moved
  # sideways by the sum of the radii.
  sel = (tid < 2) & (gen <= 4) & (p.vessels.r >= 1.6)
  va, vb_, vr = p.vessels.a[sel], p.vessels.b[sel], p.vessels.r[sel]
  side_dir = _unit(np.cross(vb_ - va, np.array([0.0, 0.0, 1.0])) + 1e-3)
  lumen_r = 0.7 * vr
  wall_r = lumen_r * 1.2 + 0.4
  offset = side_dir * (vr + wall_r + 0.3)[:, None]
  p.aw_lumen = _Tubes(va + offset, vb_ + offset, lumen_r)
  p.aw_wall = _Tubes(va + offset, vb_ + offset, wall_r)
  return p


# --------------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------------


def _axes(size: int, fov_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
  """Pixel-centre coordinates (mm) of columns (x) and rows (y), and the pixel size."""
  px = fov_mm / size
  ax = ((np.arange(size) - (size - 1) / 2) * px).astype(np.float32)
  return ax, ax.copy(), px


def _draw_tubes(tubes: _Tubes, x_ax: np.ndarray, y_ax: np.ndarray, zs: np.ndarray,
                half_slab: float, px: float) -> np.ndarray:
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
      c = (np.clip((r[chunk, None, None] - dist) / px + 0.5, 0, 1) *
           frac[chunk, None, None]).astype(np.float32)
      idx = (k[chunk, None, None] * h + rows_c) * w + cols_c
      valid &= c > 0
      np.maximum.at(flat_cov, idx[valid], c[valid])
  return cov


class _Frame(NamedTuple):
  """In-plane structures that do not change with z (H, W), computed once per rendering."""
  tissue: np.ndarray  # uint8: air, couch, fat, skin, muscle, intercostal layer, cavity as fat
  hu: np.ndarray  # float32, matching
  cage: np.ndarray  # bool: inside the outer surface of the rib layer
  ring: np.ndarray  # bool: the rib layer
  cavity: np.ndarray  # bool: thoracic cavity
  lung_hu: np.ndarray  # float32: aerated lung, denser toward the back
  vbody: np.ndarray  # bool: vertebral body
  canal: np.ndarray  # bool: spinal canal
  posterior: np.ndarray  # bool: neural arch, spinous and transverse processes
  sternum: np.ndarray  # bool
  scapula_layer: np.ndarray  # bool: where the scapulae can be (their extent depends on z)
  theta: np.ndarray  # float32: angle from the posterior midline, 0..1


def _frame(p: _Patient, x: np.ndarray, y: np.ndarray) -> _Frame:
  """Body wall, couch and spine of patient p on the grid x (1, W), y (H, 1), in mm."""
  hu_of, T = p.hu, Tissue
  shape = np.broadcast_shapes(x.shape, y.shape)
  tissue = np.zeros(shape, np.uint8)
  hu = np.full(shape, hu_of["air"], np.float32)
  a, b_ant, b_post = p.body
  fl, fa, fp = p.fat
  ml, ma, mp = p.muscle
  yc = p.yc
  # Couch: a curved shell under the patient, wider than the body.
  y_tab = yc + b_post + 3 + 0.0006 * x ** 2
  table = (np.abs(y - y_tab) < 2.5) & (np.abs(x) < 0.9 * a + 40)
  table |= (np.abs(y - y_tab - 28) < 2.0) & (np.abs(x) < 0.9 * a + 30)
  tissue[table], hu[table] = T.TABLE, hu_of["table"]
  body = _level(x, y, 0, yc, a, b_ant, b_post, p.shape_p) < 1
  skin = body & ~(_level(x, y, 0, yc, a - 1.5, b_ant - 1.5, b_post - 1.5, p.shape_p) < 1)
  tissue[body], hu[body] = T.FAT, hu_of["fat"]
  tissue[skin], hu[skin] = T.SOFT, hu_of["skin"]
  lv_mo = _level(x, y, 0, yc, a - fl, b_ant - fa, b_post - fp, p.shape_p)
  muscle = lv_mo < 1
  tissue[muscle], hu[muscle] = T.MUSCLE, hu_of["muscle"]
  lv_ro = _level(x, y, 0, yc, a - fl - ml, b_ant - fa - ma, b_post - fp - mp, p.shape_p)
  cage = lv_ro < 1
  ca, cav_ant, cav_post, _ = p.cavity_box()
  cavity = _level(x, y, 0, yc, ca, yc - cav_ant, cav_post - yc, p.shape_p) < 1
  ring = cage & ~cavity
  tissue[cavity], hu[cavity] = T.FAT, hu_of["fat"]
  t_ap = np.clip((y - (yc - b_ant)) / (b_ant + b_post), 0, 1)
  lung_hu = np.broadcast_to(hu_of["lung"] + hu_of["lung_grad"] * t_ap ** 2, shape)
  # Spine: vertebral body, canal, posterior arch and processes.
  y_vb, r_vb = p.vb
  vbody = _ellipse(x, y, 0, y_vb, r_vb * 1.1, r_vb) < 1
  y_cn = y_vb + r_vb + 8
  rr = np.hypot(x, y - y_cn)
  canal = rr < 7.5
  arch = (rr >= 7.5) & (rr < 12.5) & (y > y_cn - 6)
  spinous = (np.abs(x) < 3.5) & (y > y_cn + 10) & (y < y_cn + 36)
  transverse = (np.abs(y - y_cn + 2) < 4.0) & (np.abs(x) > 6) & (np.abs(x) < 30)
  sternum = _ellipse(x, y, 0, yc - b_ant + fa + 0.6 * ma, 14, 6) < 1
  n_mo, n_ro = np.sqrt(lv_mo), np.sqrt(lv_ro)
  sw = np.clip((n_ro - 1) / np.maximum(n_ro - n_mo, 1e-3), 0, 1)  # 0 inner, 1 outer muscle
  theta = (np.abs(np.arctan2(x, y - yc)) / np.pi).astype(np.float32)
  return _Frame(tissue, hu, cage, ring, cavity, lung_hu.astype(np.float32), vbody, canal,
                (arch | spinous | transverse) & body, sternum,
                muscle & ~cage & (sw > 0.35) & (sw < 0.5) & (theta < 0.42), theta)


class _Slice(NamedTuple):
  tissue: np.ndarray  # (H, W) uint8
  hu: np.ndarray  # (H, W) float32
  side: np.ndarray  # (H, W) uint8 lung side 0/1/2


def _anatomy_slice(p: _Patient, fr: _Frame, x: np.ndarray, y: np.ndarray, z: float,
                   med_cov: np.ndarray, big_wall_cov: np.ndarray, rib_cov: np.ndarray,
                   cart_cov: np.ndarray) -> _Slice:
  """Everything but pulmonary vessels, airways and lesions, for one slice at height z (mm).

  fr: the z-independent frame on the grid x (1, W), y (H, 1) (mm). med_cov, big_wall_cov,
  rib_cov, cart_cov (H, W): coverage of the mediastinal tubes, the trachea/main bronchi walls,
  the ribs and the costal cartilages in this slice.
  """
  hu_of, T = p.hu, Tissue
  tissue, hu = fr.tissue.copy(), fr.hu.copy()
  parts = _cavity_parts(p, x, y, np.float32(z), cavity=fr.cavity)

  # Ribs and costal cartilages come in as slab-averaged coverage, like the other tubes.
  bone = (rib_cov >= 0.5) & fr.ring
  cart = (cart_cov >= 0.5) & fr.ring
  tissue[cart], hu[cart] = T.SOFT, hu_of["cartilage"]

  # Cavity contents default to mediastinal fat (in the frame); organs and lungs are carved out.
  tissue[parts.liver], hu[parts.liver] = T.SOFT, hu_of["liver"]
  tissue[parts.spleen], hu[parts.spleen] = T.SOFT, hu_of["soft"]
  tissue[parts.pericardium], hu[parts.pericardium] = T.FAT, hu_of["fat"]
  tissue[parts.heart], hu[parts.heart] = T.SOFT, hu_of["soft"]
  tissue[parts.upper_wall], hu[parts.upper_wall] = T.MUSCLE, hu_of["muscle"]
  lung_field = (parts.side > 0) & (med_cov < 0.5) & (big_wall_cov < 0.5)
  side = np.where(lung_field, parts.side, 0).astype(np.uint8)
  tissue[lung_field] = T.LUNG
  hu[lung_field] = fr.lung_hu[lung_field]

  # Mediastinal tubes, blended by coverage, stay inside the rib cage.
  inside = fr.cage & ~fr.ring
  m = inside & (med_cov > 0)
  hu[m] += med_cov[m] * (hu_of["soft"] - hu[m])
  tissue[inside & (med_cov >= 0.5)] = T.SOFT

  # Spine: an intervertebral disc every ~26 mm.
  if ((z - p.disc_phase) % 26.0) < 5.0:
    tissue[fr.vbody], hu[fr.vbody] = T.SOFT, hu_of["disc"]
  else:
    bone |= fr.vbody
  bone |= fr.posterior
  tissue[fr.canal], hu[fr.canal] = T.SOFT, hu_of["canal"]
  # Sternum (not in the lowest slices: the xiphoid ends above the domes' tops) and scapulae.
  if z > 0.3 * p.lung_h:
    bone |= fr.sternum
  if p.scapula and z > 0.55 * p.lung_h:
    bone |= fr.scapula_layer & (fr.theta > 0.14 + 0.1 * (z / p.lung_h - 0.55))

  # Cortex: the outer pixel of each bone is denser than the marrow. Ribs only partly inside the
  # slab are blended in (partial volume).
  fringe = fr.ring & (rib_cov > 0) & ~bone
  hu[fringe] += rib_cov[fringe] * (hu_of["cortex"] - hu[fringe])
  interior = ndimage.binary_erosion(bone, iterations=1)
  tissue[bone] = T.BONE
  hu[bone] = hu_of["cortex"]
  hu[interior] = hu_of["bone"]
  return _Slice(tissue, hu, side)


def _upsample(lo: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
  """Bilinear up-sampling of (Z, h0, w0) by an integer factor over the last two axes: (Z, h, w)."""
  def weights(n, n0):
    pos = np.clip((np.arange(n) + 0.5) / f - 0.5 + 1.0, 0, n0 - 1.001)  # +1: lo has a border
    i = np.floor(pos).astype(np.int64)
    return i, (pos - i).astype(np.float32)
  i, ti = weights(h, lo.shape[1])
  j, tj = weights(w, lo.shape[2])
  rows = lo[:, i] * (1 - ti)[None, :, None] + lo[:, i + 1] * ti[None, :, None]
  return rows[:, :, j] * (1 - tj) + rows[:, :, j + 1] * tj


def _smooth_noise(rng: np.random.Generator, nz: int, h: int, w: int, cell_px: float,
                  z_sigma: float) -> np.ndarray:
  """Band-limited Gaussian noise (Z, H, W) float32, unit std, correlation ~cell_px pixels."""
  f = max(1, int(round(cell_px)))
  lo = rng.standard_normal((nz, h // f + 3, w // f + 3)).astype(np.float32)
  lo = ndimage.gaussian_filter(lo, (z_sigma if nz > 1 else 0.0, 1.0, 1.0), mode="nearest")
  up = _upsample(lo, f, h, w)
  # Bilinear interpolation lowers the variance; normalise after it.
  return up / max(float(up.std()), 1e-6)


@dataclasses.dataclass
class _Blob:
  centre: np.ndarray  # (3,) mm
  sigma: np.ndarray  # (3,) mm: in-plane major, minor, z
  angle: float
  amp: float
  cons: bool  # has a consolidated core


def _plan_lesions(rng: np.random.Generator, lung: np.ndarray, x_ax: np.ndarray,
                  y_ax: np.ndarray, zs: np.ndarray, half_slab: float, px: float,
                  slices: np.ndarray, n_clusters: int, p_cons: float) -> list[_Blob]:
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
      blobs.append(_Blob(np.array([cx, cy, cz]) + off, np.array([sx, sy, rng.uniform(6, 15)]),
                         float(rng.uniform(0, np.pi)), float(rng.uniform(0.8, 1.3)), cons))
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
    q = (((dx * co + dy * si) / sx) ** 2 + ((-dx * si + dy * co) / sy) ** 2 +
         (dz / sz) ** 2).astype(np.float32)
    g[k0:k1, r0:r1, c0:c1] += bl.amp * np.exp(-0.5 * q)
    if bl.cons:
      c[k0:k1, r0:r1, c0:c1] += bl.amp * np.exp(-0.5 * q / 0.65 ** 2)
  return g, c


def _effusion(rng: np.random.Generator, side: np.ndarray, y_ax: np.ndarray, zs: np.ndarray,
              px: float, z_top: float) -> np.ndarray:
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


def _render(p: _Patient, rng: np.random.Generator, size: int, fov_mm: float, zs: np.ndarray,
            slice_thickness: float, lesion_slices: np.ndarray | None, n_clusters: int,
            effusion_top: float | None) -> Phantom:
  """Renders the slices centred at `zs` (Z,) of patient `p`.

  Lesion clusters are centred in `lesion_slices` (indices into zs; None: no lesions); pleural
  fluid, if `effusion_top` is set, fills the dependent pleural space below that height.
  Returns a `Phantom` with (Z, H, W) arrays (moved to display layout by the callers).
  """
  x_ax, y_ax, px = _axes(size, fov_mm)
  half = 0.5 * slice_thickness
  nz = len(zs)
  med = _draw_tubes(p.tubes, x_ax, y_ax, zs, half, px)
  big_wall = _draw_tubes(p.big_wall, x_ax, y_ax, zs, half, px)
  big_lumen = _draw_tubes(p.big_lumen, x_ax, y_ax, zs, half, px)
  ves = _draw_tubes(p.vessels, x_ax, y_ax, zs, half, px)
  aw_wall = _draw_tubes(p.aw_wall, x_ax, y_ax, zs, half, px)
  aw_lumen = _draw_tubes(p.aw_lumen, x_ax, y_ax, zs, half, px)

  x, y = x_ax[None, :], y_ax[:, None]
  tissue = np.empty((nz, size, size), np.uint8)
  hu = np.empty((nz, size, size), np.float32)
  side = np.empty((nz, size, size), np.uint8)
  ribs = _draw_tubes(p.ribs, x_ax, y_ax, zs, half, px)
  cart = _draw_tubes(p.cartilage, x_ax, y_ax, zs, half, px)
  fr = _frame(p, x, y)
  for k, z in enumerate(zs):
    tissue[k], hu[k], side[k] = _anatomy_slice(p, fr, x, y, float(z), med[k], big_wall[k],
                                               ribs[k], cart[k])
  cavity = np.broadcast_to(fr.cavity, hu.shape)
  lung = side > 0
  z_sigma = 10.0 / slice_thickness
  tex = _smooth_noise(rng, nz, size, size, 6.0 / px, z_sigma)
  hu[lung] += 12.0 * tex[lung]

  # Lesions.
  labels = np.zeros((nz, size, size), np.uint8)
  a_cons = cons_tex = None
  if lesion_slices is not None and len(lesion_slices):
    blobs = _plan_lesions(rng, lung, x_ax, y_ax, zs, half, px, lesion_slices, n_clusters,
                          p_cons=0.4)
    g, c = _blob_fields(blobs, x_ax, y_ax, zs, px)
    mod = _smooth_noise(rng, nz, size, size, 5.0 / px, 8.0 / slice_thickness)
    g *= 1 + 0.35 * mod
    # The same noise shapes the consolidation margins and its texture.
    cons_tex = _smooth_noise(rng, nz, size, size, 4.0 / px, 8.0 / slice_thickness)
    c *= 1 + 0.3 * cons_tex
    a_ggo = np.where(lung, np.clip((g - 0.3) / 0.3, 0, 1), 0).astype(np.float32)
    # Labelled consolidation is fully dense; a thinner rim below the label threshold is hazy.
    a_cons = np.where(lung, np.clip((c - 0.35) / 0.2, 0, 1), 0).astype(np.float32)
    labels[lung & (g > 0.5)] = GROUND_GLASS
    labels[lung & (c > 0.55)] = CONSOLIDATION
    ggo_hu = p.hu["ggo"] + 35.0 * mod
    hu += a_ggo * (ggo_hu - hu)
  eff = (_effusion(rng, side, y_ax, zs, px, effusion_top) if effusion_top is not None
         else np.zeros_like(lung))
  labels[eff] = PLEURAL_EFFUSION

  # Vessels show through ground glass; consolidation hides them, but not the air in its bronchi.
  allowed = (lung | (cavity & (tissue == Tissue.FAT))) & ~eff
  ves *= allowed
  hu += ves * (p.hu["vessel"] - hu)
  if a_cons is not None:
    a_cons *= ~eff
    hu += a_cons * (p.hu["cons"] + 15.0 * cons_tex - hu)
  aw_wall *= lung & ~eff
  aw_lumen *= lung & ~eff
  wall = np.maximum(aw_wall, big_wall * cavity)
  lumen = np.maximum(aw_lumen, big_lumen * cavity)
  hu += wall * (p.hu["soft"] - hu)
  hu += lumen * (p.hu["air"] - hu)
  hu[eff] = p.hu["effusion"]

  tissue[(labels == GROUND_GLASS)] = Tissue.GROUND_GLASS
  tissue[(ves >= 0.5)] = Tissue.VESSEL
  tissue[(labels == CONSOLIDATION)] = Tissue.CONSOLIDATION
  tissue[(wall >= 0.5) & (tissue != Tissue.CONSOLIDATION)] = Tissue.SOFT
  tissue[lumen >= 0.5] = Tissue.AIRWAY
  tissue[eff] = Tissue.EFFUSION

  # Scanner: in-plane blur (point-spread function), then correlated quantum noise.
  hu = ndimage.gaussian_filter(hu, (0, 0.6, 0.6))
  noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0, 0.7, 0.7))
  noise *= p.noise_sd / max(float(noise.std()), 1e-6)
  hu = np.clip(hu + noise, HU_MIN, HU_MAX).astype(np.float32)
  return Phantom(hu, labels, side, tissue, zs.astype(np.float32))


def _to_display(ph: Phantom, squeeze: bool) -> Phantom:
  """(Z, H, W) internal layout -> (H, W, Z) display layout, or (H, W) when `squeeze`."""
  if squeeze:
    return Phantom(ph.hu[0], ph.labels[0], ph.lung[0], ph.tissue[0], ph.z_mm)
  return Phantom(*(np.ascontiguousarray(np.moveaxis(v, 0, -1)) for v in ph[:4]), ph.z_mm)


def _check_size(size: int, what: str = "size") -> None:
  if not isinstance(size, (int, np.integer)) or size < 32:
    raise ValueError(f"phantom: {what} must be an integer >= 32, got {size!r}")


def _simulate_slice(rng: np.random.Generator, size: int, *, lesion: bool | None = None,
                    effusion: bool | None = None, fov_mm: float = 350.0,
                    slice_thickness: float = 5.0) -> Phantom:
  """One independent patient, one slice; `generate_slice` plus the tissue map and z."""
  _check_size(size)
  if lesion is False and effusion:
    raise ValueError("phantom: effusion=True needs lesion=True or None (effusion is a finding)")
  want = bool(rng.random() < 0.5) if lesion is None else bool(lesion)
  fluid = want and (bool(rng.random() < 0.12) if effusion is None else bool(effusion))
  p = _sample_patient(rng)
  # MedSeg's single slices all cut through the lungs: stay between the bases and the apices
  # (pleural fluid is seen in the lower half).
  z = np.array([rng.uniform(0.15, 0.45) if fluid else rng.uniform(0.2, 0.85)]) * p.lung_h
  top = float(z[0] + rng.uniform(15, 60)) if fluid else None
  for _ in range(8):
    ph = _render(p, rng, size, fov_mm, z, slice_thickness, np.array([0]) if want else None,
                 int(rng.integers(2, 5)), top)
    # A lesion slice must show ground glass or consolidation, not only fluid.
    if not want or np.isin(ph.labels, (GROUND_GLASS, CONSOLIDATION)).any():
      return _to_display(ph, squeeze=True)
  raise RuntimeError("phantom: could not place a lesion in the lungs after 8 tries")


def generate_slice(rng: np.random.Generator, size: int, *, lesion: bool | None = None,
                   effusion: bool | None = None, fov_mm: float = 350.0,
                   slice_thickness: float = 5.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Simulates one axial chest-CT slice of a new patient (as each MedSeg `tr` slice is).

  Args:
    rng: source of all randomness (same generator state -> same arrays).
    size: rows = cols of the image (>= 32).
    lesion: True: at least one ground-glass or consolidation region; False: none (no effusion
      either); None: either, with probability 1/2.
    effusion: pleural fluid (label 3) in a lesion slice: True always, False never, None with
      probability 0.12.
    fov_mm: field of view; the pixel size is fov_mm / size.
    slice_thickness: slab integrated by the slice (partial volume of vessels and ribs), mm.

  Returns:
    hu (size, size) float32 Hounsfield units, labels (size, size) uint8 in {0, 1, 2, 3},
    lung (size, size) uint8 in {0, 1 right, 2 left}; display orientation (row 0 anterior,
    column 0 the patient's right).
  """
  return _simulate_slice(rng, size, lesion=lesion, effusion=effusion, fov_mm=fov_mm,
                         slice_thickness=slice_thickness)[:3]


def _simulate_volume(rng: np.random.Generator, size: int, num_slices: int, *,
                     lesion: bool | None = None, effusion: bool | None = None,
                     fov_mm: float = 350.0, slice_thickness: float = 5.0) -> Phantom:
  """One patient, contiguous slices; `generate_volume` plus the tissue map and slice heights."""
  _check_size(size)
  if not isinstance(num_slices, (int, np.integer)) or num_slices < 1:
    raise ValueError(f"phantom: num_slices must be a positive integer, got {num_slices!r}")
  if slice_thickness <= 0:
    raise ValueError(f"phantom: slice_thickness must be > 0 mm, got {slice_thickness!r}")
  if lesion is False and effusion:
    raise ValueError("phantom: effusion=True needs lesion=True or None (effusion is a finding)")
  p = _sample_patient(rng)
  infected = bool(rng.random() < 0.85) if lesion is None else bool(lesion)
  fluid = infected and (bool(rng.random() < 0.3) if effusion is None else bool(effusion))
  # The scan covers n * thickness mm; put it somewhere between the bases and the apices.
  extent = num_slices * slice_thickness
  lo, hi = -0.03 * p.lung_h, 1.03 * p.lung_h - extent
  z0 = rng.uniform(lo, hi) if hi > lo else 0.5 * (p.lung_h - extent)
  zs = z0 + (np.arange(num_slices) + 0.5) * slice_thickness
  # Lesions are seeded in a contiguous run of slices that show enough lung (a z-range of the
  # volume), so that about half of all slices stay lesion-free.
  inside = np.nonzero((zs > 0.12 * p.lung_h) & (zs < 0.9 * p.lung_h))[0]
  if infected and inside.size == 0:
    inside = np.array([int(np.argmin(np.abs(zs - 0.5 * p.lung_h)))])
  slices = None
  if infected:
    n = max(1, int(round(rng.uniform(0.3, 0.6) * inside.size)))
    start = int(rng.integers(0, inside.size - n + 1))
    slices = inside[start:start + n]
  n_clusters = int(rng.integers(1, 3)) + max(1, len(slices) // 3) if infected else 0
  top = float(rng.uniform(0.2, 0.5) * p.lung_h) if fluid else None
  ph = _render(p, rng, size, fov_mm, zs, slice_thickness, slices, n_clusters, top)
  return _to_display(ph, squeeze=False)


def generate_volume(rng: np.random.Generator, size: int, num_slices: int, *,
                    lesion: bool | None = None, effusion: bool | None = None,
                    fov_mm: float = 350.0,
                    slice_thickness: float = 5.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Simulates a contiguous stack of axial slices of one patient (as a MedSeg `rp` volume).

  Anatomy varies smoothly with z (lungs largest above the domes, round at the apices) and lesions
  are 3D blobs, so adjacent slices agree. Slice 0 is the most caudal.

  Args:
    rng: source of all randomness.
    size: rows = cols (>= 32).
    num_slices: Z.
    lesion: True: lesions seeded on a z-range of the volume; False: none; None: True with
      probability 0.85 (lesions cover only part of the z-range, so about half of all slices of a
      data set stay lesion-free).
    effusion: pleural fluid (label 3) at the bases of an infected patient: True always, False
      never, None with probability 0.3 (visible only if the volume reaches low enough).
    fov_mm: field of view, mm; slice_thickness: slice spacing = thickness, mm.

  Returns:
    hu (size, size, Z) float32 HU, labels (size, size, Z) uint8 in {0..3}, lung (size, size, Z)
    uint8 in {0, 1 right, 2 left}; display orientation.
  """
  return _simulate_volume(rng, size, num_slices, lesion=lesion, effusion=effusion,
                          fov_mm=fov_mm, slice_thickness=slice_thickness)[:3]


# --------------------------------------------------------------------------------------------
# Writing the MedSeg layout.
# --------------------------------------------------------------------------------------------


def affine_for(size: int, fov_mm: float, slice_thickness: float, z0_mm: float = 0.0) -> np.ndarray:
  """(4, 4) voxel-to-RAS affine of a stored (X, Y, Z) array of display images (size, size, Z).

  Stored X runs from the patient's right to left (display columns) and stored Y from posterior to
  anterior (display rows reversed), so the axis codes are ('L', 'A', 'S'); the image centre is
  at x = y = 0 and slice k at z0_mm + (k + 0.5) * slice_thickness.
  """
  px = fov_mm / size
  c = (size - 1) / 2 * px
  return np.array([[-px, 0, 0, c],
                   [0, px, 0, -c],
                   [0, 0, slice_thickness, z0_mm + 0.5 * slice_thickness],
                   [0, 0, 0, 1]], np.float64)



def _remove_stale(out: str, tr_slices: int, rp_volumes: int) -> None:
  """Deletes phantom files an earlier, larger phantom left that this one will not rewrite."""
  if not tr_slices:
    for name in (TR_IMAGE, TR_MASK, TR_LUNG):
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
  for folder in (RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR):
    path = os.path.join(out, folder)
    for name in os.listdir(path) if os.path.isdir(path) else ():
      stem = name[:-len(".nii.gz")] if name.endswith(".nii.gz") else ""
      if stem.isdigit() and int(stem) > rp_volumes:
        os.remove(os.path.join(path, name))


def write_medseg_phantom(out_dir: str | os.PathLike, *, tr_slices: int = 100, tr_size: int = 256,
                         rp_volumes: int = 9, rp_size: int = 320,
                         rp_slices: tuple[int, int] = (20, 40), tr_fov_mm: float = 350.0,
                         rp_fov_mm: tuple[float, float] = (330.0, 380.0),
                         slice_thickness: float = 5.0, seed: int = 0,
                         overwrite: bool = False) -> dict[str, Any]:
  """Writes a synthetic data set in the MedSeg COVID-19 CT segmentation layout.

  Files: tr_im / tr_mask / tr_lungmasks_updated .nii.gz (tr_size, tr_size, tr_slices), one
  independent patient per slice, exactly half of them with lesions; rp_im, rp_msk, rp_lung_msk
  /{1..rp_volumes}.nii.gz, one patient per volume of rp_size x rp_size x Z, Z drawn uniformly in
  rp_slices (inclusive), field of view drawn in rp_fov_mm, 15% of the patients (rounded)
  lesion-free and the others with lesions on part of their z-range; phantom.json (parameters,
  seed, per-file summary, fraction of slices without any label). Images: tr float32 HU (MedSeg's
  tr_im is float), rp int16 HU (as the Radiopaedia volumes); masks uint8. Every array is
  `to_storage(display)`. Each file is written under a temporary name and renamed; phantom.json
  is written last, so its presence marks a complete set. The same arguments give the same
  arrays.

  Args:
    out_dir: target folder (created). If it exists and is not empty, `overwrite` must be True.
    tr_slices, tr_size: number and size of the single-slice patients (0 slices: no tr files).
    rp_volumes, rp_size, rp_slices: number, in-plane size and slice-count range of the volumes.
    tr_fov_mm, rp_fov_mm: fields of view (pixel size = fov / size).
    slice_thickness: slice thickness = spacing of the volumes (and z zoom of tr), mm.
    seed: everything follows from it.
    overwrite: replace the phantom files of an existing non-empty folder.

  Returns:
    The summary also stored in phantom.json.

  Raises:
    FileExistsError: out_dir is not empty and overwrite is False.
    ValueError: a parameter out of range (message names it).
  """
  out = os.fspath(out_dir)
  if tr_slices < 0 or rp_volumes < 0 or tr_slices + rp_volumes == 0:
    raise ValueError(f"phantom: nothing to write to {out}: tr_slices={tr_slices}, "
                     f"rp_volumes={rp_volumes}")
  if tr_slices:
    _check_size(tr_size, "tr_size")
  if rp_volumes:
    _check_size(rp_size, "rp_size")
  rp_lo, rp_hi = (int(v) for v in rp_slices)
  if not 1 <= rp_lo <= rp_hi:
    raise ValueError(f"phantom: rp_slices must be (min, max) with 1 <= min <= max, got {rp_slices}")
  if slice_thickness <= 0 or tr_fov_mm <= 0 or min(rp_fov_mm) <= 0 or rp_fov_mm[0] > rp_fov_mm[1]:
    raise ValueError(f"phantom: slice_thickness and fields of view must be > 0 (fov ranges "
                     f"ordered), got {slice_thickness}, {tr_fov_mm}, {rp_fov_mm}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"{out}: exists and is not a folder")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"{out}: folder is not empty; pass overwrite=True to replace the phantom")
  os.makedirs(out, exist_ok=True)
  # The provenance file marks completion; remove it first so an interrupted overwrite does not
  # look like a complete set.
  if os.path.exists(os.path.join(out, PROVENANCE)):
    os.remove(os.path.join(out, PROVENANCE))
  _remove_stale(out, tr_slices, rp_volumes)

  t_start = time.perf_counter()
  params = dict(tr_slices=tr_slices, tr_size=tr_size, rp_volumes=rp_volumes, rp_size=rp_size,
                rp_slices=[rp_lo, rp_hi], tr_fov_mm=tr_fov_mm, rp_fov_mm=list(rp_fov_mm),
                slice_thickness=slice_thickness, seed=seed)
  tr_seq, rp_seq = np.random.SeedSequence([GENERATOR_VERSION, seed]).spawn(2)
  summary: dict[str, Any] = {"generator": "tvunet_jax.phantom", "version": GENERATOR_VERSION,
                             "params": params, "files": {}}

  if tr_slices:
    flag_seq, *slice_seqs = tr_seq.spawn(tr_slices + 1)
    flags = np.arange(tr_slices) < (tr_slices + 1) // 2  # exactly half (rounded up) with lesions
    np.random.default_rng(flag_seq).shuffle(flags)
    outs = [_simulate_slice(np.random.default_rng(s), tr_size, lesion=bool(f), fov_mm=tr_fov_mm,
                            slice_thickness=slice_thickness)
            for s, f in zip(slice_seqs, flags)]
    aff = affine_for(tr_size, tr_fov_mm, slice_thickness)
    hu = np.stack([o.hu for o in outs], -1)
    labels = np.stack([o.labels for o in outs], -1)
    lung = np.stack([o.lung for o in outs], -1)
    nifti_io.save_volume(to_storage(hu), aff, os.path.join(out, TR_IMAGE))
    nifti_io.save_volume(to_storage(labels), aff, os.path.join(out, TR_MASK))
    nifti_io.save_volume(to_storage(lung), aff, os.path.join(out, TR_LUNG))
    summary["files"]["tr"] = _describe(labels, tr_size, tr_fov_mm, slice_thickness)

  # As in tr, the share of lesion-free patients is fixed rather than drawn, so that a small set
  # does not end up far from half lesion-free slices by chance.
  flag_seq, *vol_seqs = rp_seq.spawn(rp_volumes + 1)
  infected = np.arange(rp_volumes) >= int(round(0.15 * rp_volumes))
  np.random.default_rng(flag_seq).shuffle(infected)
  for n, (s, flag) in enumerate(zip(vol_seqs, infected), start=1):
    rng = np.random.default_rng(s)
    num = int(rng.integers(rp_lo, rp_hi + 1))
    fov = float(rng.uniform(*rp_fov_mm))
    ph = _simulate_volume(rng, rp_size, num, lesion=bool(flag), fov_mm=fov,
                          slice_thickness=slice_thickness)
    aff = affine_for(rp_size, fov, slice_thickness, float(ph.z_mm[0]) - 0.5 * slice_thickness)
    hu = np.round(ph.hu).astype(np.int16)
    for folder, arr in ((RP_IMAGE_DIR, hu), (RP_MASK_DIR, ph.labels), (RP_LUNG_DIR, ph.lung)):
      nifti_io.save_volume(to_storage(arr), aff, os.path.join(out, folder, f"{n}.nii.gz"))
    summary["files"][f"rp/{n}"] = _describe(ph.labels, rp_size, fov, slice_thickness)

  summary["lesion_free_fraction"] = _lesion_free_fraction(summary["files"].values())
  summary["seconds"] = round(time.perf_counter() - t_start, 2)
  nifti_io.write_text_atomic(os.path.join(out, PROVENANCE), json.dumps(summary, indent=1) + "\n")
  return summary


def _describe(labels: np.ndarray, size: int, fov: float, thickness: float) -> dict[str, Any]:
  per_slice = labels.reshape(-1, labels.shape[-1])
  return {"shape": [size, size, int(labels.shape[-1])],
          "pixel_mm": round(fov / size, 6), "slice_mm": thickness,
          "slices_with_lesion": int(np.count_nonzero((per_slice > 0).any(0))),
          "voxels_per_label": [int(np.count_nonzero(labels == v)) for v in range(4)]}


def _lesion_free_fraction(described) -> float:
  total = lesion = 0
  for d in described:
    total += d["shape"][2]
    lesion += d["slices_with_lesion"]
  return round(1 - lesion / max(total, 1), 4)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: writes the phantom folder and prints its summary."""
  ap = argparse.ArgumentParser(prog="python -m tvunet_jax.phantom",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="output folder (MedSeg layout)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tr-slices", type=int, default=100)
  ap.add_argument("--tr-size", type=int, default=256)
  ap.add_argument("--rp-volumes", type=int, default=9)
  ap.add_argument("--rp-size", type=int, default=320)
  ap.add_argument("--rp-min-slices", type=int, default=20)
  ap.add_argument("--rp-max-slices", type=int, default=40)
  ap.add_argument("--slice-thickness", type=float, default=5.0, help="mm")
  ap.add_argument("--tr-fov", type=float, default=350.0, help="tr field of view, mm")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing phantom")
  args = ap.parse_args(argv)
  try:
    summary = write_medseg_phantom(
        args.out, tr_slices=args.tr_slices, tr_size=args.tr_size, rp_volumes=args.rp_volumes,
        rp_size=args.rp_size, rp_slices=(args.rp_min_slices, args.rp_max_slices),
        tr_fov_mm=args.tr_fov, slice_thickness=args.slice_thickness, seed=args.seed,
        overwrite=args.overwrite)
  except (FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: summary[k] for k in ("params", "lesion_free_fraction", "seconds")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
