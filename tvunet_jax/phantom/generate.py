"""The phantom's public generators: one slice of a new patient, or a volume of one patient.

This module owns how a scan is chosen (which patient, which heights, whether and where lesions
and fluid appear) and the arrays it hands out, in display orientation (rows, cols[, Z]): row 0
anterior, column 0 the patient's right, slice 0 the most caudal.
"""

from __future__ import annotations

import numpy as np

from tvunet_jax.phantom.anatomy import _sample_patient
from tvunet_jax.phantom.lesions import CONSOLIDATION, GROUND_GLASS
from tvunet_jax.phantom.render import Phantom, _render


def _to_display(ph: Phantom, squeeze: bool) -> Phantom:
  """(Z, H, W) internal layout -> (H, W, Z) display layout, or (H, W) when `squeeze`."""
  if squeeze:
    return Phantom(ph.hu[0], ph.labels[0], ph.lung[0], ph.tissue[0], ph.z_mm)
  return Phantom(*(np.ascontiguousarray(np.moveaxis(v, 0, -1)) for v in ph[:4]), ph.z_mm)


def _check_size(size: int, what: str = "size") -> None:
  if not isinstance(size, (int, np.integer)) or size < 32:
    raise ValueError(f"phantom: {what} must be an integer >= 32, got {size!r}")


def _simulate_slice(
  rng: np.random.Generator,
  size: int,
  *,
  lesion: bool | None = None,
  effusion: bool | None = None,
  fov_mm: float = 350.0,
  slice_thickness: float = 5.0,
) -> Phantom:
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
    ph = _render(
      p,
      rng,
      size,
      fov_mm,
      z,
      slice_thickness,
      np.array([0]) if want else None,
      int(rng.integers(2, 5)),
      top,
    )
    # A lesion slice must show ground glass or consolidation, not only fluid.
    if not want or np.isin(ph.labels, (GROUND_GLASS, CONSOLIDATION)).any():
      return _to_display(ph, squeeze=True)
  raise RuntimeError("phantom: could not place a lesion in the lungs after 8 tries")


def generate_slice(
  rng: np.random.Generator,
  size: int,
  *,
  lesion: bool | None = None,
  effusion: bool | None = None,
  fov_mm: float = 350.0,
  slice_thickness: float = 5.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
  return _simulate_slice(
    rng, size, lesion=lesion, effusion=effusion, fov_mm=fov_mm, slice_thickness=slice_thickness
  )[:3]


def _simulate_volume(
  rng: np.random.Generator,
  size: int,
  num_slices: int,
  *,
  lesion: bool | None = None,
  effusion: bool | None = None,
  fov_mm: float = 350.0,
  slice_thickness: float = 5.0,
) -> Phantom:
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
    slices = inside[start : start + n]
  n_clusters = int(rng.integers(1, 3)) + max(1, len(slices) // 3) if infected else 0
  top = float(rng.uniform(0.2, 0.5) * p.lung_h) if fluid else None
  ph = _render(p, rng, size, fov_mm, zs, slice_thickness, slices, n_clusters, top)
  return _to_display(ph, squeeze=False)


def generate_volume(
  rng: np.random.Generator,
  size: int,
  num_slices: int,
  *,
  lesion: bool | None = None,
  effusion: bool | None = None,
  fov_mm: float = 350.0,
  slice_thickness: float = 5.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
  return _simulate_volume(
    rng,
    size,
    num_slices,
    lesion=lesion,
    effusion=effusion,
    fov_mm=fov_mm,
    slice_thickness=slice_thickness,
  )[:3]
