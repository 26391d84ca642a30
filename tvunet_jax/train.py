"""The training recipe: the one linear `train_and_evaluate(config, workdir)`.

It reads top to bottom: mesh, data, model and state, restore, the jitted steps (`steps.py`: pure,
state-first, jitted once with explicit shardings, the state donated), the loop (train, evaluate,
checkpoint, reduce-on-plateau), the final test evaluation. `evaluate` is one pass over a split
from the eval step's sufficient statistics.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from tvunet_jax import (
  atomic,
  checkpointing,
  contract,
  input_pipeline,
  metrics,
  models,
  resume,
  sharding,
  steps,
  writers,
)


def _check_batch_config(config: ml_collections.ConfigDict, mesh) -> int:
  """Validates global / per-device / accumulation sizes; returns the per-device batch."""
  t = config.train
  n = mesh.shape[sharding.DATA_AXIS]
  if t.grad_accum_steps < 1:
    raise ValueError(f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
  per_step = n * t.grad_accum_steps
  if t.global_batch_size % per_step:
    raise ValueError(
      f"train.global_batch_size={t.global_batch_size} is not divisible by devices ({n}) x "
      f"grad_accum_steps ({t.grad_accum_steps}) = {per_step}"
    )
  per_device = t.global_batch_size // per_step
  if t.per_device_batch_size not in (-1, per_device):
    raise ValueError(
      f"train.per_device_batch_size={t.per_device_batch_size} contradicts global_batch_size="
      f"{t.global_batch_size} / ({n} devices x {t.grad_accum_steps} accumulation steps) = "
      f"{per_device}"
    )
  if config.model.num_outputs not in (1, 2):
    raise ValueError(
      f"model.num_outputs={config.model.num_outputs}: the heads are 1 (lesion) or "
      "2 (the authors': background, lesion) sigmoid channels"
    )
  if config.eval.batch_size % n:
    raise ValueError(
      f"eval.batch_size={config.eval.batch_size} is not divisible by the {n} devices"
    )
  return per_device


def evaluate(
  eval_fn,
  state: steps.TrainState,
  source,
  names: list[str],
  *,
  config: ml_collections.ConfigDict,
  batch_sharding: jax.sharding.Sharding,
  local_eval_batch: int,
) -> dict[str, Any]:
  """A full pass over one split: the threshold table, loss, per-volume and connectivity stats.

  Nothing of the size of an image crosses between hosts: the pixel-level sums come summed from
  the device (`eval_step`); each host adds the per-slice statistics (per-volume counts,
  components) of its own rows, and those sums are added over hosts once at the end.

  Args:
    eval_fn: jitted `eval_step` (state, batch) -> (loss sums, metric sums, probs (B, H, W)).
    source: the split's random-access source; names: `input_pipeline.volume_names(source)`.

  Returns:
    `SegmentationAccumulator.result()` plus loss, bce, tv, num_slices and "overlays" (images,
    labels, probs of the first `eval.num_overlays` slices of this process's rows).
  """
  acc = metrics.SegmentationAccumulator(
    thresholds=metrics.PAPER_THRESHOLDS,
    num_bins=steps.EVAL_NUM_BINS,
    volume_names=names,
    operating_threshold=config.eval.threshold,
  )
  totals: dict[str, np.ndarray] = {}
  overlays = None
  for batch, meta in input_pipeline.eval_batches(
    source,
    local_batch_size=local_eval_batch,
    target=config.data.target,
    intensity=config.data.intensity,
    sharding=batch_sharding,
  ):
    sums, stats, probs = eval_fn(state, batch)
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    acc.add_batch_stats(jax.device_get(stats))
    probs = sharding.local_rows(probs)
    labels = sharding.local_rows(batch["label"])[..., 0]
    valid = sharding.local_rows(batch["valid"]) > 0
    if valid.any():
      acc.add_slices(
        probs[valid] >= config.eval.threshold, labels[valid], volume_ids=meta["volume_id"][valid]
      )
    if overlays is None:
      k = config.eval.num_overlays
      images = sharding.local_rows(batch["image"])[..., 0]
      overlays = (images[valid][:k], labels[valid][:k], probs[valid][:k])
  if jax.process_count() > 1:  # each host added its own rows' slices
    summed = multihost_utils.process_allgather(acc.slice_state())
    acc.set_slice_state({k: np.sum(v, axis=0) for k, v in summed.items()})
  result = acc.result()
  n = max(float(totals["count"]), 1.0)
  result.update(
    loss=float(totals["loss_sum"]) / n,
    bce=float(totals["bce_sum"]) / n,
    tv=float(totals["tv_sum"]) / n,
    num_slices=int(totals["count"]),
    overlays=overlays,
  )
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, validates, checkpoints and finally tests; returns the last metrics (host floats)."""
  workdir = os.path.abspath(workdir)
  t = config.train

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh.num_devices)
  _check_batch_config(config, mesh)  # fails before any data is built
  batch_sh = sharding.batch_sharding(mesh)
  logging.info(
    "processes %d, devices %d (%s), mesh %s",
    jax.process_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
    dict(mesh.shape),
  )

  # ---------------------------------------------------------------- data
  data_dir = input_pipeline.prepare_data(config, workdir)
  train_src = input_pipeline.load_split(data_dir, config.data.builder_config, "train")
  eval_src = input_pipeline.load_split(data_dir, config.data.builder_config, config.data.eval_split)
  a = config.data.augment
  train_iter = input_pipeline.TrainIterator(
    train_src,
    local_batch_size=sharding.local_batch_size(t.global_batch_size, mesh),
    seed=config.seed,
    target=config.data.target,
    intensity=config.data.intensity,
    augment=input_pipeline.Augment(a.flip, a.rotate_deg, a.shift_px, a.hu_jitter),
    sharding=batch_sh,
    num_threads=config.data.num_threads,
    prefetch=config.data.prefetch,
  )
  image_size = tuple(train_src[0]["image"].shape)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = t.num_steps if t.num_steps > 0 else t.num_epochs * steps_per_epoch
  eval_every = t.eval_every_steps if t.eval_every_steps > 0 else steps_per_epoch

  # ---------------------------------------------------------------- model and state
  model = models.build(config.model, axis_name=sharding.DATA_AXIS)
  ops = model.conv_backend  # resolved once, when the model was built (conv.ConvOps)
  logging.info(
    "convolutions: %s (model.conv_backend %r)", ops.describe(), config.model.conv_backend
  )
  tx = steps.make_optimizer(t.learning_rate)
  init_fn = functools.partial(steps.create_state, model=model, tx=tx, image_shape=(*image_size, 1))
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(init_fn, rng)
  state_sh = sharding.state_shardings(mesh, abstract_state, fsdp=config.mesh.fsdp)
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sh
  )
  model_contract = contract.make(config, image_size)
  config_dict = config.to_dict()
  checkpointing.write_run_info(workdir)
  if jax.process_index() == 0:
    contract.write(workdir, model_contract)
  writer = writers.MetricWriter(workdir)

  # ---------------------------------------------------------------- restore
  ckpt = checkpointing.Checkpoints(
    workdir, keep=t.keep_checkpoints, best_metric=t.best_metric, best_mode=t.best_mode
  )
  meta = {"best": None, "best_step": None, "since_best": 0, "stopped_early": False}
  changes = []
  restored = ckpt.restore_or_none(abstract_state)
  if restored is not None:
    state, data_state, meta = restored
    # Checkpoints of older versions carry no config: nothing to compare, nothing refused.
    changes = resume.config_changes(meta.get("config", config_dict), config_dict)
    for key, old, new in changes:
      logging.info("resumed with %s changed: %r -> %r", key, old, new)
    if any(key == "train.learning_rate" for key, _, _ in changes):
      state = _set_learning_rate(state, t.learning_rate, state_sh)
    train_iter.set_state(data_state)
    ckpt.repair_best(int(state.step), state, data_state, meta)
    logging.info("resumed from %s at step %d", workdir, int(state.step))
  else:
    state = jax.jit(init_fn, out_shardings=state_sh)(rng)
    if t.init_checkpoint:
      variables, _ = checkpointing.restore_variables(
        t.init_checkpoint,
        {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats},
      )
      state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
      logging.info("initialised weights from %s", t.init_checkpoint)
  if jax.process_index() == 0:
    resume.record_start(workdir, config_dict, step=int(state.step), changes=changes)
  start_step = int(state.step)

  # ---------------------------------------------------------------- steps
  train_fn = steps.make_train_fn(
    model=model,
    tx=tx,
    loss_cfg=config.loss,
    mesh=mesh,
    state_shardings=state_sh,
    accum=t.grad_accum_steps,
  )
  eval_fn = steps.make_eval_fn(
    model=model, loss_cfg=config.loss, mesh=mesh, state_shardings=state_sh
  )
  local_eval_batch = sharding.local_batch_size(config.eval.batch_size, mesh)

  eval_names = input_pipeline.volume_names(eval_src)

  def run_eval(source, names, prefix):
    result = evaluate(
      eval_fn,
      state,
      source,
      names,
      config=config,
      batch_sharding=batch_sh,
      local_eval_batch=local_eval_batch,
    )
    scalars = metrics.summary_scalars(result, threshold=config.eval.threshold)
    writer.write_scalars(int(state.step), {f"{prefix}/{k}": v for k, v in scalars.items()})
    return result, {f"eval/{k}": v for k, v in scalars.items()}

  last_saved = start_step

  def saved_meta():
    return {**meta, "contract": model_contract, "config": config_dict}

  def save(step):
    nonlocal last_saved
    if step != last_saved:
      ckpt.save(step, state, train_iter.get_state(), saved_meta())
      last_saved = step

  # ---------------------------------------------------------------- loop
  logging.info("training steps %d..%d (%d per epoch)", start_step, total_steps, steps_per_epoch)
  bar = tqdm.tqdm(
    total=total_steps,
    initial=start_step,
    disable=jax.process_index() != 0,
    desc="train",
    unit="step",
    dynamic_ncols=True,
  )
  try:
    last_eval: dict[str, Any] = {}
    t0, images = time.perf_counter(), 0
    stop_at = start_step + t.stop_after_steps if t.stop_after_steps > 0 else total_steps
    step = start_step
    while step < min(total_steps, stop_at) and not meta["stopped_early"]:
      batch = next(train_iter)
      state, m = train_fn(state, batch)
      m = jax.device_get(m)  # one small sync per step; it also bounds the dispatch queue
      step += 1
      if not m["finite"]:
        raise FloatingPointError(
          f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, grad_norm="
          f"{float(m['grad_norm'])}); nothing of this step was saved, the last checkpoint in "
          f"{workdir}/checkpoints is intact"
        )
      images += t.global_batch_size
      bar.update(1)
      if step % t.log_every_steps == 0 or step == total_steps:
        dt = time.perf_counter() - t0
        scalars = {f"train/{k}": float(v) for k, v in m.items() if k != "finite"}
        scalars["train/images_per_sec"] = images / dt
        scalars["train/steps_per_sec"] = images / t.global_batch_size / dt
        writer.write_scalars(step, scalars)
        bar.set_postfix(loss=f"{float(m['loss']):.4f}", img_s=f"{images / dt:.1f}")
        t0, images = time.perf_counter(), 0
      if step % eval_every == 0 or step == total_steps:
        result, last_eval = run_eval(eval_src, eval_names, "eval")
        writer.write_overlays(step, *result.pop("overlays"), threshold=config.eval.threshold)
        improved = _update_plateau(meta, last_eval[t.best_metric], t)
        if improved:
          meta["best_step"] = step
        if meta.get("lr_drop"):
          lr = max(
            float(state.opt_state.hyperparams["learning_rate"]) * t.plateau_factor,
            t.min_learning_rate,
          )
          state = _set_learning_rate(state, lr, state_sh)
          logging.info("step %d: validation plateau, learning rate -> %g", step, lr)
        bar.write(
          f"step {step}: "
          + ", ".join(
            f"{k[5:]} {v:.4f}"
            for k, v in last_eval.items()
            if k in ("eval/loss", "eval/dice", "eval/iou", "eval/average_precision")
          )
        )
        save(step)  # latest first, then best: the order `Checkpoints` repairs after a kill
        if improved:
          ckpt.save_best(
            step, state, train_iter.get_state(), saved_meta(), last_eval[t.best_metric]
          )
      elif step % t.checkpoint_every_steps == 0:
        save(step)
    if step == stop_at and step < total_steps:
      save(step)
      logging.info(
        "stopped after %d steps of this run at step %d (stop_after_steps)", t.stop_after_steps, step
      )

    # ---------------------------------------------------------------- final test
    final = {k: float(v) for k, v in last_eval.items()}
    finished = step >= total_steps or meta["stopped_early"]
    if finished and config.data.test_split:
      test_src = input_pipeline.load_split(
        data_dir, config.data.builder_config, config.data.test_split
      )
      result, _ = run_eval(test_src, input_pipeline.volume_names(test_src), "test")
      result.pop("overlays")
      final.update(
        {
          f"test/{k}": v
          for k, v in metrics.summary_scalars(result, threshold=config.eval.threshold).items()
        }
      )
      # What a constant prediction scores: all-lesion gives Dice 2P / (P + N), all-background 0.
      positives = float(result["tp"][0] + result["fn"][0])
      final["test/dice_constant_baseline"] = (
        2 * positives / (positives + float(result["num_pixels"]))
      )
      if jax.process_index() == 0:
        atomic.write_json(os.path.join(workdir, "test_metrics.json"), metrics.to_jsonable(result))
    final["param_fingerprint"] = param_fingerprint(state.params)
  finally:  # also on a non-finite step or an evaluation error: flush saves, stop threads
    bar.close()
    ckpt.wait()
    ckpt.close()
    train_iter.close()
    writer.close()
  return final


