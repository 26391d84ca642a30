"""DICOM boundary: CT series folders in, DICOM Segmentation out.

This module owns everything DICOM: finding the series in a folder, checking that a series is one
regular stack of CT slices, turning it into an HU volume with the RAS+ affine NIfTI and nibabel
use (so the rest of inference treats it exactly as a NIfTI volume), and writing the predicted
mask back as a binary DICOM SEG that references the source instances. pydicom and highdicom are
an optional extra (`[dicom]`), imported only when a DICOM path is taken; without them the reader
raises `DicomUnavailable` with a one-line install hint. A series that cannot be used stops with
one `nifti_io.VolumeError` line naming the series and, where there is one, the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

import numpy as np

from tvunet_jax import atomic, nifti_io

# Two slices are parallel when every ImageOrientationPatient component agrees within this.
ORIENTATION_TOLERANCE = 1e-4
# Positions closer than this fraction of the smaller pixel spacing are the same point: a slice
# whose position is further than that off the normal through the first slice makes a tilted
# stack, and two slices nearer than that along the normal are duplicates. Real headers store
# positions with about 3 decimals, so a much smaller fraction would refuse good series.
POSITION_TOLERANCE = 1e-2
# Every step between sorted slice positions must agree with the median step within this fraction
# of the median step.
SPACING_TOLERANCE = 1e-2
# A step this many median steps or longer is reported as a missing slice, a shorter deviation as
# varying spacing.
MISSING_SLICE_RATIO = 1.5

_HINT = "DICOM input needs pydicom and highdicom: pip install -e '.[dicom]'"
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image


class DicomUnavailable(ImportError):
  """pydicom or highdicom is not installed; the message is a one-line install hint."""


def _pydicom():
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
    import pydicom.pixels  # noqa: F401  (decoder availability)  pylint: disable=g-import-not-at-top
  except ImportError:
    raise DicomUnavailable(_HINT) from None
  return pydicom


def _highdicom():
  try:
    import highdicom  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DicomUnavailable(_HINT) from None
  return highdicom


@dataclasses.dataclass(frozen=True, eq=False)
class CtSeries:
  """One validated CT series as a volume.

  Attributes:
    uid: SeriesInstanceUID.
    folder: the folder it was read from.
    data: (I, J, K) float32 HU. I = column index, J = row index within a slice, K = slices sorted
      by position along the slice normal row_cos x col_cos (ascending).
    affine: (4, 4) float64, voxel (i, j, k) -> RAS+ world mm (NIfTI/nibabel convention).
    files: source files in K order.
    datasets: pydicom Datasets of the headers (no pixel data) in K order.
    description: SeriesDescription or "".
  """

  uid: str
  folder: str
  data: np.ndarray
  affine: np.ndarray
  files: tuple[str, ...]
  datasets: tuple[Any, ...]
  description: str

  @property
  def name(self) -> str:
    return series_name(self.uid, self.description)


def series_name(uid: str, description: str) -> str:
  """A file-name-safe stem for a series' outputs: the sanitised SeriesDescription (or "series")
  and 8 hex digits of the UID's SHA-1 (UIDs of one scanner often share their tails, hashes do
  not)."""
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", description).strip("._-")[:48] or "series"
  return f"{stem}-{hashlib.sha1(uid.encode()).hexdigest()[:8]}"


def _candidate_files(folder: str) -> list[str]:
  """Regular, non-hidden files directly in `folder` (temporary `.tmp-` outputs are hidden)."""
  names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
  return [p for p in (os.path.join(folder, n) for n in names) if os.path.isfile(p)]


def _has_dicm_magic(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"
  except OSError:
    return False


def _read_header(pydicom, path: str) -> Any | None:
  """The header of `path` (no pixel data), or None when the file is not DICOM."""
  try:
    return pydicom.dcmread(path, stop_before_pixels=True)
  except pydicom.errors.InvalidDicomError:
    return None
  except Exception as e:  # noqa: BLE001  (any parser failure of a DICOM-looking file)
    if _has_dicm_magic(path):
      raise nifti_io.VolumeError(
        f"{path}: unreadable DICOM header ({type(e).__name__}: {e})"
      ) from None
    return None


def is_dicom_folder(path: str) -> bool:
  """True when `path` is a directory holding at least one DICOM file (header parsed only).

  Only files directly in the folder count. Without pydicom the check falls back to the "DICM"
  marker of the DICOM file format, so a caller can still tell a DICOM folder from anything else
  and give `DicomUnavailable`'s hint.
  """
  if not os.path.isdir(path):
    return False
  try:
    pydicom = _pydicom()
  except DicomUnavailable:
    return any(_has_dicm_magic(p) for p in _candidate_files(path))
  for p in _candidate_files(path):
    try:
      if _read_header(pydicom, p) is not None:
        return True
    except nifti_io.VolumeError:
      return True  # a DICOM file, if a broken one: the reader names it
  return False


def list_series(folder: str) -> dict[str, list[tuple[str, Any]]]:
  """SeriesInstanceUID -> [(file, header)] of the DICOM files directly in `folder`.

  Files that are not DICOM, DICOMDIR indexes and files without a SeriesInstanceUID (not part of
  any series) are left out. UIDs are sorted; files keep name order (not slice order).

  Raises:
    DicomUnavailable: pydicom is missing.
    nifti_io.VolumeError: `folder` is not a folder, or a DICOM file's header is unreadable.
  """
  pydicom = _pydicom()
  if not os.path.isdir(folder):
    raise nifti_io.VolumeError(f"{folder}: not a folder")
  groups: dict[str, list[tuple[str, Any]]] = {}
  for p in _candidate_files(folder):
    ds = _read_header(pydicom, p)
    if ds is None:
      continue
    sop_class = ds.get("SOPClassUID") or getattr(
      getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None
    )
    uid = ds.get("SeriesInstanceUID")
    if sop_class == _DICOMDIR_SOP_CLASS or not uid:
      continue
    groups.setdefault(str(uid), []).append((p, ds))
  return dict(sorted(groups.items()))


def read_series(folder: str, series_uid: str | None = None) -> list[CtSeries]:
  """Reads the CT series in `folder` (files directly in it, any names).

  Args:
    folder: a folder of DICOM files, one or several series.
    series_uid: None (the folder must hold exactly one series), a SeriesInstanceUID, or "all".

  Returns:
    The selected series as `CtSeries`, one per series, in UID order.

  Raises:
    DicomUnavailable: pydicom is missing.
    nifti_io.VolumeError: one line: no DICOM files; several series and `series_uid` None (the
      UIDs are listed); `series_uid` not in the folder; or a series that is not one regular CT
      stack (see `_validate`), naming the series and, where there is one, the file.
  """
  return [
    load_series(folder, uid, items) for uid, items in select_series(folder, series_uid).items()
  ]


def select_series(folder: str, series_uid: str | None = None) -> dict[str, list[tuple[str, Any]]]:
  """The series `read_series` would read, as UID -> [(file, header)], from headers alone.

  Raises the same one-line errors as `read_series` for the selection (no DICOM files, several
  series without `series_uid`, an unknown UID).
  """
  groups = list_series(folder)
  if not groups:
    raise nifti_io.VolumeError(f"{folder}: no DICOM files")
  if series_uid is None:
    if len(groups) > 1:
      raise nifti_io.VolumeError(
        f"{folder}: {len(groups)} series ({', '.join(groups)}); pass --series UID or --series all"
      )
    return groups
  if series_uid == "all":
    return groups
  if series_uid in groups:
    return {series_uid: groups[series_uid]}
  raise nifti_io.VolumeError(f"{folder}: no series {series_uid} (found: {', '.join(groups)})")


def _fmt(v: np.ndarray) -> str:
  return "[" + ", ".join(f"{x:.6g}" for x in np.asarray(v, np.float64)) + "]"


def _floats(ds: Any, key: str, n: int, where: str) -> np.ndarray:
  value = ds.get(key)
  try:
    out = np.asarray([float(v) for v in value], np.float64)
  except (TypeError, ValueError):
    out = None
  if out is None or out.shape != (n,) or not np.all(np.isfinite(out)):
    raise nifti_io.VolumeError(f"{where}: missing or invalid {key} ({value!r})")
  return out


def _validate(folder: str, uid: str, items: list[tuple[str, Any]]):
  """Checks one series' headers against the reading rules (module constants).

  Returns:
    (items in K order, row_cos (3,), col_cos (3,), PixelSpacing (2,) [row, column] mm, step mm,
    ImagePositionPatient (3,) of the first slice), all float64 in LPS.
  """
  pydicom = _pydicom()
  first_path, first = items[0]
  at = lambda p: f"{p}: series {uid}"  # noqa: E731
  for p, ds in items:
    modality = ds.get("Modality", "")
    if modality != "CT":
      raise nifti_io.VolumeError(f"{at(p)}: Modality {modality or 'missing'}, expected CT")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
      raise nifti_io.VolumeError(
        f"{at(p)}: multi-frame (enhanced) CT is not supported; "
        "export the series as single-frame images"
      )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
      raise nifti_io.VolumeError(f"{at(p)}: {ds.SamplesPerPixel} samples per pixel, expected 1")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and ts.is_compressed:
      try:
        available = pydicom.pixels.get_decoder(ts).is_available
      except NotImplementedError:
        available = False
      if not available:
        raise nifti_io.VolumeError(
          f"{at(p)}: transfer syntax {ts} ({ts.name}) cannot be decoded "
          "here (no pixel-data plugin for it is installed)"
        )
  iop0 = _floats(first, "ImageOrientationPatient", 6, at(first_path))
  row_cos, col_cos = iop0[:3], iop0[3:]
  if (
    abs(np.linalg.norm(row_cos) - 1) > 1e-3
    or abs(np.linalg.norm(col_cos) - 1) > 1e-3
    or abs(row_cos @ col_cos) > 1e-3
  ):
    raise nifti_io.VolumeError(
      f"{at(first_path)}: ImageOrientationPatient {_fmt(iop0)} is not two orthogonal unit vectors"
    )
  row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
  normal = np.cross(row_cos, col_cos)
  size0 = (first.get("Rows"), first.get("Columns"))
  spacing0 = _floats(first, "PixelSpacing", 2, at(first_path))  # [row spacing, column spacing]
  name0 = os.path.basename(first_path)
  positions = []
  for p, ds in items:
    iop = _floats(ds, "ImageOrientationPatient", 6, at(p))
    if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
      raise nifti_io.VolumeError(
        f"{at(p)}: non-parallel slices (ImageOrientationPatient "
        f"{_fmt(iop)} differs from {name0}'s {_fmt(iop0)})"
      )
    if (ds.get("Rows"), ds.get("Columns")) != size0:
      raise nifti_io.VolumeError(
        f"{at(p)}: slice size {ds.get('Rows')}x{ds.get('Columns')} "
        f"differs from {name0}'s {size0[0]}x{size0[1]}"
      )
    spacing = _floats(ds, "PixelSpacing", 2, at(p))
    if not np.allclose(spacing, spacing0, rtol=1e-6, atol=1e-6):
      raise nifti_io.VolumeError(
        f"{at(p)}: PixelSpacing {_fmt(spacing)} differs from {name0}'s {_fmt(spacing0)}"
      )
    positions.append(_floats(ds, "ImagePositionPatient", 3, at(p)))
  pos = np.stack(positions)  # (N, 3) LPS mm
  order = np.argsort(pos @ normal, kind="stable")
  items = [items[i] for i in order]
  pos = pos[order]
  along = pos @ normal
  tol = POSITION_TOLERANCE * float(spacing0.min())
  offsets = pos - pos[:1]
  in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
  if np.any(in_plane > tol):
    k = int(np.argmax(in_plane > tol))
    raise nifti_io.VolumeError(
      f"{at(items[k][0])}: tilted stack (gantry tilt): its position is "
      f"{in_plane[k]:.4g} mm off the slice normal through "
      f"{os.path.basename(items[0][0])}"
    )
  steps = np.diff(along)
  if np.any(steps <= tol):
    k = int(np.argmax(steps <= tol))
    raise nifti_io.VolumeError(
      f"{at(items[k + 1][0])}: duplicate position {_fmt(pos[k + 1])} "
      f"(also {os.path.basename(items[k][0])})"
    )
  if len(items) > 1:
    step = float(np.median(steps))
    off = np.abs(steps - step) > SPACING_TOLERANCE * step
    if np.any(off):
      k = int(np.argmax(off))
      what = "missing slice" if steps[k] >= MISSING_SLICE_RATIO * step else "spacing varies"
      raise nifti_io.VolumeError(
        f"{at(items[k + 1][0])}: {what}: step {steps[k]:.4g} mm from "
        f"{os.path.basename(items[k][0])}, median step {step:.4g} mm "
        f"(tolerance {SPACING_TOLERANCE:.0%})"
      )
  else:  # one slice: its thickness is the only hint at the third voxel size
    step = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
  return items, row_cos, col_cos, spacing0, step, pos[0]


def load_series(folder: str, uid: str, items: list[tuple[str, Any]]) -> CtSeries:
  pydicom = _pydicom()
  items, row_cos, col_cos, spacing, step, origin = _validate(folder, uid, items)
  rows, cols = int(items[0][1].Rows), int(items[0][1].Columns)
  slices = np.empty((len(items), rows, cols), np.float32)  # (K, rows = J, columns = I)
  for k, (p, header) in enumerate(items):
    try:
      ds = pydicom.dcmread(p)
      stored = ds.pixel_array
    except Exception as e:  # noqa: BLE001  (any decoder or truncation failure)
      ts = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "?")
      raise nifti_io.VolumeError(
        f"{p}: series {uid}: cannot decode pixel data (transfer syntax "
        f"{ts}): {type(e).__name__}: {e}".splitlines()[0]
      ) from None
    if stored.shape != (rows, cols):
      raise nifti_io.VolumeError(
        f"{p}: series {uid}: pixel array {stored.shape}, expected ({rows}, {cols})"
      )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    slices[k] = stored.astype(np.float64) * slope + intercept
  # DICOM: P(i, j) = IPP + i * column spacing * row_cos + j * row spacing * col_cos, where
  # row_cos is the direction of increasing column index and PixelSpacing = [row, column] spacing.
  lps = np.eye(4)
  lps[:3, 0] = row_cos * spacing[1]
  lps[:3, 1] = col_cos * spacing[0]
  lps[:3, 2] = np.cross(row_cos, col_cos) * step
  lps[:3, 3] = origin
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS+
  return CtSeries(
    uid=uid,
    folder=folder,
    data=np.ascontiguousarray(slices.transpose(2, 1, 0)),
    affine=affine,
    files=tuple(p for p, _ in items),
    datasets=tuple(d for _, d in items),
    description=str(items[0][1].get("SeriesDescription", "") or ""),
  )


def _segment_description(hd, algorithm_version: str, threshold: float):
  from pydicom.sr.codedict import codes  # pylint: disable=g-import-not-at-top

  algorithm = hd.AlgorithmIdentificationSequence(
    name="tvunet_jax",
    version=algorithm_version,
    family=codes.cid7162.ArtificialIntelligence,  # DCM 123110, CID 7162
    parameters={"threshold": f"{threshold:g}"},
  )
  return hd.seg.SegmentDescription(
    segment_number=1,
    segment_label="Ground-glass opacity",
    # Category: SCT 49755003 "Morphologically Abnormal Structure" (CID 7150).
    segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
    # Type: DCM 112120 "Ground glass opacity". PS3.16 defines no SNOMED CT concept for it: the
    # standard codes it in the DCM scheme (CID 6102 and CID 6104, "Abnormal Opacity Finding or
    # Feature"), and CID 7151 (segmentation property types) is extensible, so the standard's
    # own code is used rather than a guessed SNOMED one.
    segmented_property_type=codes.DCM.GroundGlassOpacity,
    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
    algorithm_identification=algorithm,
    anatomic_regions=[codes.SCT.Lung],
  )  # SCT 39607008 "Lung" (CID 4)


def write_segmentation(
  mask: np.ndarray, series: CtSeries, path: str, *, algorithm_version: str, threshold: float
) -> None:
  """Writes `mask` as a binary DICOM Segmentation of `series` to `path`, atomically.

  One segment, "Ground-glass opacity" (coded concepts in `_segment_description`), algorithm type
  AUTOMATIC identified as tvunet_jax `algorithm_version` with the threshold as its parameter.
  The SEG is in the source's study and frame of reference, references every source SOP instance,
  and gets a new SeriesInstanceUID and SOPInstanceUID. It has one frame per source slice, empty
  slices included (highdicom's default would omit them), in the source's plane positions.

  Args:
    mask: (I, J, K) {0, 1} integer or bool, in `series.data` order.
    series: the series the mask was predicted on.
    path: the output file (e.g. `OUT/<series.name>.seg.dcm`).
    algorithm_version: version of the model or package that made the mask.
    threshold: the probability threshold the mask was cut at.

  Raises:
    DicomUnavailable: pydicom or highdicom is missing.
    ValueError: `mask` has another shape than `series.data` or values other than 0 and 1.
  """
  hd = _highdicom()
  mask = np.asarray(mask)
  if mask.shape != series.data.shape:
    raise ValueError(
      f"{path}: mask shape {mask.shape} differs from series {series.uid}'s {series.data.shape}"
    )
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError(f"{path}: mask has values other than 0 and 1")
  frames = np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0))  # (K, rows, columns)
  first = series.datasets[0]
  number = first.get("SeriesNumber")
  seg = hd.seg.Segmentation(
    source_images=list(series.datasets),
    pixel_array=frames,
    segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
    segment_descriptions=[_segment_description(hd, algorithm_version, threshold)],
    series_instance_uid=hd.UID(),
    series_number=(int(number) + 1000) if number else 1000,
    sop_instance_uid=hd.UID(),
    instance_number=1,
    manufacturer="tvunet_jax",
    manufacturer_model_name="tvunet_jax",
    software_versions=algorithm_version,
    device_serial_number="0",
    content_label="GGO",
    content_description=f"Ground-glass opacity, p >= {threshold:g}",
    series_description=f"GGO tvunet_jax {series.description}".strip()[:64],
    omit_empty_frames=False,
  )
  with atomic.replacing(path) as tmp:
    seg.save_as(tmp)
