r"""Applying a trained model: a chest-CT NIfTI volume in, a lesion mask and a report out.

This module owns inference on whole volumes: bringing any voxel orientation to the one the network
was trained on and back, preprocessing exactly as in training (from the input contract saved with
the weights), batched slice inference sharded over the devices, resampling to native resolution,
the clinical report (lesion volume, lesion count, per-slice area, lung involvement), the overlay
picture and the atomic writing of every output. `evaluate.py` reuses the slice machinery.

  python -m tvunet_jax.predict --checkpoint runs/demo scan1.nii.gz [scan2.nii.gz ...] \
      --out predictions [--probabilities] [--overlay] [--lung_mask lungs1.nii.gz ...]

Orientation. The network saw display-oriented slices (row 0 anterior, column 0 the patient's
right), made from MedSeg files whose voxel axes point to ('L', 'A', 'S') by
`nifti_io.from_storage`. Any input is first reordered and flipped (no resampling) with nibabel's
orientation tools to the axis codes nearest to ('L', 'A', 'S') (`io_orientation`; an oblique
affine is treated as its nearest axis-aligned orientation, which is what a viewer does when it
shows slices), then `from_storage`; every step is undone on the outputs, so the mask has the
input's shape and is written with the input's affine.

Lung extraction (when no lung mask is given): voxels below -400 HU (aerated lung is about -850,
soft tissue above -100), minus the air connected to the in-plane border of the scan (outside the
body), keeping 3D components (26-connected) of at least 10% of the largest one (drops bowel gas
and small pockets; the airways stay attached to the lungs), holes filled slice by slice (vessels),
plus every predicted lesion voxel (a consolidation is not air-like, yet it is lung). It is a
simple, documented heuristic, not a validated lung segmentation: pass `--lung_mask` for a real
one. The percentage of lung involved is (lesion voxels inside the lung) / (lung voxels).
"""

from __future__ import annotations

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import argparse
import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import skimage.transform
import tqdm
from scipy import ndimage

from tfds_builder.covid19_ct_seg import covid19_ct_seg_dataset_builder as builder_lib
from tvunet_jax import checkpointing
from tvunet_jax import input_pipeline
from tvunet_jax import metrics
from tvunet_jax import nifti_io
from tvunet_jax import sharding
from tvunet_jax import writers

# Voxel axes of MedSeg files on disk (and of the phantom, which mimics them): X toward the
# patient's left, Y anterior, Z superior. `nifti_io.from_storage` of such an array is display.
STORAGE_AXCODES = ("L", "A", "S")
LUNG_HU_THRESHOLD = -400.0
LUNG_MIN_COMPONENT_FRACTION = 0.1
LESION_CONNECTIVITY = 26  # 3D lesions: voxels touching by a face, an edge or a corner
CONTRACT_KEYS = ("image_size", "intensity", "target", "threshold", "model")


# ----------------------------------------------------------------------------- the contract


def check_contract(contract: dict, source: str) -> None:
  """Raises ValueError naming `source` unless this code can reproduce the contract's inputs."""
  if not isinstance(contract, dict):
    raise ValueError(f"{source}: model contract is not a JSON object")
  missing = [k for k in CONTRACT_KEYS if k not in contract]
  if missing:
    raise ValueError(f"{source}: model contract lacks {missing}; not a tvunet_jax checkpoint or "
                     "from an incompatible version")
  size = contract["image_size"]
  if (not isinstance(size, (list, tuple)) or len(size) != 2
      or not all(isinstance(s, int) and s > 0 for s in size)):
    raise ValueError(f"{source}: model contract image_size must be two positive ints, got {size!r}")
  if contract["intensity"] not in input_pipeline.INTENSITIES:
    raise ValueError(f"{source}: model contract intensity {contract['intensity']!r} is not one of "
                     f"{input_pipeline.INTENSITIES}")
  window = contract.get("lung_window", list(input_pipeline.LUNG_WINDOW))
  if (contract["intensity"] == "lung_window"
      and not np.allclose(window, input_pipeline.LUNG_WINDOW)):
    raise ValueError(f"{source}: model trained with lung window {window}, this version "
                     f"preprocesses with {list(input_pipeline.LUNG_WINDOW)}")
  if contract["target"] not in input_pipeline.TARGETS:
    raise ValueError(f"{source}: model contract target {contract['target']!r} is not one of "
                     f"{sorted(input_pipeline.TARGETS)}")
  if contract.get("in_channels", 1) != 1:
    raise ValueError(f"{source}: model expects {contract['in_channels']} input channels; CT "
                     "inference feeds 1")
  if not 0.0 < float(contract["threshold"]) < 1.0:
    raise ValueError(f"{source}: model contract threshold {contract['threshold']} not in (0, 1)")


