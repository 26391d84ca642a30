"""TFDS builder for the MedSeg "COVID-19 CT segmentation" slices (and the project's phantom).

Reads the MedSeg file layout from `manual_dir` (the real download, or `python -m tvunet_jax.phantom`
output, which uses the same layout) and writes array_record shards of 2D axial slices in display
orientation, split by volume so that no patient is in two splits. Each volume is oriented by its
image's affine with `tvunet_jax.volumes.Orientation`, the same rule inference uses; for files
stored as MedSeg stores them this undoes their 90-degree storage rotation.

Configs:
  paper_128: slices resized to 128x128 (image bilinear with anti-aliasing, masks nearest), HU as
    float32: the authors' protocol. The paper's ground-glass-vs-rest target is derived from `mask`
    by the input pipeline (`mask == 1`), so the same shards also serve other targets.
  native: native in-plane resolution (512 or 630 px on MedSeg), HU as int16, for evaluation at full
    resolution and multi-class work.

Splits (deterministic, by volume; see README.md):
  train: every `tr_*` slice (each a different patient) + Radiopaedia volumes 1-5
  validation: Radiopaedia volume 6
  test: Radiopaedia volumes 7, 8, 9
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from tvunet_jax import nifti_io, volumes

# The raw file names (one definition, shared with the phantom writer). TR_LUNG is optional.
TR_IMAGE, TR_MASK, TR_LUNG = nifti_io.TR_IMAGE, nifti_io.TR_MASK, nifti_io.TR_LUNG
RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR = (
  nifti_io.RP_IMAGE_DIR,
  nifti_io.RP_MASK_DIR,
  nifti_io.RP_LUNG_DIR,
)
NUM_LABELS = 4  # 0 background, 1 ground-glass, 2 consolidation, 3 pleural effusion


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """Which raw volumes go to which split. `tr` means every slice of tr_im.nii.gz."""

  train: tuple[str, ...] = ("tr", "rp1", "rp2", "rp3", "rp4", "rp5")
  validation: tuple[str, ...] = ("rp6",)
  test: tuple[str, ...] = ("rp7", "rp8", "rp9")

  def as_dict(self) -> dict[str, tuple[str, ...]]:
    return {"train": self.train, "validation": self.validation, "test": self.test}


@dataclasses.dataclass
class Covid19CtSegConfig(tfds.core.BuilderConfig):
  """image_size: (H, W) to resize to, or None for native; image_dtype: float32 or int16 HU."""

  image_size: tuple[int, int] | None = (128, 128)
  image_dtype: str = "float32"
  splits: SplitSpec = dataclasses.field(default_factory=SplitSpec)


class Builder(tfds.core.GeneratorBasedBuilder):
  """MedSeg COVID-19 CT segmentation slices with lesion labels, split by volume."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release: paper_128 and native configs, volume-wise train/validation/test.",
    "1.1.0": "Volumes oriented by their affine (the rule predict uses) instead of always by "
    "MedSeg's storage rotation; same examples for files stored as MedSeg does.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the MedSeg "COVID-19 CT segmentation dataset" (http://medicalsegmentation.com/covid19/,
  also mirrored on Kaggle) and place these files in one folder, then pass it as `manual_dir`:
    tr_im.nii.gz, tr_mask.nii.gz, (optional) tr_lungmasks_updated.nii.gz
    rp_im/1.nii.gz ... rp_im/9.nii.gz        (unzip rp_im.zip)
    rp_msk/1.nii.gz ... rp_msk/9.nii.gz      (unzip rp_msk.zip)
    rp_lung_msk/1.nii.gz ... 9.nii.gz        (unzip rp_lung_msk.zip)
  Without real data, `python -m tvunet_jax.phantom --out DIR` writes a synthetic set in the same
  layout.
  """
  BUILDER_CONFIGS = [
    Covid19CtSegConfig(
      name="paper_128",
      description="128x128 slices, float32 HU (the authors' protocol).",
      image_size=(128, 128),
      image_dtype="float32",
    ),
    Covid19CtSegConfig(
      name="native",
      description="Native-resolution slices, int16 HU, multi-class labels.",
      image_size=None,
      image_dtype="int16",
    ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    hw = tuple(cfg.image_size) if cfg.image_size else (None, None)
    # zlib-encoded Tensor features: PNG `Image` features would need TensorFlow to encode.
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(
            shape=hw,
            dtype=np.dtype(cfg.image_dtype),
            encoding="zlib",
            doc="HU, display orientation",
          ),
          "mask": tfds.features.Tensor(
            shape=hw,
            dtype=np.uint8,
            encoding="zlib",
            doc="0 bg, 1 ground-glass, 2 consolidation, 3 effusion",
          ),
          "lung_mask": tfds.features.Tensor(
            shape=hw, dtype=np.uint8, encoding="zlib", doc="0 outside, 1 right, 2 left lung"
          ),
          "has_lung_mask": tfds.features.Scalar(dtype=np.bool_),
          "volume_id": tfds.features.Text(doc="'tr_<slice>' or 'rp<n>': the patient unit"),
          "slice_index": tfds.features.Scalar(dtype=np.int32),
          "spacing": tfds.features.Tensor(
            shape=(3,), dtype=np.float32, doc="row, column, slice spacing in mm after resizing"
          ),
        }
      ),
      homepage="http://medicalsegmentation.com/covid19/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    spec = self.builder_config.splits.as_dict()
    check_layout(manual_dir, [v for vols in spec.values() for v in vols])
    return {name: self._generate_examples(manual_dir, vols) for name, vols in spec.items()}

  def _generate_examples(self, manual_dir: str, volumes: tuple[str, ...]) -> Iterator:
    cfg = self.builder_config
    for unit in volumes:
      for key, ex in iter_slices(manual_dir, unit):
        yield key, resize_example(ex, cfg.image_size, np.dtype(cfg.image_dtype))


def _rp_paths(manual_dir: str, n: str) -> tuple[str, str, str]:
  return tuple(
    os.path.join(manual_dir, d, f"{n}.nii.gz") for d in (RP_IMAGE_DIR, RP_MASK_DIR, RP_LUNG_DIR)
  )


def check_layout(manual_dir: str, units: list[str]) -> None:
  """Fails fast, before anything is written, if a file the splits need is missing."""
  if not os.path.isdir(manual_dir):
    raise nifti_io.VolumeError(f"{manual_dir}: manual_dir is not a folder")
  needed = []
  for unit in units:
    if unit == "tr":
      needed += [os.path.join(manual_dir, TR_IMAGE), os.path.join(manual_dir, TR_MASK)]
    elif unit.startswith("rp"):
      needed += list(_rp_paths(manual_dir, unit[2:])[:2])  # lung masks are optional
    else:
      raise ValueError(f"unknown volume unit {unit!r} in split spec")
  missing = [p for p in needed if not os.path.exists(p)]
  if missing:
    raise nifti_io.VolumeError(
      f"{missing[0]}: file not found ({len(missing)} missing in "
      f"{manual_dir}; see MANUAL_DOWNLOAD_INSTRUCTIONS)"
    )


def _load_triplet(img_path: str, mask_path: str, lung_path: str | None):
  """Loads image, labels and optional lung mask, checking they agree; returns display-oriented
  arrays (by the image's affine) and the display (row, column, slice) spacing in mm."""
  img = nifti_io.load_volume(img_path, dtype=np.float32)
  mask = nifti_io.load_volume(mask_path, dtype=np.uint8)
  if mask.data.shape != img.data.shape:
    raise nifti_io.VolumeError(
      f"{mask_path}: mask shape {mask.data.shape} differs from image shape {img.data.shape}"
    )
  if mask.data.max(initial=0) >= NUM_LABELS:
    raise nifti_io.VolumeError(f"{mask_path}: label {int(mask.data.max())} outside 0..3")
  ori = volumes.Orientation.of(img.affine, img.data.shape)
  lung = None
  if lung_path and os.path.exists(lung_path):
    lung = nifti_io.load_volume(lung_path, dtype=np.uint8).data
    if lung.shape != img.data.shape:
      raise nifti_io.VolumeError(
        f"{lung_path}: lung mask shape {lung.shape} differs from image shape {img.data.shape}"
      )
    lung = ori.to_display(lung)
  return (ori.to_display(img.data), ori.to_display(mask.data), lung, ori.display_spacing_mm())


def iter_slices(manual_dir: str, unit: str) -> Iterator[tuple[str, dict]]:
  """Yields (key, example) per axial slice of one split unit at native resolution.

  Example arrays are display-oriented (H, W): image float32 HU, mask uint8, lung_mask uint8.
  """
  if unit == "tr":
    lung_path = os.path.join(manual_dir, TR_LUNG)
    img, mask, lung, spacing = _load_triplet(
      os.path.join(manual_dir, TR_IMAGE), os.path.join(manual_dir, TR_MASK), lung_path
    )
    ids = [f"tr_{z:03d}" for z in range(img.shape[2])]  # every tr slice is its own patient
  else:
    img, mask, lung, spacing = _load_triplet(*_rp_paths(manual_dir, unit[2:]))
    ids = [unit] * img.shape[2]
  spacing = np.array(spacing, np.float32)
  for z in range(img.shape[2]):
    yield (
      f"{ids[z]}_{z:04d}",
      {
        "image": img[:, :, z],
        "mask": mask[:, :, z],
        "lung_mask": lung[:, :, z] if lung is not None else np.zeros(img.shape[:2], np.uint8),
        "has_lung_mask": lung is not None,
        "volume_id": ids[z],
        "slice_index": z,
        "spacing": spacing,
      },
    )


def resize_example(ex: dict, size: tuple[int, int] | None, image_dtype: np.dtype) -> dict:
  """Resizes one native example to `size` (`volumes.resize_image` / `resize_labels`)."""
  ex = dict(ex)
  image = ex["image"]
  if size is not None and tuple(image.shape) != tuple(size):
    h, w = image.shape
    image = volumes.resize_image(image, size)
    for k in ("mask", "lung_mask"):
      ex[k] = volumes.resize_labels(ex[k], size)
    ex["spacing"] = ex["spacing"] * np.array([h / size[0], w / size[1], 1.0], np.float32)
  if np.issubdtype(image_dtype, np.integer):
    info = np.iinfo(image_dtype)
    image = np.clip(np.round(image), info.min, info.max)
  ex["image"] = image.astype(image_dtype)
  return ex