def param_fingerprint(params) -> float:
  """sum |p| * (1 + index) over this process's own copy of the parameters.

  Computed from local device data, so two processes that disagree on replicated parameters
  print different numbers (the multi-process test compares them).
  """
  total = 0.0
  for i, leaf in enumerate(jax.tree.leaves(params)):
    local = np.concatenate(
      [np.ravel(s.data) for s in leaf.addressable_shards if s.replica_id == 0]
      or [np.ravel(leaf.addressable_data(0))]
    )
    total += float(np.sum(np.abs(local.astype(np.float64)))) * (1 + i)
  return total


def _update_plateau(meta: dict, value: float, t: ml_collections.ConfigDict) -> bool:
  """Reduce-on-plateau and early-stopping bookkeeping (host side, checkpointed in `meta`)."""
  better = meta["best"] is None or (
    value < meta["best"] if t.best_mode == "min" else value > meta["best"]
  )
  meta["lr_drop"] = False
  if better:
    meta["best"], meta["since_best"] = float(value), 0
  else:
    meta["since_best"] += 1
    if t.plateau_patience > 0 and meta["since_best"] % t.plateau_patience == 0:
      meta["lr_drop"] = True
    if t.early_stop_patience > 0 and meta["since_best"] >= t.early_stop_patience:
      meta["stopped_early"] = True
  return better


def _set_learning_rate(state: steps.TrainState, lr: float, state_sh) -> steps.TrainState:
  hp = dict(state.opt_state.hyperparams)
  hp["learning_rate"] = jnp.asarray(lr, hp["learning_rate"].dtype)
  state = state.replace(opt_state=state.opt_state._replace(hyperparams=hp))
  return jax.device_put(state, state_sh)