def load_model(checkpoint: str, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[Any, dict, dict]:
  """(model, variables, contract) from a workdir or checkpoint; one-line ValueError otherwise.

  Variables are replicated over `mesh` (all devices by default).
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  try:
    model, variables, contract = checkpointing.load_for_inference(
        checkpoint, sharding=sharding.replicated(mesh))
  except FileNotFoundError as e:
    raise ValueError(str(e).splitlines()[0]) from None
  except (KeyError, TypeError, ValueError, OSError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not msg.startswith(os.path.abspath(checkpoint)):
      msg = (f"{checkpoint}: checkpoint incompatible with this model code "
             f"({type(e).__name__}: {msg})")
    raise ValueError(msg[:400]) from None
  check_contract(contract, checkpoint)
  return model, variables, contract


# ----------------------------------------------------------------------------- slices


def network_inputs(slices_hu: np.ndarray, contract: dict) -> np.ndarray:
  """Native display-oriented slices -> what the network was trained on.

  Each slice goes through the TFDS builder's `resize_example` (bilinear + anti-aliasing, as the
  training data were made) and then `input_pipeline.preprocess` (the intensity handling of
  training), so the two cannot drift apart.

  Args:
    slices_hu: (N, H, W) HU, any float or int dtype.
    contract: the model's input contract (`image_size`, `intensity`, `target`).

  Returns:
    (N, h, w) float32 with (h, w) = contract["image_size"].
  """
  slices_hu = np.asarray(slices_hu)
  size = tuple(contract["image_size"])
  n, h, w = slices_hu.shape
  dummy = np.zeros((h, w), np.uint8)
  resized = np.empty((n, *size), np.float32)
  for i in range(n):
    ex = {"image": slices_hu[i].astype(np.float32), "mask": dummy, "lung_mask": dummy,
          "spacing": np.ones(3, np.float32)}
    resized[i] = builder_lib.resize_example(ex, size, np.dtype(np.float32))["image"]
  pre = input_pipeline.preprocess({"image": resized, "mask": np.zeros(resized.shape, np.uint8)},
                                  target=contract["target"], intensity=contract["intensity"])
  return pre["image"][..., 0]


def resize_back(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """(N, h, w) probabilities -> (N, H, W) float32, bilinear (anti-aliased when shrinking)."""
  probs = np.asarray(probs, np.float32)
  if tuple(probs.shape[1:]) == tuple(shape):
    return probs
  out = np.empty((probs.shape[0], *shape), np.float32)
  for i, p in enumerate(probs):
    out[i] = skimage.transform.resize(p, shape, order=1, preserve_range=True)
  return np.clip(out, 0.0, 1.0)


class SlicePredictor:
  """Lesion probabilities of network-ready slices, batched and sharded over a device mesh.

  The batch is rounded up to a multiple of the mesh's devices; each batch's rows are split over
  the devices, the variables replicated. A last, partial batch runs at `rows_for(n)` rows: the
  smallest power-of-two rows per device that hold it, zero-padded, the padding dropped. So a
  100-slice volume at batch 8 on one device runs 12 x 8 + 1 x 4 rows, not 13 x 8 (4% less work;
  at the command line's batch 32 it is 3 x 32 + 4, not 4 x 32: 22% less). Each such size
  compiles once per predictor (jit's cache); besides the full batch there are at most
  ceil(log2(batch / devices)) of them.
  Single-process only (one host's devices).
  """

  def __init__(self, model: Any, variables: Any, *, mesh: jax.sharding.Mesh | None = None,
               batch_size: int = 32):
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    n = self.mesh.devices.size
    self.batch_size = max(1, math.ceil(batch_size / n)) * n
    rep, rows = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
    self._rows = rows
    self._variables = jax.device_put(variables, rep)

    def probs_fn(v, x):  # (B, H, W, 1) -> (B, H, W); channel 0 as in train.eval_step
      logits = model.apply(v, x, train=False)
      return jax.nn.sigmoid(logits[..., 0].astype(jnp.float32))

    self._fn = sharding.under_mesh(
        self.mesh, jax.jit(probs_fn, in_shardings=(rep, rows), out_shardings=rows))

  def rows_for(self, n: int) -> int:
    """Rows one call runs for `n` (1 <= n <= batch_size) slices: the full batch, or for fewer
    the devices times the smallest power of two >= n / devices."""
    devices = self.mesh.devices.size
    per_device = -(-n // devices)
    return min(self.batch_size, devices * (1 << (per_device - 1).bit_length()))

  def __call__(self, images: np.ndarray, *, progress: bool = False,
               desc: str = "slices") -> np.ndarray:
    """(N, h, w) float32 network inputs -> (N, h, w) float32 probabilities in [0, 1]."""
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    out = np.empty(images.shape, np.float32)
    b = self.batch_size
    for start in tqdm.trange(0, n, b, disable=not progress, desc=desc, unit="batch",
                             leave=False, dynamic_ncols=True):
      chunk = images[start:start + b]
      rows = len(chunk)
      pad = self.rows_for(rows) - rows
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
      x = jax.device_put(chunk[..., None], self._rows)
      out[start:start + rows] = np.asarray(self._fn(self._variables, x))[:rows]
    return out


# ----------------------------------------------------------------------------- orientation


@dataclasses.dataclass(frozen=True)
class Orientation:
  """How an input array maps to the storage orientation ('L', 'A', 'S') and back."""
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
    return cls(tuple(int(s) for s in shape), fwd, nib.orientations.ornt_transform(dst, src),
               storage_affine)

  def to_display(self, data: np.ndarray) -> np.ndarray:
    """(input shape) -> (rows, cols, slices) display orientation; slice 0 most inferior."""
    return nifti_io.from_storage(nib.orientations.apply_orientation(data, self.to_storage))

  def from_display(self, display: np.ndarray) -> np.ndarray:
    """Inverse of `to_display`: exactly the input's shape and voxel order."""
    return nib.orientations.apply_orientation(nifti_io.to_storage(display), self.from_storage)

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


# ----------------------------------------------------------------------------- lungs


def derive_lung_mask(hu: np.ndarray) -> np.ndarray:
  """Simple HU-based lung field of a display-oriented volume (see the module docstring).

  Args:
    hu: (H, W, Z) HU, display orientation.

  Returns:
    (H, W, Z) bool lung field (without the predicted lesions, which the caller adds).
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


# ----------------------------------------------------------------------------- one volume


@dataclasses.dataclass
class Segmentation:
  """Outputs for one volume, in the input's voxel order (X, Y, Z as the file stores them)."""
  mask: np.ndarray  # input shape, uint8 {0, 1}
  probs: np.ndarray  # input shape, float32 [0, 1]
  lung: np.ndarray | None  # input shape, bool, or None (no lung mask)
  affine: np.ndarray  # (4, 4), the input's
  file_shape: tuple[int, ...]  # the input file's shape (a trailing singleton axis kept)
  display_hu: np.ndarray  # (H, W, Z) display-oriented CT, for the overlay
  display_mask: np.ndarray  # (H, W, Z) display-oriented mask
  orientation: Orientation
  report: dict[str, Any]


def segment_volume(volume_path: str, model: Any, variables: Any, contract: dict, *,
                   lung_mask_path: str | None = None, derive_lung: bool = True,
                   threshold: float | None = None, predictor: SlicePredictor | None = None,
                   mesh: jax.sharding.Mesh | None = None, batch_size: int = 32,
                   progress: bool = False) -> Segmentation:
  """Segments one CT volume; nothing is written.

  Args:
    volume_path: a 3D `.nii`/`.nii.gz` in HU, any orientation and in-plane size.
    model, variables, contract: as from `load_model` (any object with the flax `apply`
      signature works, e.g. a test double).
    lung_mask_path: optional lung mask (nonzero = lung) of the same shape and affine.
    derive_lung: without a lung mask, derive one from HU (`derive_lung_mask`).
    threshold: probability threshold; default the contract's.
    predictor: a `SlicePredictor` to reuse across volumes (built from model, variables, mesh
      and batch_size otherwise).
    progress: show a progress bar over slice batches.

  Returns:
    A `Segmentation` (mask uint8 and probabilities float32 in the input's shape and voxel order,
    the report dict).

  Raises:
    nifti_io.VolumeError: unreadable, non-3D or non-finite volume, singular affine, or a lung
      mask that does not match the volume (one line naming the file).
  """
  check_contract(contract, "model")
  thr = float(contract["threshold"] if threshold is None else threshold)
  vol = nifti_io.load_volume(volume_path, dtype=np.float32)
  file_shape = tuple(nib.load(volume_path).shape)
  affine = vol.affine
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise nifti_io.VolumeError(f"{volume_path}: singular affine (voxel axes have no orientation)")
  ori = Orientation.of(affine, vol.data.shape)
  hu = ori.to_display(vol.data)  # (H, W, Z)
  lung_display = None
  lung_source = None
  if lung_mask_path:
    lm = nifti_io.load_volume(lung_mask_path, dtype=np.uint8)
    if lm.data.shape != vol.data.shape:
      raise nifti_io.VolumeError(f"{lung_mask_path}: lung mask shape {lm.data.shape} differs "
                                 f"from volume shape {vol.data.shape} of {volume_path}")
    if not np.allclose(lm.affine, affine, atol=1e-3):
      raise nifti_io.VolumeError(f"{lung_mask_path}: lung mask affine differs from that of "
                                 f"{volume_path}")
    lung_display = ori.to_display(lm.data > 0)
    lung_source = os.path.abspath(lung_mask_path)

  if predictor is None:
    predictor = SlicePredictor(model, variables, mesh=mesh, batch_size=batch_size)
  slices = np.moveaxis(hu, 2, 0)  # (Z, H, W)
  x = network_inputs(slices, contract)
  probs_net = predictor(x, progress=progress, desc=os.path.basename(volume_path))
  probs = np.moveaxis(resize_back(probs_net, hu.shape[:2]), 0, 2)  # (H, W, Z)
  mask = probs >= np.float32(thr)

  if lung_display is None and derive_lung:
    lung_display = derive_lung_mask(hu) | mask
    lung_source = "derived (HU threshold, see tvunet_jax.predict)"
  report = volume_report(mask, ori, lung_display)
  report.update({
      "input": os.path.abspath(volume_path),
      "shape": list(file_shape),
      "axcodes": list(nib.aff2axcodes(affine)),
      "voxel_size_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
      "threshold": thr,
      "target": contract["target"],
      "intensity": contract["intensity"],
      "network_size": list(contract["image_size"]),
      "lung_source": lung_source,
      "warnings": [],
  })
  if float(vol.data.min()) > -500.0:
    report["warnings"].append(f"minimum value {float(vol.data.min()):.0f} > -500: the volume "
                              "does not look like CT in HU (no air); results are meaningless")
  return Segmentation(
      mask=ori.from_display(mask.astype(np.uint8)),
      probs=ori.from_display(probs.astype(np.float32)),
      lung=None if lung_display is None else ori.from_display(lung_display),
      affine=affine, file_shape=file_shape, display_hu=hu, display_mask=mask,
      orientation=ori, report=report)


def volume_report(mask: np.ndarray, ori: Orientation, lung: np.ndarray | None) -> dict[str, Any]:
  """The clinical numbers of a display-oriented (H, W, Z) bool mask.

  Volumes use |det| of the affine (the voxel volume, also for oblique grids); per-slice areas are
  listed in the order of the input array's slice axis (`slice_axis`).
  """
  voxel_mm3 = float(abs(np.linalg.det(ori.storage_affine[:3, :3])))
  labels, n = ndimage.label(mask, np.ones((3, 3, 3), bool))
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  per_slice = mask.sum(axis=(0, 1)).astype(np.float64) * ori.pixel_area_mm2()
  if ori.slice_axis_flipped:
    per_slice = per_slice[::-1]
  out = {
      "voxel_volume_mm3": voxel_mm3,
      "lesion_voxels": int(mask.sum()),
      "lesion_volume_ml": float(mask.sum()) * voxel_mm3 / 1000.0,
      "num_lesions": int(n),
      "lesion_volumes_ml": sorted((float(s) * voxel_mm3 / 1000.0 for s in sizes), reverse=True),
      "slice_axis": ori.slice_axis,
      "per_slice_lesion_area_mm2": per_slice.tolist(),
      "slices_with_lesion": int(np.count_nonzero(per_slice)),
      "lung_volume_ml": None,
      "lesion_in_lung_ml": None,
      "percent_lung_involved": None,
  }
  if lung is not None:
    lung_vox = float(lung.sum())
    inside = float((mask & lung).sum())
    out.update(lung_volume_ml=lung_vox * voxel_mm3 / 1000.0,
               lesion_in_lung_ml=inside * voxel_mm3 / 1000.0,
               percent_lung_involved=100.0 * inside / lung_vox if lung_vox else None)
  return out


# ----------------------------------------------------------------------------- writing


def _stem(path: str) -> str:
  name = os.path.basename(path)
  for ext in (".nii.gz", ".nii"):
    if name.endswith(ext):
      return name[:-len(ext)]
  return name


def save_figure_atomic(fig, path: str) -> None:
  """Saves a matplotlib figure as PNG under a temporary name, then renames it into place."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=100)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the figure from other users
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_overlay(seg: Segmentation, path: str, max_slices: int = 12, cols: int = 4) -> None:
  """PNG grid: the lesion outline (red) over the CT in a lung window, on slices with lesion."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  z_all = seg.display_hu.shape[2]
  with_lesion = np.flatnonzero(seg.display_mask.any(axis=(0, 1)))
  pool = with_lesion if with_lesion.size else np.arange(z_all)
  pick = pool[np.unique(np.linspace(0, pool.size - 1, min(max_slices, pool.size)).round()
                        .astype(int))]
  rows = math.ceil(len(pick) / cols)
  ncols = min(cols, len(pick))
  fig = Figure(figsize=(3 * ncols, 3.2 * rows))
  ori = seg.orientation
  for i, z in enumerate(pick):
    ax = fig.add_subplot(rows, ncols, i + 1)
    ax.imshow(writers.to_window(seg.display_hu[:, :, z]), cmap="gray", vmin=0, vmax=1)
    if seg.display_mask[:, :, z].any():
      ax.contour(seg.display_mask[:, :, z].astype(np.float32), levels=[0.5], colors="red",
                 linewidths=0.8)
    k = ori.shape[ori.slice_axis] - 1 - z if ori.slice_axis_flipped else z
    ax.set_title(f"slice {k}", fontsize=9)
    ax.set_axis_off()
  fig.suptitle(f"{os.path.basename(seg.report['input'])}: lesion outline (red), lung window; "
               "image left = patient right", fontsize=9)
  save_figure_atomic(fig, path)


def write_outputs(seg: Segmentation, out_dir: str, *, probabilities: bool = False,
                  overlay: bool = False) -> dict[str, Any]:
  """Writes mask (+ probabilities, overlay) and the JSON report atomically; returns the report.

  Files: `<stem>_mask.nii.gz` (uint8), `<stem>_probs.nii.gz` (float32), `<stem>_overlay.png`,
  `<stem>_report.json`. If any write fails, this volume's finished files are removed too.
  """
  os.makedirs(out_dir, exist_ok=True)
  stem = _stem(seg.report["input"])
  paths = {"mask": os.path.join(out_dir, f"{stem}_mask.nii.gz")}
  if probabilities:
    paths["probabilities"] = os.path.join(out_dir, f"{stem}_probs.nii.gz")
  if overlay:
    paths["overlay"] = os.path.join(out_dir, f"{stem}_overlay.png")
  paths["report"] = os.path.join(out_dir, f"{stem}_report.json")
  report = dict(seg.report, outputs={k: os.path.abspath(v) for k, v in paths.items()})
  done = []
  try:
    nifti_io.save_volume(seg.mask.reshape(seg.file_shape), seg.affine, paths["mask"])
    done.append(paths["mask"])
    if probabilities:
      nifti_io.save_volume(seg.probs.reshape(seg.file_shape), seg.affine, paths["probabilities"])
      done.append(paths["probabilities"])
    if overlay:
      save_overlay(seg, paths["overlay"])
      done.append(paths["overlay"])
    checkpointing.write_json_atomic(paths["report"], metrics.to_jsonable(report))
  except BaseException:
    for p in done:
      if os.path.exists(p):
        os.remove(p)
    raise
  return report


def console_table(reports: Sequence[dict[str, Any]]) -> str:
  """A short fixed-width table, one row per volume."""
  head = (f"{'volume':<28} {'lesion mL':>10} {'lesions':>8} {'slices':>7} {'lung mL':>9} "
          f"{'% lung':>7}")
  lines = [head, "-" * len(head)]
  for r in reports:
    lung = "-" if r["lung_volume_ml"] is None else f"{r['lung_volume_ml']:.1f}"
    pct = "-" if r["percent_lung_involved"] is None else f"{r['percent_lung_involved']:.2f}"
    lines.append(f"{_stem(r['input'])[:28]:<28} {r['lesion_volume_ml']:>10.2f} "
                 f"{r['num_lesions']:>8d} {r['slices_with_lesion']:>7d} {lung:>9} {pct:>7}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; returns the exit code (0 ok, 2 a bad checkpoint or at least one bad volume)."""
  ap = argparse.ArgumentParser(prog="python -m tvunet_jax.predict",
                               description="Segment COVID-19 lesions in chest-CT NIfTI volumes.")
  ap.add_argument("volumes", nargs="+", help=".nii / .nii.gz CT volumes in HU")
  ap.add_argument("--checkpoint", required=True,
                  help="training workdir (its best checkpoint) or a checkpoint folder")
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--probabilities", action="store_true", help="also write the probability map")
  ap.add_argument("--overlay", action="store_true", help="also write an overlay PNG per volume")
  ap.add_argument("--lung_mask", action="append", default=[],
                  help="lung mask per volume (repeat, in the order of the volumes)")
  ap.add_argument("--no_lung", action="store_true", help="do not derive a lung mask")
  ap.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's")
  ap.add_argument("--batch_size", type=int, default=32, help="slices per device batch (global)")
  ap.add_argument("--num_devices", type=int, default=-1, help="-1: all devices")
  ap.add_argument("--no_progress", action="store_true")
  args = ap.parse_args(argv)
  if args.threshold is not None and not 0.0 < args.threshold < 1.0:
    print(f"error: --threshold {args.threshold} is not in (0, 1)", file=sys.stderr)
    return 2
  if args.lung_mask and len(args.lung_mask) != len(args.volumes):
    print(f"error: {len(args.lung_mask)} --lung_mask for {len(args.volumes)} volumes",
          file=sys.stderr)
    return 2
  try:
    mesh = sharding.make_mesh(args.num_devices)
    model, variables, contract = load_model(args.checkpoint, mesh)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  predictor = SlicePredictor(model, variables, mesh=mesh, batch_size=args.batch_size)
  reports, failed = [], 0
  for i, path in enumerate(args.volumes):
    try:
      seg = segment_volume(path, model, variables, contract,
                           lung_mask_path=args.lung_mask[i] if args.lung_mask else None,
                           derive_lung=not args.no_lung, threshold=args.threshold,
                           predictor=predictor, progress=not args.no_progress)
      seg.report["checkpoint"] = os.path.abspath(args.checkpoint)
      reports.append(write_outputs(seg, args.out, probabilities=args.probabilities,
                                   overlay=args.overlay))
      for w in seg.report["warnings"]:
        print(f"warning: {path}: {w}", file=sys.stderr)
    except (nifti_io.VolumeError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      failed += 1
  if reports:
    print(console_table(reports))
  return 2 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
