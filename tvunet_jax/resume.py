"""What a resumed run may change: the config rules checked at every start, and the start history.

A run is one workdir. Its first start writes `config.json`; every start (the first included)
appends its resolved config, the step it started from and the fields it changed to
`config_history.json`, so no segment's config is ever lost. On a resumed start the config saved in
the latest checkpoint is compared with the one given now:

* fields in `MUTABLE_ON_RESUME` may change and take effect from the resumed step on (each change is
  logged with its old and new value): the length of training, the learning rate and its schedule,
  evaluation and checkpoint cadence, logging, early stopping, host-side data loading, the device
  count (checkpoints restore onto any mesh; the global batch stays) and the conv backend (a
  property of the machine, not of the weights);
* every other field -- model, data, split, target, augmentation, loss, seed, the global batch and
  its accumulation, the best-checkpoint metric -- defines what the checkpoint's numbers mean, so a
  change stops the start with one line naming the field and both values.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from tvunet_jax import atomic

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.json"

MUTABLE_ON_RESUME = frozenset(
  {
    "train.num_epochs",
    "train.num_steps",
    "train.stop_after_steps",
    "train.learning_rate",
    "train.plateau_patience",
    "train.plateau_factor",
    "train.min_learning_rate",
    "train.early_stop_patience",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.init_checkpoint",
    "train.per_device_batch_size",
    "eval.batch_size",
    "eval.num_overlays",
    "data.num_threads",
    "data.prefetch",
    "data.manual_dir",
    "data.data_dir",
    "mesh.num_devices",
    "mesh.fsdp",
    "model.conv_backend",
  }
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples compare as lists."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """Allowed changes (field, old, new) from the checkpoint's config to this start's.

  Raises:
    ValueError: one line naming the first field that may not change on resume and both values.
  """
  old, new = flatten(saved), flatten(json.loads(json.dumps(now, default=str)))
  changes = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a == b:
      continue
    if key not in MUTABLE_ON_RESUME:
      raise ValueError(
        f"config field {key} may not change on resume: checkpoint {a!r}, now "
        f"{b!r}; revert it or start a new workdir"
      )
    changes.append((key, a, b))
  return changes


def record_start(
  workdir: str, config: dict[str, Any], *, step: int, changes: list[tuple[str, Any, Any]]
) -> None:
  """Keeps this start's resolved config: `config.json` once, and one entry in the history."""
  os.makedirs(workdir, exist_ok=True)
  first = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(first):
    atomic.write_json(first, config)
  path = os.path.join(workdir, HISTORY_FILE)
  history = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      history = json.load(f)
  history.append(
    {
      "start_step": step,
      "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "changes": [{"field": k, "old": a, "new": b} for k, a, b in changes],
      "config": config,
    }
  )
  atomic.write_json(path, history)
