"""Rendering a simulated patient into CT slices in Hounsfield units, with labels and lung masks.

This module owns the step from millimetres to pixels: the pixel grid, the body wall, couch and
spine of a slice, the per-slice anatomy, correlated texture, the compositing of tubes (drawn by
`tubes._draw_tubes`), lesions and effusion, scanner blur and noise (`_render`). Arrays here are
(Z, H, W) with row 0 anterior and column 0 the patient's right; `generate` moves them to the
display layout.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from tvunet_jax.phantom.anatomy import Tissue, _cavity_parts, _ellipse, _level, _Patient
from tvunet_jax.phantom.lesions import (
  CONSOLIDATION,
  GROUND_GLASS,
  PLEURAL_EFFUSION,
  _blob_fields,
  _effusion,
  _plan_lesions,
)
from tvunet_jax.phantom.tubes import _draw_tubes

# CT numbers are clipped to what a 12-bit scanner stores.
HU_MIN, HU_MAX = -1024.0, 3071.0


class Phantom(NamedTuple):
  """Rendered phantom, display orientation; (H, W) for a slice, (H, W, Z) for a volume."""

  hu: np.ndarray  # float32 Hounsfield units
  labels: np.ndarray  # uint8 in {0, 1, 2, 3}
  lung: np.ndarray  # uint8 in {0, 1 right, 2 left}
  tissue: np.ndarray  # uint8 `Tissue` values before blur and noise
  z_mm: np.ndarray  # (Z,) float32 slice centres, mm above the lowest point of the lungs


def _axes(size: int, fov_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
  """Pixel-centre coordinates (mm) of columns (x) and rows (y), and the pixel size."""
  px = fov_mm / size
  ax = ((np.arange(size) - (size - 1) / 2) * px).astype(np.float32)
  return ax, ax.copy(), px


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
  y_tab = yc + b_post + 3 + 0.0006 * x**2
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
  lung_hu = np.broadcast_to(hu_of["lung"] + hu_of["lung_grad"] * t_ap**2, shape)
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
  return _Frame(
    tissue,
    hu,
    cage,
    ring,
    cavity,
    lung_hu.astype(np.float32),
    vbody,
    canal,
    (arch | spinous | transverse) & body,
    sternum,
    muscle & ~cage & (sw > 0.35) & (sw < 0.5) & (theta < 0.42),
    theta,
  )


class _Slice(NamedTuple):
  tissue: np.ndarray  # (H, W) uint8
  hu: np.ndarray  # (H, W) float32
  side: np.ndarray  # (H, W) uint8 lung side 0/1/2


def _anatomy_slice(
  p: _Patient,
  fr: _Frame,
  x: np.ndarray,
  y: np.ndarray,
  z: float,
  med_cov: np.ndarray,
  big_wall_cov: np.ndarray,
  rib_cov: np.ndarray,
  cart_cov: np.ndarray,
) -> _Slice:
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


def _smooth_noise(
  rng: np.random.Generator, nz: int, h: int, w: int, cell_px: float, z_sigma: float
) -> np.ndarray:
  """Band-limited Gaussian noise (Z, H, W) float32, unit std, correlation ~cell_px pixels."""
  f = max(1, int(round(cell_px)))
  lo = rng.standard_normal((nz, h // f + 3, w // f + 3)).astype(np.float32)
  lo = ndimage.gaussian_filter(lo, (z_sigma if nz > 1 else 0.0, 1.0, 1.0), mode="nearest")
  up = _upsample(lo, f, h, w)
  # Bilinear interpolation lowers the variance; normalise after it.
  return up / max(float(up.std()), 1e-6)


def _render(
  p: _Patient,
  rng: np.random.Generator,
  size: int,
  fov_mm: float,
  zs: np.ndarray,
  slice_thickness: float,
  lesion_slices: np.ndarray | None,
  n_clusters: int,
  effusion_top: float | None,
) -> Phantom:
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
    tissue[k], hu[k], side[k] = _anatomy_slice(
      p, fr, x, y, float(z), med[k], big_wall[k], ribs[k], cart[k]
    )
  cavity = np.broadcast_to(fr.cavity, hu.shape)
  lung = side > 0
  z_sigma = 10.0 / slice_thickness
  tex = _smooth_noise(rng, nz, size, size, 6.0 / px, z_sigma)
  hu[lung] += 12.0 * tex[lung]

  # Lesions.
  labels = np.zeros((nz, size, size), np.uint8)
  a_cons = cons_tex = None
  if lesion_slices is not None and len(lesion_slices):
    blobs = _plan_lesions(
      rng, lung, x_ax, y_ax, zs, half, px, lesion_slices, n_clusters, p_cons=0.4
    )
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
  eff = (
    _effusion(rng, side, y_ax, zs, px, effusion_top)
    if effusion_top is not None
    else np.zeros_like(lung)
  )
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
