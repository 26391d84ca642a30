"""What inference writes for one volume, atomically: the mask, probabilities, report, overlay
and (for a DICOM series) the DICOM Segmentation, under names unique within a run.

`Segmentation` is what `predict.segment_volume` produces (in the input's voxel order);
`write_outputs` writes it (`<stem>_mask.nii.gz`, `_probs.nii.gz`, `_report.json`,
`_overlay.png`, `_seg.dcm`), each file whole or not at all (`atomic`), a NIfTI output with its
input's header. `output_stems` makes colliding stems unique; `check_no_foreign_outputs` refuses an
output folder holding another input's outputs before anything is written. `volume_report` is the
clinical summary (lesion volume and count, per-slice area, lung involvement); `console_table` the
short table a predict run ends with.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from tvunet_jax import atomic, dicom_io, metrics, nifti_io, volumes, writers

if TYPE_CHECKING:  # types only: predict imports this module
  from tvunet_jax.predict import InputSpec, InputVolume

LESION_CONNECTIVITY = 26  # 3D lesions: voxels touching by a face, an edge or a corner
NIFTI_ENDINGS = (".nii.gz", ".nii")


def nifti_stem(path: str) -> str:
  """A NIfTI file's name without `.nii[.gz]`: its outputs' stem."""
  name = os.path.basename(path)
  for ext in NIFTI_ENDINGS:
    if name.endswith(ext):
      return name[: -len(ext)]
  return name


def output_stems(items: Sequence[tuple[str, str]]) -> list[str]:
  """Unique stems for (source path, stem) pairs: colliding stems get their sources' parent folder
  names prefixed, one level more each round, until they differ ("a/scan.nii.gz" and
  "b/scan.nii.gz" -> "a_scan", "b_scan")."""
  parents = [os.path.normpath(os.path.dirname(src)).split(os.sep) for src, _ in items]
  depth = [0] * len(items)

  def stem(i):
    prefix = [p for p in parents[i][len(parents[i]) - depth[i] :] if p] if depth[i] else []
    return "_".join([*prefix, items[i][1]])

  while True:
    names = [stem(i) for i in range(len(items))]
    clash = [i for i, n in enumerate(names) if names.count(n) > 1]
    if not clash:
      return names
    grown = False
    for i in clash:
      if depth[i] < len(parents[i]):
        depth[i] += 1
        grown = True
    if not grown:  # identical paths: `plan_inputs` refuses those before this
      raise ValueError(f"cannot make distinct output names for {items[clash[0]][0]}")


@dataclasses.dataclass
class Segmentation:
  """Outputs for one volume, in the input's voxel order (X, Y, Z as the file stores them)."""

  mask: np.ndarray  # input shape, uint8 {0, 1}
  probs: np.ndarray  # input shape, float32 [0, 1]
  lung: np.ndarray | None  # input shape, bool, or None (no lung mask)
  volume: InputVolume  # the input (affine, header, DICOM series)
  display_hu: np.ndarray  # (H, W, Z) display-oriented CT, for the overlay
  display_mask: np.ndarray  # (H, W, Z) display-oriented mask
  orientation: volumes.Orientation
  report: dict[str, Any]


def volume_report(
  mask: np.ndarray, ori: volumes.Orientation, lung: np.ndarray | None
) -> dict[str, Any]:
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
    out.update(
      lung_volume_ml=lung_vox * voxel_mm3 / 1000.0,
      lesion_in_lung_ml=inside * voxel_mm3 / 1000.0,
      percent_lung_involved=100.0 * inside / lung_vox if lung_vox else None,
    )
  return out


