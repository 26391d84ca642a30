"""Volume geometry: the one orientation rule, the one in-plane resize, and the lung field.

The network sees display-oriented axial slices: row 0 anterior, column 0 the patient's right
(radiological convention), slices from inferior to superior. `Orientation.of(affine, shape)` is the
one rule that takes any volume there, driven by its affine alone, and back: the voxel axes are
reordered and flipped (no resampling) to the axis codes nearest to ('L', 'A', 'S') with nibabel's
`io_orientation` (an oblique affine counts as its nearest axis-aligned orientation, as a viewer
shows it), then each slice is turned by MedSeg's storage rotation (`np.rot90`, k=1), which maps
('L', 'A') storage to display. The TFDS builder, the input pipeline (through the builder's
examples) and `predict` all use it, so training and inference orient a volume identically.

MedSeg. The MedSeg slices were converted from JPG images; their headers were not checked here
(no real file can be downloaded). The rule is right for them when their affine's axis codes are
('L', 'A', 'S') -- what nibabel returns for a header without qform and sform (its fallback
affine flips x) and what the phantom writes -- and it was checked on the anatomy that `rot90`
(k=1) displays `tr_im` radiologically (sternum up, right lung on the viewer's left). A file whose
header states another orientation is turned by what its header says.

Resizing (`resize_image`, `resize_labels`): images bilinear with anti-aliasing (how the training
data were made), labels nearest neighbour; `resize_back` takes probabilities back to native size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import skimage.transform
from scipy import ndimage

# Voxel axes of MedSeg files on disk (and of the phantom, which mimics them): X toward the
# patient's left, Y anterior, Z superior. Such an array, each slice turned by `rot90` (k=1), is
# display-oriented.
STORAGE_AXCODES = ("L", "A", "S")
STORAGE_ROT90_K = 1
LUNG_HU_THRESHOLD = -400.0
LUNG_MIN_COMPONENT_FRACTION = 0.1


def from_storage(stored: np.ndarray) -> np.ndarray:
  """(X, Y, ...) array in ('L', 'A', ...) storage -> (rows, cols, ...) display orientation."""
  return np.rot90(stored, k=STORAGE_ROT90_K, axes=(0, 1))


def to_storage(display: np.ndarray) -> np.ndarray:
  """(rows, cols, ...) display orientation -> (X, Y, ...) storage; inverse of `from_storage`."""
  return np.rot90(display, k=-STORAGE_ROT90_K, axes=(0, 1))


@dataclasses.dataclass(frozen=True)
class Orientation:
  """How an input array maps to display orientation and back (see the module docstring)."""

  shape: tuple[int, int, int]  # input array shape
  to_storage: np.ndarray  # (3, 2) nibabel ornt transform, input -> storage axes
  from_storage: np.ndarray  # (3, 2) storage -> input
  storage_affine: np.ndarray  # (4, 4) affine of the storage-oriented array

  @classmethod
  def of(cls, affine: np.ndarray, shape: Sequence[int]) -> Orientation:
    src = nib.orientations.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(STORAGE_AXCODES)
    fwd = nib.orientations.ornt_transform(src, dst)
    storage_affine = affine @ nib.orientations.inv_ornt_aff(fwd, shape)
    return cls(
      tuple(int(s) for s in shape), fwd, nib.orientations.ornt_transform(dst, src), storage_affine
    )

  def to_display(self, data: np.ndarray) -> np.ndarray:
    """(input shape) -> (rows, cols, slices) display orientation; slice 0 most inferior."""
    return from_storage(nib.orientations.apply_orientation(data, self.to_storage))

  def from_display(self, display: np.ndarray) -> np.ndarray:
    """Inverse of `to_display`: exactly the input's shape and voxel order."""
    return nib.orientations.apply_orientation(to_storage(display), self.from_storage)

  @property
  def slice_axis(self) -> int:
    """The input array axis the axial slices run along."""
    return int(np.flatnonzero(self.to_storage[:, 0] == 2)[0])

  @property
  def slice_axis_flipped(self) -> bool:
    return bool(self.to_storage[self.slice_axis, 1] < 0)

  def pixel_area_mm2(self) -> float:
    """Area of one in-plane pixel (exact for oblique affines too)."""
    a = self.storage_affine[:3, :3]
    return float(np.linalg.norm(np.cross(a[:, 0], a[:, 1])))

  def display_spacing_mm(self) -> tuple[float, float, float]:
    """(row, column, slice) spacing in mm of the display array."""
    z = np.linalg.norm(self.storage_affine[:3, :3], axis=0)
    return float(z[1]), float(z[0]), float(z[2])


# ----------------------------------------------------------------------------- resizing


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """(H, W) image -> (h, w) float32, bilinear with anti-aliasing (unchanged if already h x w)."""
  image = np.asarray(image, np.float32)
  if tuple(image.shape) == tuple(size):
    return image
  return skimage.transform.resize(
    image, tuple(size), order=1, anti_aliasing=True, preserve_range=True
  ).astype(np.float32)


def resize_labels(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """(H, W) integer labels -> (h, w) uint8, nearest neighbour (blending would mix label values)."""
  if tuple(labels.shape) == tuple(size):
    return np.asarray(labels, np.uint8)
  return skimage.transform.resize(
    labels, tuple(size), order=0, anti_aliasing=False, preserve_range=True
  ).astype(np.uint8)


def resize_back(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """(N, h, w) probabilities -> (N, H, W) float32, bilinear (anti-aliased when shrinking)."""
  probs = np.asarray(probs, np.float32)
  if tuple(probs.shape[1:]) == tuple(shape):
    return probs
  out = np.empty((probs.shape[0], *shape), np.float32)
  for i, p in enumerate(probs):
    out[i] = skimage.transform.resize(p, shape, order=1, preserve_range=True)
  return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------- lungs


def derive_lung_mask(hu: np.ndarray) -> np.ndarray:
  """Simple HU-based lung field of a display-oriented volume.

  Voxels below -400 HU (aerated lung is about -850, soft tissue above -100), minus the air
  connected to the in-plane border (outside the body), keeping 3D components (26-connected) of at
  least 10% of the largest one (drops bowel gas and small pockets; the airways stay attached to
  the lungs), holes filled slice by slice (vessels). A documented heuristic, not a validated lung
  segmentation.

  Args:
    hu: (H, W, Z) HU, display orientation.

  Returns:
    (H, W, Z) bool lung field.
  """
  air = hu < LUNG_HU_THRESHOLD
  labels, n = ndimage.label(air, np.ones((3, 3, 3), bool))
  if n == 0:
    return np.zeros(hu.shape, bool)
  border = np.zeros(hu.shape, bool)
  border[[0, -1], :, :] = True
  border[:, [0, -1], :] = True
  outside = np.unique(labels[border & air])
  sizes = np.bincount(labels.ravel(), minlength=n + 1)
  sizes[0] = 0
  sizes[outside] = 0
  if sizes.max() == 0:
    return np.zeros(hu.shape, bool)
  keep = sizes >= LUNG_MIN_COMPONENT_FRACTION * sizes.max()
  keep[0] = False
  lung = keep[labels]
  for z in range(lung.shape[2]):
    lung[:, :, z] = ndimage.binary_fill_holes(lung[:, :, z])
  return lung
