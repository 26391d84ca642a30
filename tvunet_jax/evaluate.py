r"""Evaluating trained runs: a checkpoint and a data split in, metrics JSON, tables and figures out.

This module owns the offline evaluation of one or more training workdirs: restoring the chosen
checkpoint (weights and input contract, through `predict.load_model`), one pass over the split at
the network's resolution (the TFDS config the run trained on, e.g. 128x128) and one at native
resolution (the `native` TFDS config: each slice resized to the network, its probabilities
resized back bilinearly, compared with the full-resolution mask), and the outputs (written by
`evaluation_report.py`):

  metrics.json   per run and resolution: the paper's per-threshold table (precision, recall,
                 Dice, IoU, specificity, `paper_miou`, ...), class-mean IoU, average precision,
                 the PR curve, per-volume Dice and the connectivity statistics
  metrics.md     the same as markdown tables, all runs in one table
  pr_curve.png   precision-recall curves of all runs (solid: network, dashed: native)
  overlays.png   CT | ground truth | prediction of each run, on chosen slices

  python -m tvunet_jax.evaluate --workdir runs/demo [--split test]
  python -m tvunet_jax.evaluate --workdir runs/unet --workdir runs/tvunet --out runs/compare

It never imports the training loop; the slice machinery (preprocessing, resizing, sharded
batches) is `predict.py`'s, so evaluation and inference cannot disagree.
"""

from __future__ import annotations

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from tfds_builder import covid19_ct_seg
from tvunet_jax import (
  checkpointing,
  console,
  evaluation_report,
  input_pipeline,
  metrics,
  nifti_io,
  predict,
  sharding,
  volumes,
)
from tvunet_jax import contract as contract_lib

NATIVE_CONFIG = "native"


# ----------------------------------------------------------------------------- locating things


def resolve_checkpoint(workdir: str, checkpoint: str | None) -> str:
  """None: the best checkpoint, else the latest; 'best' / 'latest'; a step number; or a path."""
  if checkpoint in (None, ""):
    return workdir
  if checkpoint == "best":
    path = os.path.join(workdir, "best")
  elif checkpoint == "latest":
    path = os.path.join(workdir, "checkpoints")
  elif checkpoint.isdigit():
    candidates = [os.path.join(workdir, sub, checkpoint) for sub in ("checkpoints", "best")]
    found = [c for c in candidates if os.path.isdir(os.path.join(c, "state"))]
    if not found:
      raise ValueError(f"{workdir}: no checkpoint at step {checkpoint} in checkpoints/ or best/")
    path = found[0]
  else:
    path = checkpoint
  try:
    checkpointing.find_checkpoint(path)
  except FileNotFoundError as e:
    raise ValueError(str(e)) from None
  return path


def data_locations(
  workdir: str, manual_dir: str | None = None, data_dir: str | None = None
) -> tuple[str, str, str]:
  """(manual_dir, data_dir, builder_config) of a run, from its config.json unless overridden."""
  cfg: dict[str, Any] = {}
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      cfg = json.load(f).get("data", {})
  elif not (manual_dir and data_dir):
    raise ValueError(f"{path}: not found; pass --manual_dir and --data_dir")
  manual, data = input_pipeline.data_dirs(
    workdir, manual_dir or cfg.get("manual_dir", ""), data_dir or cfg.get("data_dir", "")
  )
  return manual, data, cfg.get("builder_config", "paper_128")


