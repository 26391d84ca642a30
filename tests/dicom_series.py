"""Test helper: writes a small HU volume as a realistic CT series with pydicom.

The series is what a scanner export looks like, not what is easiest to read: RescaleSlope and
RescaleIntercept that differ between files, LPS geometry with a permuted and flipped
ImageOrientationPatient, anisotropic PixelSpacing, random file names, InstanceNumbers that do not
follow the slice positions, CT Image Storage in Explicit VR Little Endian, and the patient, study
and frame-of-reference modules a viewer needs. `defect=` makes each kind of series the reader must
refuse; `as_nifti` gives the same physical volume as a NIfTI image, so DICOM and NIfTI inputs can
be compared voxel for voxel.

Volumes are (I, J, K): I = column index, J = row index within a slice, K = slice, ordered along
the slice normal n = row_cos x col_cos (ascending), as `tvunet_jax.dicom_io.CtSeries.data`.
"""

from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
  PYDICOM_IMPLEMENTATION_UID,
  CTImageStorage,
  ExplicitVRLittleEndian,
  JPEGLosslessSV1,
  MRImageStorage,
  generate_uid,
)

# Each refused kind of series `write_series(defect=...)` can make.
DEFECTS = (
  "modality",  # an MR series (Modality MR, MR Image Storage)
  "missing_slice",  # the middle slice left out
  "duplicate_position",  # an extra file at the position of the middle slice
  "spacing_varies",  # the slices from the middle on shifted by 30% of a step
  "tilted",  # positions drift in-plane along col_cos (a gantry tilt of 15 degrees)
  "non_parallel",  # the middle slice's orientation rotated by 2 degrees about the normal
  "pixel_spacing",  # the middle slice's PixelSpacing differs
  "compressed",  # JPEG Lossless SV1 (pydicom here has no decoder for it); pixels are junk
)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where a series lies in DICOM patient space (LPS mm).

  Attributes:
    row_cos: direction of increasing column index i (the first 3 of ImageOrientationPatient).
    col_cos: direction of increasing row index j (the last 3).
    origin: ImagePositionPatient of voxel (0, 0, 0), the first slice along the normal.
    col_spacing: mm between adjacent columns (along i): PixelSpacing[1].
    row_spacing: mm between adjacent rows (along j): PixelSpacing[0].
    step: mm between slices along the normal.
  """

  # Axial, but with rows and columns swapped and both flipped: i runs anterior, j to the
  # patient's right, and the normal points to the feet, so every axis differs from identity.
  row_cos: tuple[float, float, float] = (0.0, -1.0, 0.0)
  col_cos: tuple[float, float, float] = (-1.0, 0.0, 0.0)
  origin: tuple[float, float, float] = (120.5, 95.25, -310.0)
  col_spacing: float = 0.8
  row_spacing: float = 0.7
  step: float = 2.5

  @property
  def normal(self) -> np.ndarray:
    """(3,) float64 slice normal row_cos x col_cos (LPS)."""
    return np.cross(self.row_cos, self.col_cos)

  def position(self, k: float) -> np.ndarray:
    """(3,) float64 ImagePositionPatient of slice k (LPS mm)."""
    return np.asarray(self.origin, float) + k * self.step * self.normal

  def ras_affine(self) -> np.ndarray:
    """(4, 4) float64 voxel (i, j, k) -> RAS+ mm, the NIfTI convention."""
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(self.row_cos) * self.col_spacing
    lps[:3, 1] = np.asarray(self.col_cos) * self.row_spacing
    lps[:3, 2] = self.normal * self.step
    lps[:3, 3] = self.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


DEFAULT_GEOMETRY = Geometry()


@dataclasses.dataclass(frozen=True)
class WrittenSeries:
  """What `write_series` wrote: UIDs and the files of each slice (index k) in K order."""

  series_uid: str
  study_uid: str
  frame_of_reference_uid: str
  files: tuple[str, ...]  # one per written file, in K order (a duplicate comes after its twin)
  sop_instance_uids: tuple[str, ...]  # same order as files


def phantom_hu(shape: tuple[int, int, int] = (24, 20, 7), seed: int = 0) -> np.ndarray:
  """A small chest-like HU volume (I, J, K) int16: air, body, two lungs, a few GGO blobs.

  I != J by default so a swapped axis cannot pass unnoticed.
  """
  rng = np.random.default_rng(seed)
  ni, nj, nk = shape
  i, j, k = np.meshgrid(
    np.linspace(-1, 1, ni), np.linspace(-1, 1, nj), np.linspace(-1, 1, nk), indexing="ij"
  )
  hu = np.full(shape, -1000.0)
  hu[(i / 0.95) ** 2 + (j / 0.9) ** 2 < 1] = 40.0
  for cj in (-0.45, 0.45):
    hu[(i / 0.6) ** 2 + ((j - cj) / 0.33) ** 2 < 1] = -850.0
  for _ in range(4):
    c = rng.uniform(-0.5, 0.5, 3) * (1.0, 1.6, 1.4)
    r = rng.uniform(0.15, 0.3)
    hu[(i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2 < r**2] = -450.0
  hu += rng.integers(-20, 21, shape)
  return hu.astype(np.int16)


def _dataset(
  hu_slice: np.ndarray,
  k: int,
  geometry: Geometry,
  *,
  uids: dict,
  instance: int,
  rescale: tuple[float, float],
  modality: str,
) -> Dataset:
  """One slice (I, J) int16 HU -> a CT (or MR) Image Storage dataset with file meta."""
  slope, intercept = rescale
  stored = np.round((hu_slice.astype(np.float64) - intercept) / slope)
  if stored.min() < 0 or stored.max() > 65535:
    raise ValueError(f"HU range does not fit uint16 with slope {slope}, intercept {intercept}")
  sop_class = CTImageStorage if modality == "CT" else MRImageStorage
  sop_uid = generate_uid(entropy_srcs=[uids["series"], str(k), str(instance), "sop"])
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = sop_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
  ds.SpecificCharacterSet = "ISO_IR 100"
  ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  # Patient and general study modules.
  ds.PatientName, ds.PatientID = "Phantom^Chest", "PHANTOM-001"
  ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
  ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = uids["study"], "1", "ACC0001"
  ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20200401", "101500", ""
  ds.StudyDescription = "Chest CT phantom"
  # Series, equipment and frame of reference.
  ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, uids["series"], uids["number"]
  ds.SeriesDescription = uids["description"]
  ds.Manufacturer, ds.ManufacturerModelName = "tvunet_jax tests", "dicom_series"
  ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
  ds.BodyPartExamined = "CHEST"
  # General image and image plane.
  ds.InstanceNumber, ds.AcquisitionNumber = instance, 1
  ds.ContentDate, ds.ContentTime = "20200401", "101500"
  ds.ImageOrientationPatient = [*geometry.row_cos, *geometry.col_cos]
  pos = geometry.position(k)
  ds.ImagePositionPatient = [float(v) for v in pos]
  ds.SliceLocation = float(pos @ geometry.normal)
  ds.SliceThickness = geometry.step
  ds.PixelSpacing = [geometry.row_spacing, geometry.col_spacing]
  # Image pixel module: (rows = J, columns = I), unsigned 16 bit, rescaled to HU.
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.Rows, ds.Columns = int(hu_slice.shape[1]), int(hu_slice.shape[0])
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if modality == "CT":
    ds.RescaleType, ds.KVP = "HU", 120
  ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16).T).tobytes()
  return ds


def write_series(
  folder: str,
  hu: np.ndarray,
  *,
  geometry: Geometry = DEFAULT_GEOMETRY,
  seed: int = 0,
  defect: str | None = None,
  study_uid: str | None = None,
  series_number: int = 3,
  description: str = "Lung 1.0 B70f",
  mixed_rescale: bool = True,
) -> WrittenSeries:
  """Writes `hu` (I, J, K) as one CT series of K files into `folder` (created if missing).

  Args:
    folder: target folder; other series may already be in it.
    hu: (I, J, K) integer HU in [-1024, 3071].
    geometry: where the volume lies (LPS).
    seed: drives UIDs, file names and InstanceNumbers (different seeds: different series).
    defect: None for a valid series, or one of `DEFECTS`.
    study_uid: put the series in this study (default: a new one from `seed`).
    series_number, description: SeriesNumber and SeriesDescription.
    mixed_rescale: alternate (slope 1, intercept -1024) and (slope 0.5, intercept -1024) between
      files, so a reader that ignores per-file rescaling gets wrong HU.

  Returns:
    `WrittenSeries` with the UIDs and the files in K order.
  """
  if defect is not None and defect not in DEFECTS:
    raise ValueError(f"unknown defect {defect!r}; one of {DEFECTS}")
  rng = np.random.default_rng(seed)
  hu = np.asarray(hu)
  nk = hu.shape[2]
  mid = nk // 2
  uids = {
    "series": generate_uid(entropy_srcs=[str(seed), "series"]),
    "study": study_uid or generate_uid(entropy_srcs=[str(seed), "study"]),
    "frame": generate_uid(entropy_srcs=[str(seed), "frame"]),
    "number": series_number,
    "description": description,
  }
  ks = [k for k in range(nk) if not (defect == "missing_slice" and k == mid)]
  if defect == "duplicate_position":
    ks.insert(ks.index(mid) + 1, mid)
  # InstanceNumbers in a random order that is neither the spatial order nor its reverse.
  instances = rng.permutation(len(ks)) + 1
  while len(ks) > 2 and (np.all(np.diff(instances) > 0) or np.all(np.diff(instances) < 0)):
    instances = rng.permutation(len(ks)) + 1
  modality = "MR" if defect == "modality" else "CT"
  files, sops = [], []
  os.makedirs(folder, exist_ok=True)
  for n, k in enumerate(ks):
    g = geometry
    if defect == "spacing_varies" and k >= mid:
      g = dataclasses.replace(g, origin=tuple(g.position(0.3)))
    elif defect == "tilted":
      shift = np.asarray(g.col_cos) * k * g.step * np.tan(np.radians(15.0))
      g = dataclasses.replace(g, origin=tuple(np.asarray(g.origin) + shift))
    elif defect == "pixel_spacing" and k == mid:
      g = dataclasses.replace(g, row_spacing=g.row_spacing * 1.1)
    rescale = (0.5, -1024.0) if mixed_rescale and n % 2 else (1.0, -1024.0)
    ds = _dataset(
      hu[:, :, k], k, g, uids=uids, instance=int(instances[n]), rescale=rescale, modality=modality
    )
    if defect == "non_parallel" and k == mid:
      a = np.radians(2.0)
      r, c, nrm = np.asarray(g.row_cos), np.asarray(g.col_cos), g.normal
      r2 = r * np.cos(a) + np.cross(nrm, r) * np.sin(a)
      c2 = c * np.cos(a) + np.cross(nrm, c) * np.sin(a)
      ds.ImageOrientationPatient = [float(v) for v in (*r2, *c2)]
    if defect == "compressed":
      ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
      ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not a real JPEG stream \xff\xd9"])
      ds["PixelData"].VR = "OB"
      ds["PixelData"].is_undefined_length = True
    # Random names, as exports with hashed or counter-per-study names look to a reader.
    path = os.path.join(folder, f"IM{rng.integers(0, 16**10):010x}")
    ds.save_as(path, enforce_file_format=True)
    files.append(path)
    sops.append(ds.SOPInstanceUID)
  return WrittenSeries(uids["series"], uids["study"], uids["frame"], tuple(files), tuple(sops))


def write_two_series(folder: str, hu: np.ndarray, **kwargs) -> tuple[WrittenSeries, WrittenSeries]:
  """Two valid series of the same study in one folder (seeds 0 and 1; the second is flipped in k
  by writing `hu[:, :, ::-1]`, so the two differ)."""
  first = write_series(folder, hu, seed=0, **kwargs)
  second = write_series(
    folder,
    hu[:, :, ::-1],
    seed=1,
    study_uid=first.study_uid,
    series_number=4,
    description="Lung 1.0 B30f",
    **kwargs,
  )
  return first, second


def as_nifti(
  hu: np.ndarray, geometry: Geometry = DEFAULT_GEOMETRY, *, canonical: bool = False
) -> nib.Nifti1Image:
  """The same physical volume as a NIfTI image: `hu` (I, J, K) with the geometry's RAS affine.

  Args:
    canonical: reorder the voxel axes to RAS+ (nibabel's closest canonical) as many converters
      store it; the physical volume is unchanged, only the array order differs.
  """
  img = nib.Nifti1Image(np.asarray(hu), geometry.ras_affine())
  img.header.set_xyzt_units("mm", "sec")
  return nib.as_closest_canonical(img) if canonical else img
