"""Writes `dummy_data/`: a tiny hand-made file set shaped like the real MedSeg download.

Not the phantom: plain geometric shapes, with the dtypes of the real files (float64 `tr_*`, int16
Radiopaedia images, float masks), one non-square volume, storage rotation applied. The builder
test reads it. Re-run only to change it:  python -m tfds_builder.covid19_ct_seg.make_dummy_data
"""

import os

import numpy as np

from tvunet_jax import nifti_io, volumes

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dummy_data")
TR_SLICES = 4
RP_SHAPES = {n: (48, 48, 3) for n in range(1, 9)} | {9: (36, 48, 2)}  # (rows, cols, Z) displayed


def _slice(rows: int, cols: int, z: int, lesion_label: int):
  """Display-oriented HU image, labels and lung mask of one slice: two lungs, one square lesion."""
  img = np.full((rows, cols), -1000.0)
  img[4:-4, 2:-2] = 40.0  # body
  lung = np.zeros((rows, cols), np.uint8)
  lung[8:-8, 5 : cols // 2 - 2] = 1  # right lung on the image's left
  lung[8:-8, cols // 2 + 2 : -5] = 2
  img[lung > 0] = -850.0
  mask = np.zeros((rows, cols), np.float32)
  if lesion_label:
    r0, c0 = 10 + z, 7
    mask[r0 : r0 + 4, c0 : c0 + 4] = lesion_label
    img[mask > 0] = -500.0 if lesion_label == 1 else 0.0
  return img, mask, lung


def main():
  # ('L', 'A', 'S') affines: the storage MedSeg uses, which the orientation rule reads off them.
  affine = np.diag([-0.8, 0.8, 5.0, 1.0])
  tr = [_slice(40, 40, z, lesion_label=z % 3) for z in range(TR_SLICES)]
  for name, k, dtype in (
    ("tr_im", 0, np.float64),
    ("tr_mask", 1, np.float64),
    ("tr_lungmasks_updated", 2, np.float64),
  ):
    stack = np.stack([s[k] for s in tr], axis=-1).astype(dtype)
    nifti_io.save_volume(volumes.to_storage(stack), affine, os.path.join(HERE, f"{name}.nii.gz"))
  for n, (rows, cols, depth) in RP_SHAPES.items():
    sl = [_slice(rows, cols, z, lesion_label=(1 if z else 2) if n % 2 else 0) for z in range(depth)]
    aff = np.diag([-0.7, 0.7, 3.0 + n / 10, 1.0])
    for folder, k, dtype in (
      ("rp_im", 0, np.int16),
      ("rp_msk", 1, np.float32),
      ("rp_lung_msk", 2, np.uint8),
    ):
      stack = np.stack([s[k] for s in sl], axis=-1).astype(dtype)
      nifti_io.save_volume(
        volumes.to_storage(stack), aff, os.path.join(HERE, folder, f"{n}.nii.gz")
      )


if __name__ == "__main__":
  main()
