"""One study run: train (or resume) a variant, then score its best checkpoint volume by volume.

After `train.train_and_evaluate` (which resumes a workdir and writes `test_metrics.json`), every
test volume named in that file (`rp7` -> `<manual_dir>/rp_im/7.nii.gz`, labels in `rp_msk/`) is
segmented at native resolution with the best checkpoint (`predict.segment_volume`, threshold 0.5,
no lung derivation) and scored in 3D: Dice at 0.5 and the lesion-wise scores of
`tvunet_jax.metrics.lesionwise` with the volume's own voxel spacing. The record goes to
`<workdir>/study_volumes.json` (atomically, last, so its presence marks the run finished).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from experiments.reproduce import plan as plan_lib
from tvunet_jax import atomic, input_pipeline, metrics, nifti_io, predict, train
from tvunet_jax.kernels import conv
from tvunet_jax.metrics import lesionwise

THRESHOLD = 0.5


def dice_3d(pred: np.ndarray, truth: np.ndarray) -> float:
  """Dice of two same-shape bool masks; 1.0 when both are empty (nothing to find, nothing found)."""
  p, t = np.asarray(pred, bool), np.asarray(truth, bool)
  den = int(p.sum()) + int(t.sum())
  return 1.0 if den == 0 else 2.0 * int((p & t).sum()) / den


def _number(value: Any) -> float:
  return float("nan") if value is None else float(value)  # to_jsonable wrote NaN as null


def pooled_at(report: dict[str, Any], key: str, threshold: float = THRESHOLD) -> float:
  """`key` of a test_metrics.json report at `threshold` (its table row, else the operating one)."""
  thresholds = np.asarray(report["threshold"], np.float64)
  hit = np.flatnonzero(np.isclose(thresholds, threshold, rtol=0, atol=1e-9))
  value = report[key][hit[0]] if hit.size else report["operating"][key]
  return _number(value)


def volume_files(manual_dir: str, volume_id: str) -> tuple[str, str]:
  """('rp7', MedSeg folder) -> (image, label) paths of that whole volume."""
  if not volume_id.startswith("rp") or not volume_id[2:].isdigit():
    raise ValueError(f"{manual_dir}: test unit {volume_id!r} is not a whole volume (rpN)")
  n = volume_id[2:]
  return (
    os.path.join(manual_dir, "rp_im", f"{n}.nii.gz"),
    os.path.join(manual_dir, "rp_msk", f"{n}.nii.gz"),
  )


def evaluate_run(
  run: plan_lib.Run, config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains `run` in `workdir` (resuming), scores the test volumes, writes and returns the record.

  Returns:
    {'variant', 'seed', 'tv_weight', 'tv_reduction', 'conv_backend' (resolved), 'test_dice',
    'average_precision', 'isolated_fp_components_per_slice' (pooled over the test split at 128 px,
    from test_metrics.json), 'seconds' (this call), 'volumes': [{'volume', 'dice', 'pred_voxels',
    'true_voxels', 'spacing_mm', lesion-wise keys...}]}.
  """
  t0 = time.perf_counter()
  backend = conv.choose(config.model.conv_backend).describe()
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, plan_lib.TEST_METRICS_FILE), encoding="utf-8") as f:
    report = json.load(f)
  manual_dir, _ = input_pipeline.data_dirs(workdir, config.data.manual_dir, config.data.data_dir)
  predictor, contract = predict.checkpoint_predictor(workdir, batch_size=config.eval.batch_size)
  labels = input_pipeline.TARGETS[config.data.target]
  volumes = []
  for volume_id in report["per_volume"]["volume_id"]:
    image_path, label_path = volume_files(manual_dir, volume_id)
    seg = predict.segment_volume(
      image_path, predictor, contract, derive_lung=False, threshold=THRESHOLD
    )
    truth_vol = nifti_io.load_volume(label_path, dtype=np.uint8)
    truth = np.isin(truth_vol.data, labels)
    pred = seg.mask > 0
    if pred.shape != truth.shape:
      raise ValueError(f"{label_path}: label shape {truth.shape} != prediction {pred.shape}")
    scores = lesionwise.lesionwise_scores(pred, truth, truth_vol.zooms)
    volumes.append(
      {
        "volume": volume_id,
        "dice": dice_3d(pred, truth),
        "pred_voxels": int(pred.sum()),
        "true_voxels": int(truth.sum()),
        "spacing_mm": list(truth_vol.zooms),
        **scores,
      }
    )
  connectivity = report.get("connectivity", {})
  record = {
    "variant": run.variant.name,
    "seed": run.seed,
    "tv_weight": run.variant.tv_weight,
    "tv_reduction": run.variant.tv_reduction,
    "conv_backend": backend,
    "test_dice": pooled_at(report, "dice"),
    "average_precision": _number(report.get("average_precision")),
    "isolated_fp_components_per_slice": _number(
      connectivity.get("isolated_fp_components_per_slice")
    ),
    "seconds": time.perf_counter() - t0,
    "volumes": volumes,
  }
  record = metrics.to_jsonable(record)  # NaN (an undefined ratio) -> null: strict JSON
  atomic.write_json(os.path.join(workdir, plan_lib.RECORD_FILE), record)
  return record
