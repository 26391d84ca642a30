"""Saved state: Orbax checkpoints, the resume order, and what is written beside the weights.

Layout of a workdir:
  checkpoints/<step>/   the last `keep` training checkpoints: `state` (params, BatchNorm statistics,
                        optimizer state incl. learning rate, step, RNG), `data` (input iterator
                        state) and `meta` (loop counters, config, model contract).
  best/<step>/          the single best checkpoint by the configured validation metric.
  config.json, config_history.json   the first start's config, and every start's (`resume`).
  versions.json, model_contract.json   written at start by process 0.

Resume order (`Checkpoints.restore_or_none` + `restore_variables`, used by train.py): an existing
checkpoint in the workdir, else an explicit `init_checkpoint` (weights only), else scratch.

Every restore goes into an abstract target carrying shardings, so a checkpoint written on 8 devices
restores on 1 and vice versa. Saves are asynchronous; `wait()` before reading files or exiting.

Kill-anywhere safety. Orbax commits a step by renaming its temporary folder, and leftover
temporary folders are removed when a manager opens. At an improved evaluation the latest
checkpoint S is saved first and the best one second; before any later latest checkpoint is saved
the best save is waited for. So after a kill the two managers can disagree in two ways only, and
both are repaired rather than refused:
  * best/S committed, checkpoints/S not (the run resumes from an earlier step): reaching S again,
    `save_best` finds S already in best/ and keeps it. Training is deterministic in (seed, step),
    so the kept files are what the save would have written.
  * checkpoints/S committed, best/S not: the checkpoint's meta names S as its best step, so
    `repair_best` saves the restored state (the same state) as best/S at start.
A kill after a save committed and before Orbax deleted the oldest step leaves one step too many;
opening the managers prunes it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from tvunet_jax import atomic

VERSIONED_PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "numpy",
  "tensorflow-datasets",
  "grain",
  "nibabel",
  "tvunet_jax",
)


class Checkpoints:
  """The two Orbax managers of a workdir: recent checkpoints and the best one."""

  def __init__(
    self, workdir: str, *, keep: int = 3, best_metric: str = "eval/loss", best_mode: str = "min"
  ):
    self.best_metric = best_metric
    self.last = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True
      ),
    )
    self.best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "best"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[best_metric],
        best_mode=best_mode,
        keep_checkpoints_without_metrics=False,
        create=True,
        cleanup_tmp_directories=True,
      ),
    )
    # Orbax deletes the oldest checkpoint after a new one commits, and only when it saves: a kill
    # in between leaves one too many, which a resumed run that saves nothing more would keep.
    # Pruned here, oldest first (the best manager's older one too), on every process as Orbax's
    # own deletes.
    for manager, n in ((self.last, keep), (self.best, 1)):
      for step in sorted(manager.all_steps())[:-n]:
        manager.delete(step)
        logging.info("removed checkpoint %d left over by a killed start (keeping %d)", step, n)

  @staticmethod
  def _args(state, data_state: dict, meta: dict):
    return ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    )

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    # A pending best save must commit before a later latest checkpoint can (see the docstring).
    self.best.wait_until_finished()
    self.last.save(step, args=self._args(state, data_state, meta), force=True)

  def save_best(self, step: int, state, data_state: dict, meta: dict, value: float) -> bool:
    """Saves `step` as the best checkpoint unless best/ already holds it; True if it saved."""
    if step in self.best.all_steps():
      logging.info(
        "best checkpoint %d is already in best/ (an interrupted start saved it): kept", step
      )
      return False
    self.best.save(
      step,
      args=self._args(state, data_state, meta),
      metrics={self.best_metric: float(value)},
      force=True,
    )
    return True

  def repair_best(self, step: int, state, data_state: dict, meta: dict) -> None:
    """After a resume from `step`: if its meta names `step` as the best step and best/ lacks it
    (killed between the two saves), saves the restored state as best/`step`."""
    if (
      meta.get("best_step") == step
      and meta.get("best") is not None
      and step not in self.best.all_steps()
    ):
      self.save_best(step, state, data_state, meta, meta["best"])
      logging.info("best checkpoint %d was missing (killed between the two saves): saved", step)

  def restore_or_none(self, abstract_state) -> tuple[Any, dict, dict] | None:
    """Latest checkpoint of this workdir restored into `abstract_state`'s shapes and shardings."""
    step = self.last.latest_step()
    if step is None:
      return None
    out = self.last.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return out["state"], out["data"], out["meta"]

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.last.close()
    self.best.close()


def find_checkpoint(path: str) -> tuple[str, int]:
  """A workdir, a `checkpoints`/`best` folder or one step folder -> (manager dir, step).

  A workdir resolves to its best checkpoint if it has one, else its latest.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  for sub in ("best", "checkpoints", ""):
    d = os.path.join(path, sub) if sub else path
    if os.path.isdir(d):
      steps = [
        int(s) for s in os.listdir(d) if s.isdigit() and os.path.isdir(os.path.join(d, s, "state"))
      ]
      if steps:
        return d, max(steps)
  raise FileNotFoundError(
    f"{path}: no checkpoint found (expected a workdir, a 'checkpoints' or "
    "'best' folder, or a step folder)"
  )


def restore_variables(path: str, abstract_variables: dict) -> tuple[dict, dict]:
  """Model variables only ({'params', 'batch_stats'}) and the saved meta from any checkpoint.

  Used for `init_checkpoint` (fine-tuning starts from these weights with a fresh optimizer) and
  by inference. `abstract_variables` carries the target shapes, dtypes and shardings; a
  checkpoint whose shapes differ (another model config) fails with a message naming the path.
  """
  directory, step = find_checkpoint(path)
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    target = {
      "params": abstract_variables["params"],
      "batch_stats": abstract_variables.get("batch_stats", {}),
    }
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      ),
    )
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"{directory}/{step}: checkpoint does not fit this model "
      f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from None
  finally:
    mngr.close()
  return restored["state"], meta


def library_versions(packages=VERSIONED_PACKAGES) -> dict[str, str]:
  """Python, platform, JAX backend and the installed version of each of `packages`."""
  out = {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "jax_backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
  }
  for pkg in packages:
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def write_run_info(workdir: str) -> None:
  """Library versions of this start, beside the checkpoints (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  atomic.write_json(os.path.join(workdir, "versions.json"), library_versions())