def save_overlay(seg: Segmentation, path: str, max_slices: int = 12, cols: int = 4) -> None:
  """PNG grid: the lesion outline (red) over the CT in a lung window, on slices with lesion."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  z_all = seg.display_hu.shape[2]
  with_lesion = np.flatnonzero(seg.display_mask.any(axis=(0, 1)))
  pool = with_lesion if with_lesion.size else np.arange(z_all)
  pick = pool[
    np.unique(np.linspace(0, pool.size - 1, min(max_slices, pool.size)).round().astype(int))
  ]
  rows = math.ceil(len(pick) / cols)
  ncols = min(cols, len(pick))
  fig = Figure(figsize=(3 * ncols, 3.2 * rows))
  ori = seg.orientation
  for i, z in enumerate(pick):
    ax = fig.add_subplot(rows, ncols, i + 1)
    ax.imshow(writers.to_window(seg.display_hu[:, :, z]), cmap="gray", vmin=0, vmax=1)
    if seg.display_mask[:, :, z].any():
      ax.contour(
        seg.display_mask[:, :, z].astype(np.float32), levels=[0.5], colors="red", linewidths=0.8
      )
    k = ori.shape[ori.slice_axis] - 1 - z if ori.slice_axis_flipped else z
    ax.set_title(f"slice {k}", fontsize=9)
    ax.set_axis_off()
  fig.suptitle(
    f"{os.path.basename(seg.report['input'])}: lesion outline (red), lung window; "
    "image left = patient right",
    fontsize=9,
  )
  writers.save_figure(fig, path)


def output_paths(
  out_dir: str,
  stem: str,
  *,
  probabilities: bool = False,
  overlay: bool = False,
  dicom_seg: bool = False,
) -> dict[str, str]:
  """The files one volume writes (the report last: its presence marks a finished volume)."""
  paths = {"mask": os.path.join(out_dir, f"{stem}_mask.nii.gz")}
  if probabilities:
    paths["probabilities"] = os.path.join(out_dir, f"{stem}_probs.nii.gz")
  if overlay:
    paths["overlay"] = os.path.join(out_dir, f"{stem}_overlay.png")
  if dicom_seg:
    paths["dicom_seg"] = os.path.join(out_dir, f"{stem}_seg.dcm")
  paths["report"] = os.path.join(out_dir, f"{stem}_report.json")
  return paths


def check_no_foreign_outputs(specs: Sequence[InputSpec], out_dir: str) -> None:
  """Refuses, before anything is written, to overwrite another input's outputs in `out_dir`.

  Raises:
    nifti_io.VolumeError: `<stem>_report.json` exists and names a different input.
  """
  import json  # pylint: disable=g-import-not-at-top

  for spec in specs:
    report = os.path.join(out_dir, f"{spec.stem}_report.json")
    if not os.path.exists(report):
      continue
    try:
      with open(report, encoding="utf-8") as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = {}
    if (old.get("input"), old.get("series_uid")) != (spec.source, spec.series_uid):
      raise nifti_io.VolumeError(
        f"{spec.source}: its outputs would overwrite those of {old.get('input', 'another input')}"
        f" in {out_dir} ({os.path.basename(report)}); choose another --out"
      )


def write_outputs(
  seg: Segmentation,
  out_dir: str,
  stem: str | None = None,
  *,
  probabilities: bool = False,
  overlay: bool = False,
  algorithm_version: str = "",
) -> dict[str, Any]:
  """Writes mask (+ probabilities, overlay, DICOM SEG) and the JSON report; returns the report.

  `stem` names the files (default: the input file's name without `.nii[.gz]`).

  Every file is written atomically; if any write fails, this volume's finished files are removed
  too. A NIfTI input's header (qform, sform, codes, pixdim, units) is kept on the NIfTI outputs;
  the mask is uint8 with the label intent.
  """
  os.makedirs(out_dir, exist_ok=True)
  vol = seg.volume
  stem = stem or nifti_stem(vol.source)
  paths = output_paths(
    out_dir, stem, probabilities=probabilities, overlay=overlay, dicom_seg=vol.series is not None
  )
  report = dict(seg.report, outputs={k: os.path.abspath(v) for k, v in paths.items()})
  shape = vol.file_shape or vol.data.shape
  done = []
  try:
    nifti_io.save_volume(
      seg.mask.reshape(shape),
      vol.affine,
      paths["mask"],
      like=vol.header,
      intent=nifti_io.INTENT_LABEL,
    )
    done.append(paths["mask"])
    if probabilities:
      nifti_io.save_volume(
        seg.probs.reshape(shape), vol.affine, paths["probabilities"], like=vol.header
      )
      done.append(paths["probabilities"])
    if overlay:
      save_overlay(seg, paths["overlay"])
      done.append(paths["overlay"])
    if vol.series is not None:
      dicom_io.write_segmentation(
        seg.mask,
        vol.series,
        paths["dicom_seg"],
        algorithm_version=algorithm_version,
        threshold=seg.report["threshold"],
      )
      done.append(paths["dicom_seg"])
    atomic.write_json(paths["report"], metrics.to_jsonable(report))
  except BaseException:
    for p in done:
      if os.path.exists(p):
        os.remove(p)
    raise
  return report


def console_table(reports: Sequence[dict[str, Any]]) -> str:
  """A short fixed-width table, one row per volume."""
  head = (
    f"{'volume':<28} {'lesion mL':>10} {'lesions':>8} {'slices':>7} {'lung mL':>9} {'% lung':>7}"
  )
  lines = [head, "-" * len(head)]
  for r in reports:
    lung = "-" if r["lung_volume_ml"] is None else f"{r['lung_volume_ml']:.1f}"
    pct = "-" if r["percent_lung_involved"] is None else f"{r['percent_lung_involved']:.2f}"
    name = os.path.basename(r["outputs"]["report"])[: -len("_report.json")]
    lines.append(
      f"{name[:28]:<28} {r['lesion_volume_ml']:>10.2f} "
      f"{r['num_lesions']:>8d} {r['slices_with_lesion']:>7d} {lung:>9} {pct:>7}"
    )
  return "\n".join(lines)


def algorithm_version() -> str:
  import importlib.metadata  # pylint: disable=g-import-not-at-top

  try:
    return f"tvunet_jax {importlib.metadata.version('tvunet_jax')}"
  except importlib.metadata.PackageNotFoundError:
    return "tvunet_jax"
