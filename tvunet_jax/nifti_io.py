"""NIfTI volumes in and out: validated reads and atomic writes.

This module owns the file boundary for CT volumes, including MedSeg's storage orientation, and the
atomic write used for every small text output (JSON reports, markdown tables). Every reader in the project (the TFDS builder,
inference) goes through `load_volume`, so a missing, truncated, non-NIfTI, non-3D or non-finite file
stops with one `VolumeError` line naming the file and the problem. Every writer goes through
`save_volume`, which writes to a temporary name beside the target and renames it, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from typing import NamedTuple

import nibabel as nib
import numpy as np


# MedSeg stores each slice rotated by 90 degrees relative to the radiological display (row 0
# anterior, column 0 the patient's right). `display = np.rot90(stored, k=STORAGE_ROT90_K)` over
# the first two axes; the phantom writes the same quirk so one reader serves both.
STORAGE_ROT90_K = 1

# The MedSeg download's file layout, shared by the phantom writer and the TFDS builder.
TR_IMAGE, TR_MASK, TR_LUNG = "tr_im.nii.gz", "tr_mask.nii.gz", "tr_lungmasks_updated.nii.gz"
RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR = "rp_im", "rp_msk", "rp_lung_msk"


def from_storage(stored: np.ndarray) -> np.ndarray:
  """(X, Y, ...) array as stored in MedSeg files -> (rows, cols, ...) display orientation."""
  return np.rot90(stored, k=STORAGE_ROT90_K, axes=(0, 1))


def to_storage(display: np.ndarray) -> np.ndarray:
  """(rows, cols, ...) display orientation -> (X, Y, ...) as MedSeg stores it; inverse of above."""
  return np.rot90(display, k=-STORAGE_ROT90_K, axes=(0, 1))


class VolumeError(ValueError):
  """A CT volume or mask file that cannot be used; the message names the file."""


class Volume(NamedTuple):
  data: np.ndarray  # (X, Y, Z) as stored on disk, dtype as requested.
  affine: np.ndarray  # (4, 4) float64 voxel-to-world (RAS+ mm).
  zooms: tuple[float, float, float]  # voxel size in mm along X, Y, Z.


def load_volume(path: str | os.PathLike, *, dtype=np.float32, check_finite: bool = True) -> Volume:
  """Reads a 3D NIfTI file (`.nii` or `.nii.gz`) fully into memory.

  Args:
    path: the file.
    dtype: dtype of the returned array (float32 for HU images, uint8 for label maps).
    check_finite: reject NaN/inf voxels (images); label maps are checked for integrality instead
      when `dtype` is an integer type.

  Returns:
    `Volume(data (X, Y, Z) dtype, affine (4, 4), zooms (3,))`.

  Raises:
    VolumeError: one line naming the file: missing, not NIfTI, truncated, not 3D, non-finite, or
      non-integer labels.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VolumeError(f"{path}: file not found")
  try:
    img = nib.load(path)
  except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, gzip.BadGzipFile,
          ValueError) as e:
    raise VolumeError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise VolumeError(f"{path}: not a NIfTI image (got {type(img).__name__})")
  shape = img.shape
  # A trailing singleton 4th axis is how some tools save a 3D volume; anything else is not a volume.
  if len(shape) == 4 and shape[3] == 1:
    squeeze = True
  elif len(shape) != 3:
    raise VolumeError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
  else:
    squeeze = False
  try:
    raw = np.asanyarray(img.dataobj)
  except (EOFError, OSError, zlib.error, ValueError) as e:
    raise VolumeError(f"{path}: truncated or corrupt data ({type(e).__name__}: {e})") from None
  if squeeze:
    raw = raw[..., 0]
  if np.issubdtype(np.dtype(dtype), np.integer):
    if not np.all(np.isfinite(raw)) or not np.array_equal(raw, np.round(raw)):
      raise VolumeError(f"{path}: label map has non-integer or non-finite values")
    data = raw.astype(dtype)
  else:
    data = np.asarray(raw, dtype=dtype)
    if check_finite and not np.all(np.isfinite(data)):
      n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
      raise VolumeError(f"{path}: {n} NaN/inf voxels")
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  return Volume(data, np.asarray(img.affine, dtype=np.float64), zooms)


def save_volume(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
  """Writes `data` (X, Y, Z) with `affine` (4, 4) to `path` atomically (temp file, then rename).

  The dtype of `data` is kept (uint8 masks, int16 or float32 HU). The header's voxel sizes follow
  from the affine.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private to the writer
  try:
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder and a rename."""
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                     f".tmp-{os.getpid()}-{os.path.basename(path)}")
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
