"""The model contract: what a user of the weights must reproduce (MONAI-bundle style metadata).

One module makes it (`make`, from a training config), checks it (`check`: can this code reproduce
its inputs?), writes it beside the checkpoints (`write`) and reads it back (`read`, from the
checkpoint's meta, else the workdir's `model_contract.json`). Inference, evaluation and export
take preprocessing from here, never from flags typed again. The lesion probability is
sigmoid(logits[..., output_channel]).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from tvunet_jax import atomic, checkpointing, input_pipeline, losses

FILE = "model_contract.json"
KEYS = ("image_size", "intensity", "target", "threshold", "model")


def make(config: ml_collections.ConfigDict, image_size: tuple[int, int]) -> dict[str, Any]:
  """The contract of a run of `config` on (H, W) = `image_size` network inputs."""
  num_outputs = int(config.model.num_outputs)
  return {
    "image_size": list(image_size),
    "in_channels": 1,
    "intensity": config.data.intensity,
    "lung_window": list(input_pipeline.LUNG_WINDOW),
    "target": config.data.target,
    "target_labels": list(input_pipeline.TARGETS[config.data.target]),
    "orientation": "display: row 0 anterior, column 0 patient right, by the affine "
    "(tvunet_jax.volumes.Orientation)",
    "resize": "bilinear with anti-aliasing (image), nearest (mask)",
    "threshold": config.eval.threshold,
    "output": f"logits (B, H, W, {num_outputs}); probability = sigmoid",
    "output_channel": losses.lesion_channel(num_outputs),
    # The conv backend is a property of the machine, not of the weights: inference picks its
    # own ('auto', or TVUNET_CONV_BACKEND).
    "model": {k: v for k, v in config.model.to_dict().items() if k != "conv_backend"},
  }


def output_channel(c: dict[str, Any]) -> int:
  """The contract's lesion channel (older contracts: 0, their heads had one channel)."""
  return int(c.get("output_channel", 0))


def check(c: Any, source: str) -> None:
  """Raises ValueError naming `source` unless this code can reproduce the contract's inputs."""
  if not isinstance(c, dict):
    raise ValueError(f"{source}: model contract is not a JSON object")
  missing = [k for k in KEYS if k not in c]
  if missing:
    raise ValueError(
      f"{source}: model contract lacks {missing}; not a tvunet_jax checkpoint or "
      "from an incompatible version"
    )
  size = c["image_size"]
  if (
    not isinstance(size, (list, tuple))
    or len(size) != 2
    or not all(isinstance(s, int) and s > 0 for s in size)
  ):
    raise ValueError(f"{source}: model contract image_size must be two positive ints, got {size!r}")
  if c["intensity"] not in input_pipeline.INTENSITIES:
    raise ValueError(
      f"{source}: model contract intensity {c['intensity']!r} is not one of "
      f"{input_pipeline.INTENSITIES}"
    )
  window = c.get("lung_window", list(input_pipeline.LUNG_WINDOW))
  if c["intensity"] == "lung_window" and not np.allclose(window, input_pipeline.LUNG_WINDOW):
    raise ValueError(
      f"{source}: model trained with lung window {window}, this version "
      f"preprocesses with {list(input_pipeline.LUNG_WINDOW)}"
    )
  if c["target"] not in input_pipeline.TARGETS:
    raise ValueError(
      f"{source}: model contract target {c['target']!r} is not one of "
      f"{sorted(input_pipeline.TARGETS)}"
    )
  if c.get("in_channels", 1) != 1:
    raise ValueError(
      f"{source}: model expects {c['in_channels']} input channels; CT inference feeds 1"
    )
  if not 0.0 < float(c["threshold"]) < 1.0:
    raise ValueError(f"{source}: model contract threshold {c['threshold']} not in (0, 1)")
  num_outputs = c["model"].get("num_outputs", 1) if isinstance(c["model"], dict) else None
  k = c.get("output_channel", 0)
  if (
    not isinstance(num_outputs, int)
    or not isinstance(k, int)
    or isinstance(k, bool)
    or not 0 <= k < num_outputs
  ):
    raise ValueError(
      f"{source}: model contract output_channel {k!r} is not a channel of the "
      f"{num_outputs} logit channels"
    )


def write(workdir: str, c: dict[str, Any]) -> None:
  """`<workdir>/model_contract.json`, atomically."""
  atomic.write_json(os.path.join(workdir, FILE), c)


def read(workdir_or_checkpoint: str) -> dict[str, Any]:
  """The contract saved with a run (from the checkpoint's meta, else the workdir file), unchecked.

  Raises:
    FileNotFoundError: no checkpoint, or neither the meta nor the workdir holds a contract.
  """
  directory, step = checkpointing.find_checkpoint(workdir_or_checkpoint)
  meta_file = os.path.join(directory, str(step), "meta", "metadata")
  if os.path.exists(meta_file):
    with open(meta_file, encoding="utf-8") as f:
      meta = json.load(f)
    if "contract" in meta:
      return meta["contract"]
  path = os.path.join(os.path.dirname(directory), FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no model contract beside the checkpoint")
  with open(path, encoding="utf-8") as f:
    return json.load(f)
