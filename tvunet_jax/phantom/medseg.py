"""Synthetic chest-CT phantom written in the MedSeg "COVID-19 CT segmentation" file layout.

This module owns the phantom's files: it writes simulated patients exactly as MedSeg ships its
data, with the provenance file that marks a complete set, and the command line:

  tr_im.nii.gz, tr_mask.nii.gz, tr_lungmasks_updated.nii.gz   (H, W, 100): one patient per slice
  rp_im/{1..9}.nii.gz, rp_msk/{1..9}.nii.gz, rp_lung_msk/{1..9}.nii.gz   whole volumes
  phantom.json                                                 generator parameters (provenance)

Masks: 0 background, 1 ground-glass, 2 consolidation, 3 pleural effusion. Lung masks: 1 right lung,
2 left lung. The lung mask is the lung field as the pleura bounds it, so it contains vessels,
lesions and the pleural effusion (label 3 sits in the space the lung occupied); labels 1-3 are
always inside it.

Coordinates: the generators return display orientation (rows, cols[, Z]); files hold
`to_storage(display)` with an affine whose axis codes are ('L', 'A', 'S') and whose zooms are
(pixel, pixel, slice) mm.

  python -m tvunet_jax.phantom --out data/medseg_phantom [--seed 0] [--tr-slices 100] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tvunet_jax import atomic, nifti_io, volumes
from tvunet_jax.phantom.generate import _check_size, _simulate_slice, _simulate_volume

# The storage rotation lives in volumes (the one orientation rule every reader uses); re-exported
# here so the writer and its readers cannot disagree. For (X, Y, Z) stored / (rows, cols, Z)
# display:
#   display = np.rot90(stored, k=STORAGE_ROT90_K, axes=(0, 1))
STORAGE_ROT90_K = volumes.STORAGE_ROT90_K
to_storage = volumes.to_storage
from_storage = volumes.from_storage

TR_IMAGE, TR_MASK, TR_LUNG = nifti_io.TR_IMAGE, nifti_io.TR_MASK, nifti_io.TR_LUNG
RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR = (
  nifti_io.RP_IMAGE_DIR,
  nifti_io.RP_MASK_DIR,
  nifti_io.RP_LUNG_DIR,
)
PROVENANCE = "phantom.json"
GENERATOR_VERSION = 2  # bump when the same seed would produce different arrays


def affine_for(size: int, fov_mm: float, slice_thickness: float, z0_mm: float = 0.0) -> np.ndarray:
  """(4, 4) voxel-to-RAS affine of a stored (X, Y, Z) array of display images (size, size, Z).

  Stored X runs from the patient's right to left (display columns) and stored Y from posterior to
  anterior (display rows reversed), so the axis codes are ('L', 'A', 'S'); the image centre is
  at x = y = 0 and slice k at z0_mm + (k + 0.5) * slice_thickness.
  """
  px = fov_mm / size
  c = (size - 1) / 2 * px
  return np.array(
    [
      [-px, 0, 0, c],
      [0, px, 0, -c],
      [0, 0, slice_thickness, z0_mm + 0.5 * slice_thickness],
      [0, 0, 0, 1],
    ],
    np.float64,
  )


def _remove_stale(out: str, tr_slices: int, rp_volumes: int) -> None:
  """Deletes phantom files an earlier, larger phantom left that this one will not rewrite."""
  if not tr_slices:
    for name in (TR_IMAGE, TR_MASK, TR_LUNG):
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
  for folder in (RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR):
    path = os.path.join(out, folder)
    for name in os.listdir(path) if os.path.isdir(path) else ():
      stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else ""
      if stem.isdigit() and int(stem) > rp_volumes:
        os.remove(os.path.join(path, name))


def write_medseg_phantom(
  out_dir: str | os.PathLike,
  *,
  tr_slices: int = 100,
  tr_size: int = 256,
  rp_volumes: int = 9,
  rp_size: int = 320,
  rp_slices: tuple[int, int] = (20, 40),
  tr_fov_mm: float = 350.0,
  rp_fov_mm: tuple[float, float] = (330.0, 380.0),
  slice_thickness: float = 5.0,
  seed: int = 0,
  overwrite: bool = False,
) -> dict[str, Any]:
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
    raise ValueError(
      f"phantom: nothing to write to {out}: tr_slices={tr_slices}, rp_volumes={rp_volumes}"
    )
  if tr_slices:
    _check_size(tr_size, "tr_size")
  if rp_volumes:
    _check_size(rp_size, "rp_size")
  rp_lo, rp_hi = (int(v) for v in rp_slices)
  if not 1 <= rp_lo <= rp_hi:
    raise ValueError(f"phantom: rp_slices must be (min, max) with 1 <= min <= max, got {rp_slices}")
  if slice_thickness <= 0 or tr_fov_mm <= 0 or min(rp_fov_mm) <= 0 or rp_fov_mm[0] > rp_fov_mm[1]:
    raise ValueError(
      f"phantom: slice_thickness and fields of view must be > 0 (fov ranges "
      f"ordered), got {slice_thickness}, {tr_fov_mm}, {rp_fov_mm}"
    )
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
  params = dict(
    tr_slices=tr_slices,
    tr_size=tr_size,
    rp_volumes=rp_volumes,
    rp_size=rp_size,
    rp_slices=[rp_lo, rp_hi],
    tr_fov_mm=tr_fov_mm,
    rp_fov_mm=list(rp_fov_mm),
    slice_thickness=slice_thickness,
    seed=seed,
  )
  tr_seq, rp_seq = np.random.SeedSequence([GENERATOR_VERSION, seed]).spawn(2)
  summary: dict[str, Any] = {
    "generator": "tvunet_jax.phantom",
    "version": GENERATOR_VERSION,
    "params": params,
    "files": {},
  }

  if tr_slices:
    flag_seq, *slice_seqs = tr_seq.spawn(tr_slices + 1)
    flags = np.arange(tr_slices) < (tr_slices + 1) // 2  # exactly half (rounded up) with lesions
    np.random.default_rng(flag_seq).shuffle(flags)
    outs = [
      _simulate_slice(
        np.random.default_rng(s),
        tr_size,
        lesion=bool(f),
        fov_mm=tr_fov_mm,
        slice_thickness=slice_thickness,
      )
      for s, f in zip(slice_seqs, flags)
    ]
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
    ph = _simulate_volume(
      rng, rp_size, num, lesion=bool(flag), fov_mm=fov, slice_thickness=slice_thickness
    )
    aff = affine_for(rp_size, fov, slice_thickness, float(ph.z_mm[0]) - 0.5 * slice_thickness)
    hu = np.round(ph.hu).astype(np.int16)
    for folder, arr in ((RP_IMAGE_DIR, hu), (RP_MASK_DIR, ph.labels), (RP_LUNG_DIR, ph.lung)):
      nifti_io.save_volume(to_storage(arr), aff, os.path.join(out, folder, f"{n}.nii.gz"))
    summary["files"][f"rp/{n}"] = _describe(ph.labels, rp_size, fov, slice_thickness)

  summary["lesion_free_fraction"] = _lesion_free_fraction(summary["files"].values())
  summary["seconds"] = round(time.perf_counter() - t_start, 2)
  atomic.write_text(os.path.join(out, PROVENANCE), json.dumps(summary, indent=1) + "\n")
  return summary


def _describe(labels: np.ndarray, size: int, fov: float, thickness: float) -> dict[str, Any]:
  per_slice = labels.reshape(-1, labels.shape[-1])
  return {
    "shape": [size, size, int(labels.shape[-1])],
    "pixel_mm": round(fov / size, 6),
    "slice_mm": thickness,
    "slices_with_lesion": int(np.count_nonzero((per_slice > 0).any(0))),
    "voxels_per_label": [int(np.count_nonzero(labels == v)) for v in range(4)],
  }


def _lesion_free_fraction(described) -> float:
  total = lesion = 0
  for d in described:
    total += d["shape"][2]
    lesion += d["slices_with_lesion"]
  return round(1 - lesion / max(total, 1), 4)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: writes the phantom folder and prints its summary."""
  ap = argparse.ArgumentParser(
    prog="python -m tvunet_jax.phantom", description=__doc__.split("\n")[0]
  )
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
      args.out,
      tr_slices=args.tr_slices,
      tr_size=args.tr_size,
      rp_volumes=args.rp_volumes,
      rp_size=args.rp_size,
      rp_slices=(args.rp_min_slices, args.rp_max_slices),
      tr_fov_mm=args.tr_fov,
      slice_thickness=args.slice_thickness,
      seed=args.seed,
      overwrite=args.overwrite,
    )
  except (FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: summary[k] for k in ("params", "lesion_free_fraction", "seconds")}))
  return 0
