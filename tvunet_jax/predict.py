r"""Applying a trained model: a chest-CT volume (NIfTI or DICOM series) in, a mask and report out.

This module owns inference on whole volumes: loading the network (a checkpoint, or an export with
no Flax model built), planning and reading the inputs, preprocessing exactly as in training (from
the contract saved with the weights), batched slice inference sharded over the devices,
resampling to native resolution, and the command line; `outputs.py` writes the results (mask,
probabilities, report, overlay, DICOM Segmentation). `evaluate.py` reuses the slice machinery.

  python -m tvunet_jax.predict --checkpoint runs/demo scan1.nii.gz [SERIES_DIR ...] \
      --out predictions [--probabilities] [--overlay] [--lung_mask lungs1.nii.gz ...]
  python -m tvunet_jax.predict --model exported/ scan.nii.gz --out predictions

Orientation follows the one rule of `volumes.Orientation` (driven by the affine; the TFDS
builder uses the same), undone on the outputs, so a mask has its input's shape and geometry: a
NIfTI output keeps the input's header (qform and sform with their codes, pixdim, units); a DICOM
series (`dicom_io`) also gets a DICOM outputs.Segmentation referencing its instances.

Output names: `<stem>_mask.nii.gz` etc., the stem being the file name without `.nii[.gz]` (a
series: its description and a UID hash). Inputs whose stems collide get their parent folders'
names prefixed until they differ; an output folder already holding a report of another input
under the same stem is refused before anything is written.

Lung extraction (when no lung mask is given): `volumes.derive_lung_mask` plus every predicted
lesion voxel (a consolidation is not air-like, yet it is lung). The percentage of lung involved is
(lesion voxels inside the lung) / (lung voxels).
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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import tqdm

from tvunet_jax import (
  checkpointing,
  console,
  dicom_io,
  input_pipeline,
  models,
  nifti_io,
  outputs,
  sharding,
  volumes,
)
from tvunet_jax import contract as contract_lib

# ----------------------------------------------------------------------------- the network


def load_model(
  checkpoint: str, mesh: jax.sharding.Mesh | None = None
) -> tuple[models.UNet, Any, dict]:
  """(model, variables, contract) from a workdir or checkpoint; one-line ValueError otherwise.

  The U-Net is rebuilt from the contract saved with the weights (no config file needed); the
  variables are replicated over `mesh` (all devices by default).
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  try:
    contract = contract_lib.read(checkpoint)
    contract_lib.check(contract, checkpoint)
    model = models.build(contract["model"], axis_name=sharding.DATA_AXIS)
    h, w = contract["image_size"]
    abstract = jax.eval_shape(
      lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, h, w, contract.get("in_channels", 1))), train=False
      )
    )
    rep = sharding.replicated(mesh)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract
    )
    variables, _ = checkpointing.restore_variables(checkpoint, abstract)
  except FileNotFoundError as e:
    raise ValueError(str(e).splitlines()[0]) from None
  except (KeyError, TypeError, ValueError, OSError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not msg.startswith(os.path.abspath(checkpoint)) and not msg.startswith(checkpoint):
      msg = (
        f"{checkpoint}: checkpoint incompatible with this model code ({type(e).__name__}: {msg})"
      )
    raise ValueError(msg[:400]) from None
  return model, variables, contract


def network_inputs(slices_hu: np.ndarray, contract: dict) -> np.ndarray:
  """Native display-oriented slices -> what the network was trained on.

  Each slice is resized by `volumes.resize_image` (as the TFDS builder made the training data)
  and then goes through `input_pipeline.preprocess_image` (the intensity handling of training).

  Args:
    slices_hu: (N, H, W) HU, any float or int dtype.
    contract: the model's input contract (`image_size`, `intensity`).

  Returns:
    (N, h, w) float32 with (h, w) = contract["image_size"].
  """
  size = tuple(contract["image_size"])
  resized = np.stack([volumes.resize_image(s, size) for s in np.asarray(slices_hu)])
  return input_pipeline.preprocess_image(resized, intensity=contract["intensity"])


class SlicePredictor:
  """Lesion probabilities of network-ready slices, batched and sharded over a device mesh.

  The batch is rounded up to a multiple of the mesh's devices; each batch's rows are split over
  the devices, the variables replicated. A last, partial batch runs at `rows_for(n)` rows: the
  smallest power-of-two rows per device that hold it, zero-padded, the padding dropped (each such
  size compiles once; besides the full batch there are at most ceil(log2(batch / devices))).
  Single-process only (one host's devices).
  """

  def __init__(
    self,
    model: Any,
    variables: Any,
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_size: int = 32,
    channel: int = 0,
  ):
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    n = self.mesh.devices.size
    self.batch_size = max(1, math.ceil(batch_size / n)) * n
    rep, rows = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
    self._rows = rows
    self._variables = jax.device_put(variables, rep)

    def probs_fn(v, x):  # (B, H, W, 1) -> (B, H, W); the contract's lesion channel
      logits = model.apply(v, x, train=False)
      return jax.nn.sigmoid(logits[..., channel].astype(jnp.float32))

    self._fn = sharding.under_mesh(
      self.mesh, jax.jit(probs_fn, in_shardings=(rep, rows), out_shardings=rows)
    )

  def rows_for(self, n: int) -> int:
    """Rows one call runs for `n` (1 <= n <= batch_size) slices: the full batch, or for fewer
    the devices times the smallest power of two >= n / devices."""
    devices = self.mesh.devices.size
    per_device = -(-n // devices)
    return min(self.batch_size, devices * (1 << (per_device - 1).bit_length()))

  def __call__(
    self, images: np.ndarray, *, progress: bool = False, desc: str = "slices"
  ) -> np.ndarray:
    """(N, h, w) float32 network inputs -> (N, h, w) float32 probabilities in [0, 1]."""
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    out = np.empty(images.shape, np.float32)
    b = self.batch_size
    for start in tqdm.trange(
      0, n, b, disable=not progress, desc=desc, unit="batch", leave=False, dynamic_ncols=True
    ):
      chunk = images[start : start + b]
      rows = len(chunk)
      pad = self.rows_for(rows) - rows
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
      x = jax.device_put(chunk[..., None], self._rows)
      out[start : start + rows] = np.asarray(self._fn(self._variables, x))[:rows]
    return out


def checkpoint_predictor(
  checkpoint: str, *, mesh: jax.sharding.Mesh | None = None, batch_size: int = 32
) -> tuple[SlicePredictor, dict]:
  """(predictor, contract) of a training checkpoint (see `load_model`)."""
  model, variables, contract = load_model(checkpoint, mesh)
  return SlicePredictor(
    model,
    variables,
    mesh=mesh,
    batch_size=batch_size,
    channel=contract_lib.output_channel(contract),
  ), contract


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One volume to segment, known before its voxels are read: a NIfTI file or a DICOM series."""

  source: str  # absolute path of the file or series folder
  stem: str  # output name stem (unique within a run; see `output_stems`)
  series_uid: str | None = None  # DICOM only
  dicom_items: tuple = ()  # DICOM only: ((file, header), ...) from `dicom_io.select_series`


@dataclasses.dataclass(frozen=True, eq=False)
class InputVolume:
  """A loaded input in its own voxel order."""

  data: np.ndarray  # (X, Y, Z) float32 HU
  affine: np.ndarray  # (4, 4) voxel -> RAS+ mm
  source: str
  header: nib.Nifti1Header | None = None  # NIfTI input: kept on the outputs
  file_shape: tuple[int, ...] = ()
  series: dicom_io.CtSeries | None = None  # DICOM input


def plan_inputs(paths: Sequence[str], *, series: str | None = None) -> list[InputSpec]:
  """The volumes behind the command line's paths, with unique output stems; nothing is read but
  DICOM headers.

  Raises:
    nifti_io.VolumeError: a path that is neither a file nor a DICOM folder, a DICOM folder with
      several series and no `series`, or the same input given twice (naming both).
    dicom_io.DicomUnavailable: a DICOM folder without pydicom installed (one-line hint).
  """
  specs = []
  for path in paths:
    source = os.path.abspath(path)
    if os.path.isdir(source):
      if not dicom_io.is_dicom_folder(source):
        raise nifti_io.VolumeError(f"{path}: a folder without DICOM files")
      for uid, items in dicom_io.select_series(source, series).items():
        desc = str(items[0][1].get("SeriesDescription", "") or "")
        specs.append(InputSpec(source, dicom_io.series_name(uid, desc), uid, tuple(items)))
    else:
      specs.append(InputSpec(source, outputs.nifti_stem(source)))
  seen: set[tuple[str, str | None]] = set()
  for spec in specs:
    key = (spec.source, spec.series_uid)
    if key in seen:
      raise nifti_io.VolumeError(f"{spec.source}: given twice")
    seen.add(key)
  stems = outputs.output_stems([(s.source, s.stem) for s in specs])
  return [dataclasses.replace(s, stem=t) for s, t in zip(specs, stems)]


def load_input(spec: InputSpec) -> InputVolume:
  """Reads one planned input (each file opened once)."""
  if spec.series_uid is not None:
    ser = dicom_io.load_series(spec.source, spec.series_uid, list(spec.dicom_items))
    return InputVolume(ser.data, ser.affine, spec.source, series=ser, file_shape=ser.data.shape)
  vol = nifti_io.load_volume(spec.source, dtype=np.float32)
  return InputVolume(
    vol.data, vol.affine, spec.source, header=vol.header, file_shape=vol.file_shape
  )


# ----------------------------------------------------------------------------- one volume


def segment_volume(
  volume: str | InputVolume,
  predictor: Any,
  contract: dict,
  *,
  lung_mask_path: str | None = None,
  derive_lung: bool = True,
  threshold: float | None = None,
  progress: bool = False,
) -> outputs.Segmentation:
  """Segments one CT volume; nothing is written.

  Args:
    volume: a 3D `.nii`/`.nii.gz` path in HU (any orientation and in-plane size), or a loaded
      `InputVolume` (e.g. a DICOM series).
    predictor: (N, h, w) float32 network inputs -> (N, h, w) probabilities, with the keywords
      `progress` and `desc`: a `SlicePredictor` or an `exported.ExportedPredictor`.
    contract: the model contract (checked).
    lung_mask_path: optional lung mask (nonzero = lung) of the same shape and affine.
    derive_lung: without a lung mask, derive one from HU (`volumes.derive_lung_mask`).
    threshold: probability threshold; default the contract's.
    progress: show a progress bar over slice batches.

  Returns:
    An `outputs.Segmentation` (mask uint8 and probabilities float32 in the input's shape and
    voxel order, the report dict).

  Raises:
    nifti_io.VolumeError: unreadable, non-3D or non-finite volume, singular affine, or a lung
      mask that does not match the volume (one line naming the file).
  """
  contract_lib.check(contract, "model")
  thr = float(contract["threshold"] if threshold is None else threshold)
  if isinstance(volume, str):
    volume = load_input(InputSpec(os.path.abspath(volume), outputs.nifti_stem(volume)))
  affine = volume.affine
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise nifti_io.VolumeError(f"{volume.source}: singular affine (voxel axes have no orientation)")
  ori = volumes.Orientation.of(affine, volume.data.shape)
  hu = ori.to_display(volume.data)  # (H, W, Z)
  lung_display = None
  lung_source = None
  if lung_mask_path:
    lm = nifti_io.load_volume(lung_mask_path, dtype=np.uint8)
    if lm.data.shape != volume.data.shape:
      raise nifti_io.VolumeError(
        f"{lung_mask_path}: lung mask shape {lm.data.shape} differs "
        f"from volume shape {volume.data.shape} of {volume.source}"
      )
    if not np.allclose(lm.affine, affine, atol=1e-3):
      raise nifti_io.VolumeError(
        f"{lung_mask_path}: lung mask affine differs from that of {volume.source}"
      )
    lung_display = ori.to_display(lm.data > 0)
    lung_source = os.path.abspath(lung_mask_path)

  slices = np.moveaxis(hu, 2, 0)  # (Z, H, W)
  x = network_inputs(slices, contract)
  probs_net = predictor(x, progress=progress, desc=os.path.basename(volume.source))
  probs = np.moveaxis(volumes.resize_back(probs_net, hu.shape[:2]), 0, 2)  # (H, W, Z)
  mask = probs >= np.float32(thr)

  if lung_display is None and derive_lung:
    lung_display = volumes.derive_lung_mask(hu) | mask
    lung_source = "derived (HU threshold, see tvunet_jax.volumes)"
  report = outputs.volume_report(mask, ori, lung_display)
  report.update(
    {
      "input": volume.source,
      "series_uid": volume.series.uid if volume.series is not None else None,
      "shape": list(volume.file_shape or volume.data.shape),
      "axcodes": list(nib.aff2axcodes(affine)),
      "voxel_size_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
      "threshold": thr,
      "target": contract["target"],
      "intensity": contract["intensity"],
      "network_size": list(contract["image_size"]),
      "lung_source": lung_source,
      "warnings": [],
    }
  )
  if float(volume.data.min()) > -500.0:
    report["warnings"].append(
      f"minimum value {float(volume.data.min()):.0f} > -500: the volume "
      "does not look like CT in HU (no air); results are meaningless"
    )
  return outputs.Segmentation(
    mask=ori.from_display(mask.astype(np.uint8)),
    probs=ori.from_display(probs.astype(np.float32)),
    lung=None if lung_display is None else ori.from_display(lung_display),
    volume=volume,
    display_hu=hu,
    display_mask=mask,
    orientation=ori,
    report=report,
  )


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; returns the exit code (0 ok, 2 a bad model, bad arguments or a bad volume)."""
  ap = argparse.ArgumentParser(
    prog="python -m tvunet_jax.predict",
    description="Segment COVID-19 lesions in chest CT (NIfTI files or DICOM series folders).",
  )
  ap.add_argument("volumes", nargs="+", help=".nii / .nii.gz CT volumes in HU, or DICOM folders")
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="training workdir (its best checkpoint) or a checkpoint")
  src.add_argument("--model", help="an export folder (python -m tvunet_jax.export)")
  ap.add_argument(
    "--runtime",
    default="auto",
    choices=("auto", "onnx", "stablehlo"),
    help="with --model: ONNX Runtime or the serialized StableHLO",
  )
  ap.add_argument(
    "--series", default=None, help="DICOM folder with several series: a SeriesInstanceUID, or 'all'"
  )
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--probabilities", action="store_true", help="also write the probability map")
  ap.add_argument("--overlay", action="store_true", help="also write an overlay PNG per volume")
  ap.add_argument(
    "--lung_mask",
    action="append",
    default=[],
    help="lung mask per volume (repeat, in the order of the volumes)",
  )
  ap.add_argument("--no_lung", action="store_true", help="do not derive a lung mask")
  ap.add_argument("--threshold", type=float, default=None, help="default: the model's")
  ap.add_argument("--batch_size", type=int, default=32, help="slices per batch (global)")
  ap.add_argument("--num_devices", type=int, default=-1, help="-1: all devices")
  ap.add_argument("--no_progress", action="store_true")
  ap.add_argument("--verbosity", type=int, default=0, help="1: libraries' log lines too")
  args = ap.parse_args(argv)
  console.configure(args.verbosity)

  def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2

  if args.threshold is not None and not 0.0 < args.threshold < 1.0:
    return fail(f"--threshold {args.threshold} is not in (0, 1)")
  try:
    specs = plan_inputs(args.volumes, series=args.series)
  except (nifti_io.VolumeError, dicom_io.DicomUnavailable) as e:
    return fail(str(e))
  if args.lung_mask and len(args.lung_mask) != len(specs):
    return fail(f"{len(args.lung_mask)} --lung_mask for {len(specs)} volumes")
  try:
    outputs.check_no_foreign_outputs(specs, args.out)
    if args.model:
      from tvunet_jax import exported  # pylint: disable=g-import-not-at-top

      predictor = exported.load_exported(
        args.model, runtime=args.runtime, batch_size=args.batch_size
      )
      contract, model_source = predictor.contract, os.path.abspath(args.model)
    else:
      mesh = sharding.make_mesh(args.num_devices)
      predictor, contract = checkpoint_predictor(
        args.checkpoint, mesh=mesh, batch_size=args.batch_size
      )
      model_source = os.path.abspath(args.checkpoint)
  except (ValueError, ImportError) as e:
    return fail(str(e).splitlines()[0])
  reports, failed = [], 0
  for i, spec in enumerate(specs):
    try:
      seg = segment_volume(
        load_input(spec),
        predictor,
        contract,
        lung_mask_path=args.lung_mask[i] if args.lung_mask else None,
        derive_lung=not args.no_lung,
        threshold=args.threshold,
        progress=not args.no_progress,
      )
      seg.report["model"] = model_source
      reports.append(
        outputs.write_outputs(
          seg,
          args.out,
          spec.stem,
          probabilities=args.probabilities,
          overlay=args.overlay,
          algorithm_version=outputs.algorithm_version(),
        )
      )
      for w in seg.report["warnings"]:
        print(f"warning: {spec.source}: {w}", file=sys.stderr)
    except (nifti_io.VolumeError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      failed += 1
  if reports:
    print(outputs.console_table(reports))
    print(f"outputs: {os.path.abspath(args.out)}")
  return 2 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
