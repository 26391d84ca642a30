"""NIfTI volumes in and out: validated reads and atomic, header-keeping writes.

This module owns the file boundary for CT volumes. Every reader in the project (the TFDS builder,
inference) goes through `load_volume`, so a missing, truncated, non-NIfTI, non-3D, non-finite file
or a label outside its integer type stops with one `VolumeError` line naming the file and the
problem. Every writer goes through `save_volume` (through `atomic.replacing`), so a crash never
leaves a half-written file under the final name; given the input's header it keeps its geometry
(qform and sform matrices and codes, pixdim, units), so outputs open aligned with their input in
any viewer, whichever of the two transforms it prefers.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import NamedTuple

import nibabel as nib
import numpy as np

from tvunet_jax import atomic

# The MedSeg download's file layout, shared by the phantom writer and the TFDS builder.
TR_IMAGE, TR_MASK, TR_LUNG = "tr_im.nii.gz", "tr_mask.nii.gz", "tr_lungmasks_updated.nii.gz"
RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR = "rp_im", "rp_msk", "rp_lung_msk"


class VolumeError(ValueError):
  """A CT volume or mask file that cannot be used; the message names the file."""


# NIfTI intent codes of the outputs: a label map, and no intent (plain values) for probabilities.
INTENT_LABEL = "label"
INTENT_NONE = "none"


class Volume(NamedTuple):
  data: np.ndarray  # (X, Y, Z) as stored on disk, dtype as requested.
  affine: np.ndarray  # (4, 4) float64 voxel-to-world (RAS+ mm).
  zooms: tuple[float, float, float]  # voxel size in mm along X, Y, Z.
  header: nib.Nifti1Header | None = None  # the file's header (geometry to keep on outputs)
  file_shape: tuple[int, ...] = ()  # the file's own shape (a trailing singleton axis kept)


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
    VolumeError: one line naming the file: missing, not NIfTI, truncated, not 3D, non-finite,
      non-integer labels, or a label that does not fit `dtype` (negative, or above its maximum).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VolumeError(f"{path}: file not found")
  try:
    img = nib.load(path)
  except (
    nib.filebasedimages.ImageFileError,
    EOFError,
    OSError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
  ) as e:
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
    # A cast would wrap (-1 -> 255 in uint8): a label the type cannot hold is refused instead.
    info = np.iinfo(np.dtype(dtype))
    lo, hi = (raw.min(), raw.max()) if raw.size else (0, 0)
    if lo < max(info.min, 0) or hi > info.max:
      bad = lo if lo < max(info.min, 0) else hi
      raise VolumeError(
        f"{path}: label value {bad:g} outside {max(info.min, 0)}..{info.max} "
        f"({np.dtype(dtype).name} labels)"
      )
    data = raw.astype(dtype)
  else:
    data = np.asarray(raw, dtype=dtype)
    if check_finite and not np.all(np.isfinite(data)):
      n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
      raise VolumeError(f"{path}: {n} NaN/inf voxels")
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  return Volume(
    data,
    np.asarray(img.affine, dtype=np.float64),
    zooms,
    img.header.copy(),
    tuple(int(s) for s in shape),
  )


def save_volume(
  data: np.ndarray,
  affine: np.ndarray,
  path: str | os.PathLike,
  *,
  like: nib.Nifti1Header | None = None,
  intent: str = INTENT_NONE,
) -> None:
  """Writes `data` (X, Y, Z) with `affine` (4, 4) to `path` atomically (temp file, then rename).

  The dtype of `data` is kept (uint8 masks, int16 or float32 HU), with no intensity scaling.
  With `like` (the input's header), the output carries the input's qform and sform (matrices and
  codes), pixdim and units; `affine` is then only checked against it. Without it, the affine
  becomes the sform and qform (code "aligned"), the voxel sizes follow from it, units mm.

  Args:
    intent: the NIfTI intent ("label" for masks, "none" for images and probabilities).
  """
  data = np.asarray(data)
  affine = np.asarray(affine, dtype=np.float64)
  if like is None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
  else:
    hdr = like.copy()
    img = nib.Nifti1Image(data, None, header=hdr)
    # The constructor resets the transforms from the header only partly; set both explicitly so
    # their matrices and codes survive as they were.
    sform, scode = like.get_sform(coded=True)
    qform, qcode = like.get_qform(coded=True)
    img.set_sform(like.get_sform(), code=int(scode) if sform is not None else 0)
    img.set_qform(like.get_qform(), code=int(qcode) if qform is not None else 0)
    if not np.allclose(img.affine, affine, atol=1e-4):
      raise ValueError(f"{path}: output affine differs from the template header's")
  img.set_data_dtype(data.dtype)
  img.header.set_slope_inter(1.0, 0.0)  # the input's CT rescaling must not apply to a mask
  img.header.set_intent(intent)
  path = os.fspath(path)
  suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
  with atomic.replacing(path, suffix=suffix) as tmp:
    nib.save(img, tmp)