def parse_slices(spec: str) -> list[tuple[str, int]]:
  """'rp7:3,rp8:10' -> [('rp7', 3), ('rp8', 10)] (volume id, slice index)."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    vid, _, idx = item.rpartition(":")
    if not vid or not idx.lstrip("-").isdigit():
      raise ValueError(f"--overlay_slices: expected volume:slice, got {item!r}")
    out.append((vid, int(idx)))
  return out


def choose_overlay_slices(source, target: str, k: int) -> list[tuple[str, int]]:
  """The k slices with the most lesion, taken round-robin over volumes (largest first)."""
  labels = input_pipeline.TARGETS[target]
  by_volume: dict[str, list[tuple[float, int]]] = {}
  for i in range(len(source)):
    ex = source[i]
    area = float(np.isin(ex["mask"], labels).sum())
    by_volume.setdefault(ex["volume_id"].decode(), []).append((area, int(ex["slice_index"])))
  queues = {v: sorted(s, key=lambda t: (-t[0], t[1])) for v, s in by_volume.items()}
  order = sorted(queues, key=lambda v: (-queues[v][0][0], v))
  picked: list[tuple[str, int]] = []
  while len(picked) < k and any(queues.values()):
    for v in order:
      if queues[v] and len(picked) < k:
        picked.append((v, queues[v].pop(0)[1]))
  return picked


# ----------------------------------------------------------------------------- passes


def _accumulator(contract: dict) -> metrics.SegmentationAccumulator:
  return metrics.SegmentationAccumulator(
    thresholds=metrics.PAPER_THRESHOLDS, operating_threshold=float(contract["threshold"])
  )


def evaluate_network(
  predictor: predict.SlicePredictor,
  contract: dict,
  source,
  *,
  overlay_keys: Sequence[tuple[str, int]] = (),
  progress: bool = False,
) -> tuple[dict[str, Any], dict[tuple[str, int], tuple]]:
  """One pass at the network's resolution over a split preprocessed as in training.

  Args:
    predictor: the batched, sharded model.
    contract: the model's input contract.
    source: a `tfds.data_source` of the run's builder config (slices of contract image_size).
    overlay_keys: (volume_id, slice_index) of slices to keep for the overlay figure.

  Returns:
    (`SegmentationAccumulator.result()`, {key: (image (H, W), label (H, W), probs (H, W))}).
  """
  shape = tuple(np.shape(source[0]["image"]))
  if shape != tuple(contract["image_size"]):
    raise ValueError(
      f"data slices are {shape}, the model expects {contract['image_size']}; "
      "evaluate on the TFDS config the run was trained on"
    )
  acc = _accumulator(contract)
  keep = set(overlay_keys)
  kept: dict[tuple[str, int], tuple] = {}
  batches = input_pipeline.eval_batches(
    source,
    local_batch_size=predictor.batch_size,
    target=contract["target"],
    intensity=contract["intensity"],
    sharding=None,
    process_index=0,
    process_count=1,
  )
  total = -(-len(source) // predictor.batch_size)
  for batch, meta in tqdm.tqdm(
    batches, total=total, disable=not progress, desc="network", unit="batch", leave=False
  ):
    valid = meta["valid"]
    images = batch["image"][valid, ..., 0]
    labels = batch["label"][valid, ..., 0]
    probs = predictor(images, progress=False)
    names = meta["volume_id"][valid]
    acc.update(probs, labels, volume_ids=names)
    for j, key in enumerate(zip(names.tolist(), meta["slice_index"][valid].tolist())):
      if key in keep:
        kept[key] = (images[j], labels[j], probs[j])
  return acc.result(), kept


def evaluate_native(
  predictor: predict.SlicePredictor, contract: dict, source, *, progress: bool = False
) -> dict[str, Any]:
  """One pass at native resolution: slices resized to the network, probabilities resized back.

  Args:
    predictor: the batched, sharded model.
    contract: the model's input contract.
    source: a `tfds.data_source` of the `native` config (slices of any size, int16 HU).

  Returns:
    `SegmentationAccumulator.result()` over native pixels, plus "lesionwise": the lesion-wise
    scores (`lesionwise.lesionwise_scores` on each volume's 3D mask at the operating threshold,
    with its spacing) per volume and summarised (`lesionwise.summarize`).
  """
  acc = _accumulator(contract)
  thr = np.float32(contract["threshold"])
  slices: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
  spacing: dict[str, np.ndarray] = {}
  n = len(source)
  b = predictor.batch_size
  for start in tqdm.trange(0, n, b, disable=not progress, desc="native", unit="batch", leave=False):
    examples = [source[i] for i in range(start, min(start + b, n))]
    x = np.concatenate([predict.network_inputs(ex["image"][None], contract) for ex in examples])
    probs_net = predictor(x)
    # Same-size slices go to the accumulator together (fewer, larger updates).
    groups: dict[tuple[int, int], list[int]] = {}
    for j, ex in enumerate(examples):
      groups.setdefault(tuple(ex["image"].shape), []).append(j)
    for shape, idx in groups.items():
      probs = volumes.resize_back(probs_net[idx], shape)
      labels = np.stack(
        [
          input_pipeline.preprocess(
            examples[j], target=contract["target"], intensity=contract["intensity"]
          )["label"][..., 0]
          for j in idx
        ]
      )
      ids = [examples[j]["volume_id"].decode() for j in idx]
      acc.update(probs, labels, volume_ids=ids)
      for j, vid, p, y in zip(idx, ids, probs, labels):
        slices.setdefault(vid, {})[int(examples[j]["slice_index"])] = (p >= thr, y > 0)
        spacing[vid] = np.asarray(examples[j]["spacing"], np.float64)
  result = acc.result()
  per_volume = {}
  for vid, by_index in sorted(slices.items()):
    order = sorted(by_index)
    pred = np.stack([by_index[k][0] for k in order], axis=-1)  # (H, W, Z)
    truth = np.stack([by_index[k][1] for k in order], axis=-1)
    per_volume[vid] = metrics.lesionwise_scores(pred, truth, spacing[vid])
  result["lesionwise"] = {
    "per_volume": per_volume,
    "summary": metrics.summarize_lesionwise(per_volume.values()),
  }
  return result


def evaluate_run(
  workdir: str,
  *,
  split: str = "test",
  checkpoint: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  batch_size: int = 32,
  native: bool = True,
  overlay_keys: Sequence[tuple[str, int]] = (),
  manual_dir: str | None = None,
  data_dir: str | None = None,
  progress: bool = False,
) -> dict[str, Any]:
  """Restores a run's checkpoint and evaluates it on `split` at both resolutions.

  Returns:
    {'workdir', 'checkpoint' {'path', 'step'}, 'contract', 'data', 'network' (result),
    'native' (result or None), 'overlays' {key: (image, label, probs)}}.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  ckpt_dir, step = checkpointing.find_checkpoint(resolve_checkpoint(workdir, checkpoint))
  path = os.path.join(ckpt_dir, str(step))  # resolved once: every read below uses this step
  predictor, contract = predict.checkpoint_predictor(path, mesh=mesh, batch_size=batch_size)
  manual, data, config_name = data_locations(workdir, manual_dir, data_dir)
  try:
    source = input_pipeline.load_split(data, config_name, split)
  except Exception as e:  # TFDS raises several types for a missing build or split
    raise ValueError(
      f"{data}: cannot read split {split!r} of {covid19_ct_seg.NAME}/"
      f"{config_name} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from None
  try:
    network, overlays = evaluate_network(
      predictor, contract, source, overlay_keys=overlay_keys, progress=progress
    )
  except ValueError as e:
    raise ValueError(f"{data}/{covid19_ct_seg.NAME}/{config_name} ({split}): {e}") from None
  native_result = None
  if native:
    try:
      covid19_ct_seg.build(manual, data, NATIVE_CONFIG)
    except nifti_io.VolumeError as e:
      raise ValueError(
        f"{e} (native resolution needs the raw files; pass --no_native to skip)"
      ) from None
    native_result = evaluate_native(
      predictor, contract, input_pipeline.load_split(data, NATIVE_CONFIG, split), progress=progress
    )
  return {
    "workdir": workdir,
    "checkpoint": {"path": path, "step": step},
    "contract": contract,
    "data": {"manual_dir": manual, "data_dir": data, "builder_config": config_name, "split": split},
    "network": network,
    "native": native_result,
    "overlays": overlays,
  }


def run_names(workdirs: Sequence[str]) -> list[str]:
  """Basenames of the workdirs, made unique with a suffix."""
  names: list[str] = []
  for w in workdirs:
    base = os.path.basename(os.path.normpath(w)) or "run"
    name, k = base, 2
    while name in names:
      name, k = f"{base}_{k}", k + 1
    names.append(name)
  return names


def evaluate_workdirs(
  workdirs: Sequence[str],
  *,
  split: str = "test",
  checkpoint: str | None = None,
  out_dir: str | None = None,
  native: bool = True,
  overlay_slices: Sequence[tuple[str, int]] | None = None,
  num_overlays: int = 4,
  batch_size: int = 32,
  num_devices: int = -1,
  manual_dir: str | None = None,
  data_dir: str | None = None,
  progress: bool = False,
) -> dict[str, Any]:
  """Evaluates every workdir on `split` and writes one set of outputs comparing them.

  Returns:
    {'runs': {name: evaluate_run(...) result}, 'paths': the written files}.
  """
  if not workdirs:
    raise ValueError("give at least one --workdir")
  mesh = sharding.make_mesh(num_devices)
  first = os.path.abspath(workdirs[0])
  if out_dir is None:
    out_dir = os.path.join(first, "eval", split if len(workdirs) == 1 else f"{split}_compare")
  keys = list(overlay_slices) if overlay_slices else None
  if keys is None and num_overlays > 0:
    _, data, config_name = data_locations(first, manual_dir, data_dir)
    try:
      src = input_pipeline.load_split(data, config_name, split)
      target = contract_lib.read(resolve_checkpoint(first, checkpoint))["target"]
      keys = choose_overlay_slices(src, target, num_overlays)
    except Exception:  # pylint: disable=broad-except
      keys = []  # evaluate_run reports the real problem with a clear message
  keys = keys or []
  runs = {}
  for name, w in zip(run_names(workdirs), workdirs):
    runs[name] = evaluate_run(
      w,
      split=split,
      checkpoint=checkpoint,
      mesh=mesh,
      batch_size=batch_size,
      native=native,
      overlay_keys=keys,
      manual_dir=manual_dir,
      data_dir=data_dir,
      progress=progress,
    )
  paths = evaluation_report.write_outputs(runs, split, out_dir, keys)
  return {"runs": runs, "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; returns the exit code (0 ok, 2 on a bad workdir, checkpoint or data)."""
  ap = argparse.ArgumentParser(
    prog="python -m tvunet_jax.evaluate", description="Evaluate trained runs on a data split."
  )
  ap.add_argument(
    "--workdir",
    action="append",
    required=True,
    help="training workdir; repeat to compare runs side by side",
  )
  ap.add_argument("--split", default="test", help="train, validation or test")
  ap.add_argument(
    "--checkpoint",
    default=None,
    help="best (default, else latest), latest, a step number, or a path",
  )
  ap.add_argument("--out", default=None, help="default <first workdir>/eval/<split>[_compare]")
  ap.add_argument("--no_native", action="store_true", help="skip the native-resolution pass")
  ap.add_argument(
    "--overlay_slices",
    default="",
    help="volume:slice list, e.g. rp7:3,rp8:10 (default: largest lesions)",
  )
  ap.add_argument("--num_overlays", type=int, default=4)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--num_devices", type=int, default=-1)
  ap.add_argument("--manual_dir", default=None, help="override the run's raw-data folder")
  ap.add_argument("--data_dir", default=None, help="override the run's TFDS folder")
  ap.add_argument("--no_progress", action="store_true")
  ap.add_argument("--verbosity", type=int, default=0, help="1: libraries' log lines too")
  args = ap.parse_args(argv)
  console.configure(args.verbosity)
  try:
    result = evaluate_workdirs(
      args.workdir,
      split=args.split,
      checkpoint=args.checkpoint,
      out_dir=args.out,
      native=not args.no_native,
      overlay_slices=parse_slices(args.overlay_slices) or None,
      num_overlays=args.num_overlays,
      batch_size=args.batch_size,
      num_devices=args.num_devices,
      manual_dir=args.manual_dir,
      data_dir=args.data_dir,
      progress=not args.no_progress,
    )
  except (ValueError, nifti_io.VolumeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  fmt = evaluation_report.fmt
  for name, r in result["runs"].items():
    for res in evaluation_report.RESOLUTIONS:
      m = r[res]
      if m is not None:
        op = m["operating"]
        print(
          f"{name} {res}: dice {fmt(op['dice'])} iou {fmt(op['iou'])} "
          f"AP {fmt(m['average_precision'])} mean volume dice "
          f"{evaluation_report.fmt(m['mean_volume_dice'])}"
        )
  print(f"wrote {', '.join(result['paths'].values())}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
