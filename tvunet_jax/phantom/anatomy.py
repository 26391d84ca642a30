"""The simulated patient: body wall, ribs, spine, mediastinum, heart, lungs and their trees.

This module owns the patient model of the phantom: one random draw of shapes, positions and CT
numbers (`_sample_patient`), the thoracic cavity and the lung field it leaves
(`_cavity_parts`), the ribs, great vessels, and the pulmonary vessel and airway trees (grown by
`tubes._territory_trees`). It knows no pixels: everything is in millimetres;
x grows toward the patient's left (display right), y toward posterior (display down), z toward
the head; z = 0 is the lowest point of the lungs. Lung labels: 1 right lung, 2 left lung.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

import numpy as np

from tvunet_jax.phantom.tubes import _territory_trees, _Tubes

# MedSeg lung-mask values.
RIGHT_LUNG, LEFT_LUNG = 1, 2


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


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _level(
  x,
  y,
  cx: float,
  cy: float,
  a: float,
  b_ant: float,
  b_post: float,
  shape_p: tuple[float, float, float],
) -> np.ndarray:
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
  side = np.where(
    field & (x < p.x_mc) & env_r, RIGHT_LUNG, np.where(field & (x >= p.x_mc) & env_l, LEFT_LUNG, 0)
  ).astype(np.uint8)
  upper_wall = field & (side == 0) & (z > z_env)
  return _Cavity(cavity, organs[0], organs[1], peri, heart, side, upper_wall)


def _sample_lung_points(
  rng: np.random.Generator, p: _Patient, n: int
) -> tuple[np.ndarray, np.ndarray]:
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
  dims = (
    a - p.fat[0] - p.muscle[0] - inset,
    b_ant - p.fat[1] - p.muscle[1] - inset,
    b_post - p.fat[2] - p.muscle[2] - inset,
  )
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
  for x, y in ((xs[: len(t)], ys[: len(t)]), (xs[len(t) :], ys[len(t) :])):
    for zk in z0:
      z = zk - drop * t**1.15
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
  domes = (
    (-0.36 * ca, cav_ant + 0.45 * cav_h, z_dome_r, 0.68 * ca, 0.5 * cav_h, dome_h),
    (0.42 * ca, cav_ant + 0.45 * cav_h, z_dome_l, 0.6 * ca, 0.46 * cav_h, dome_h),
  )
  hrx, hry, hrz = u(55, 68), u(40, 50), u(52, 62)
  heart = (
    u(14, 26),
    cav_ant + hry + u(2, 10),
    z_dome_l + u(28, 42),
    hrx,
    hry,
    hrz,
    u(-0.75, -0.45),
  )
  hu = {
    "fat": u(-110, -90),
    "muscle": u(44, 58),
    "soft": u(34, 46),
    "liver": u(52, 64),
    "skin": u(20, 40),
    "cartilage": u(100, 140),
    "disc": u(70, 95),
    "canal": u(25, 35),
    "bone": u(430, 520),
    "cortex": u(850, 1000),
    "lung": u(-895, -855),
    "lung_grad": u(40, 80),
    "vessel": u(35, 50),
    "air": -1000.0,
    "ggo": u(-620, -450),
    "cons": u(-40, 25),
    "effusion": u(3, 17),
    "table": u(60, 140),
  }
  p = _Patient(
    yc=yc,
    body=(a, b_ant, b_post),
    fat=fat,
    muscle=muscle,
    rib_t=rib_t,
    shape_p=shape_p,
    lung_h=lung_h,
    x_mc=u(2, 8),
    med_w=(u(1.5, 4), u(11, 15)),
    heart=heart,
    domes=domes,
    envelope=(0.42 * ca, cav_ant + 0.55 * cav_h, 0.72 * ca, 0.62 * cav_h, u(0.3, 0.42) * lung_h),
    vb=(y_vb, r_vb),
    disc_phase=u(0, 26),
    scapula=bool(rng.random() < 0.85),
    hu=hu,
    noise_sd=u(10, 20),
  )
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
  p.tubes = _Tubes.of(
    [
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
    ]
  )
  # Trachea and main bronchi (air), from the carina to the hila.
  y_tr = y_es - u(18, 22)
  z_car = z_hil + u(8, 16)
  tr_r = u(7.5, 9.5)
  big = [
    ((0, y_tr, z_car), (0, y_tr + 3, top), tr_r),
    ((0, y_tr, z_car), (hil_r[0] * 0.85, y_h + 10, z_hil - 10), tr_r * 0.72),
    ((0, y_tr, z_car), (hil_l[0] * 0.85, y_h + 12, z_hil - 2), tr_r * 0.65),
  ]
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
  p.vessels, gen, tid = _territory_trees(
    rng, pts, tree, np.stack([hil_r, hil_l, vein_r, vein_l]), r_leaf=u(0.5, 0.6)
  )
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
