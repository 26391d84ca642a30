"""Training system: end-to-end tiny runs, 1-vs-8 devices, exact resume, bad configs, NaN stop."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tvunet_jax import (
  checkpointing,
  input_pipeline,
  losses,
  models,
  predict,
  sharding,
  steps,
  train,
)
from tvunet_jax import contract as contract_lib


def _final_params(workdir, cfg):
  model = models.build(cfg.model)
  abstract = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 1))
  )
  variables, meta = checkpointing.restore_variables(os.path.join(workdir, "checkpoints"), abstract)
  return variables, meta


def test_tiny_run_end_to_end(tiny_config, tmp_path):
  tiny_config.eval.threshold = 0.35  # off the 0.1..0.9 grid: the operating point is its own
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(tiny_config, workdir)
  for f in ("config.json", "versions.json", "model_contract.json", "test_metrics.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(
    int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()
  ) == [2, 4]  # keep_checkpoints = 2
  assert len([s for s in os.listdir(os.path.join(workdir, "best")) if s.isdigit()]) == 1
  assert np.isfinite(final["eval/loss"]) and np.isfinite(final["test/loss"])
  assert 0.0 <= final["test/dice"] <= 1.0 or np.isnan(final["test/dice"])
  with open(os.path.join(workdir, "test_metrics.json")) as f:
    report = json.load(f)
  assert len(report["threshold"]) == 9 and "paper_miou" in report
  assert report["operating_threshold"] == 0.35
  contract = contract_lib.read(workdir)
  assert contract["image_size"] == [128, 128] and contract["intensity"] == "lung_window"
  assert contract["threshold"] == 0.35


def _run_steps(cfg, mesh, batches, n_steps):
  """Losses of n_steps train steps on `mesh` over the given host batches."""
  model = models.build(cfg.model)
  tx = steps.make_optimizer(cfg.train.learning_rate)
  init = functools.partial(steps.create_state, model=model, tx=tx, image_shape=(128, 128, 1))
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sh = sharding.state_shardings(mesh, abstract)
  batch_sh = sharding.batch_sharding(mesh)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0))
  step = jax.jit(
    functools.partial(steps.train_step, model=model, tx=tx, loss_cfg=cfg.loss),
    in_shardings=(state_sh, batch_sh),
    donate_argnums=0,
  )
  curve = []
  for b in batches[:n_steps]:
    state, m = step(state, input_pipeline.to_global(b, batch_sh))
    curve.append(float(m["loss"]))
  return np.array(curve), jax.device_get(state.params)


def test_one_vs_eight_devices_same_loss_curve(tiny_config):
  src = input_pipeline.load_split(tiny_config.data.data_dir, "paper_128", "train")
  it = input_pipeline.TrainIterator(
    src, local_batch_size=8, seed=0, intensity=tiny_config.data.intensity
  )
  batches = [next(it) for _ in range(3)]
  # Dropout stays on: its `rbg` masks must not depend on how the batch is laid out.
  l1, p1 = _run_steps(tiny_config, sharding.make_mesh(1), batches, 3)
  l8, p8 = _run_steps(tiny_config, sharding.make_mesh(8), batches, 3)
  assert l1[0] != l1[2]  # it trains
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p8), jax.tree.leaves(p1)):
    name = jax.tree_util.keystr(path)
    if "conv_" in name and "bias" in name:
      # A conv bias followed by BatchNorm has a true gradient of 0; Adam scales the round-off
      # left in it (which differs with the reduction order) up to a full step. Only bounded.
      np.testing.assert_allclose(a, b, atol=3 * 3 * tiny_config.train.learning_rate)
    else:
      # Adam divides by sqrt(v): where a gradient is near zero, the 1- and 8-device reduction
      # orders' round-off moves an element by a sizeable fraction of its tiny update (measured:
      # 1.7e-5 after 3 steps, 1.7% of one 1e-3 step). Bound it by 5% of a step; a real sharding
      # error (e.g. a missing gradient psum) moves most elements by ~1 step.
      np.testing.assert_allclose(
        a, b, rtol=1e-3, atol=0.05 * tiny_config.train.learning_rate, err_msg=name
      )


def test_evaluation_is_the_same_on_one_and_eight_devices(tiny_config):
  """`train.evaluate` on an 8-device mesh (pixel sums reduced inside the step, per-slice sums from
  each device's rows) gives the 1-device report: the paper table, AP, per-volume Dice and
  component counts, with the eval batch padded (9 test slices in batches of 8)."""
  cfg = tiny_config
  src = input_pipeline.load_split(cfg.data.data_dir, "paper_128", "test")
  names = input_pipeline.volume_names(src)
  model = models.build(cfg.model, axis_name=sharding.DATA_AXIS)
  tx = steps.make_optimizer(cfg.train.learning_rate)
  init = functools.partial(steps.create_state, model=model, tx=tx, image_shape=(128, 128, 1))
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    state_sh = sharding.state_shardings(mesh, jax.eval_shape(init, jax.random.PRNGKey(0)))
    state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0))
    eval_fn = steps.make_eval_fn(
      model=model, loss_cfg=cfg.loss, mesh=mesh, state_shardings=state_sh
    )
    results.append(
      train.evaluate(
        eval_fn,
        state,
        src,
        names,
        config=cfg,
        batch_sharding=sharding.batch_sharding(mesh),
        local_eval_batch=cfg.eval.batch_size,
      )
    )
  one, eight = results
  assert one["num_slices"] == len(src) == 9
  for k in ("tp", "fp", "fn", "tn"):
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-6, err_msg=k)
  for k in ("average_precision", "paper_miou_soft", "loss", "mean_volume_dice"):
    assert eight[k] == pytest.approx(one[k], rel=1e-5), k
  np.testing.assert_allclose(eight["per_volume"]["dice"], one["per_volume"]["dice"], rtol=1e-6)
  assert eight["connectivity"] == pytest.approx(one["connectivity"])
  assert list(one["per_volume"]["volume_id"]) == names


def test_stop_and_resume_equals_straight_run(tiny_config, tmp_path):
  tiny_config.data.test_split = ""
  tiny_config.train.num_steps = 5
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(tiny_config, straight)
  resumed = str(tmp_path / "resumed")
  tiny_config.train.stop_after_steps = 3  # "preempted" after 3 steps, then the same command
  train.train_and_evaluate(tiny_config, resumed)
  assert max(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints")) if s.isdigit()) == 3
  train.train_and_evaluate(tiny_config, resumed)
  (a, meta_a), (b, meta_b) = (
    _final_params(straight, tiny_config),
    _final_params(resumed, tiny_config),
  )
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert meta_a["best"] == meta_b["best"]


def test_resume_on_another_device_count(tiny_config, tmp_path):
  tiny_config.data.test_split = ""
  tiny_config.train.num_steps = 4
  workdir = str(tmp_path / "run")
  tiny_config.train.stop_after_steps = 2
  train.train_and_evaluate(tiny_config, workdir)  # 8 devices
  tiny_config.mesh.num_devices = 1
  tiny_config.train.stop_after_steps = -1
  train.train_and_evaluate(tiny_config, workdir)  # restored onto 1 device, finishes
  params, _ = _final_params(workdir, tiny_config)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  assert max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == 4


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("global_batch_size", 12, "not divisible by devices"),
    ("per_device_batch_size", 2, "contradicts global_batch_size"),
    ("grad_accum_steps", 0, "must be >= 1"),
  ],
)
def test_impossible_batch_configs_fail_at_start(tiny_config, tmp_path, field, value, match):
  setattr(tiny_config.train, field, value)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config, str(tmp_path / "bad"))


def test_grad_accumulation_averages_micro_batch_gradients(tiny_config):
  """accum=2 applies the mean of the two micro-batches' gradients (SGD, lr 1: delta = -grad)."""
  model = models.build(tiny_config.model)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  state = steps.create_state(jax.random.PRNGKey(0), model=model, tx=tx, image_shape=(16, 16, 1))
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
    "label": (rng.random((8, 16, 16, 1)) > 0.7).astype(np.float32),
  }
  step = functools.partial(steps.train_step, model=model, tx=tx, loss_cfg=tiny_config.loss)
  acc_state, m_acc = jax.jit(functools.partial(step, accum=2, n_devices=1))(state, batch)
  # Each micro-batch alone, from the same state; dropout keys match fold_in(step key, i).
  deltas, micro_losses = [], []
  for i in range(2):
    half = jax.tree.map(lambda x, i=i: x[i * 4 : (i + 1) * 4], batch)
    key = jax.random.fold_in(
      jax.random.fold_in(
        jax.random.wrap_key_data(state.rng, impl=steps.DROPOUT_RNG_IMPL), state.step
      ),
      i,
    )

    def loss_fn(params, half=half, key=key):
      logits, _ = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        half["image"],
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats"],
      )
      return losses.total_loss(
        logits,
        half["label"],
        tv_weight=tiny_config.loss.tv_weight,
        dice_weight=tiny_config.loss.dice_weight,
      )[0]

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    deltas.append(grads)
    micro_losses.append(float(loss))
  np.testing.assert_allclose(float(m_acc["loss"]), np.mean(micro_losses), rtol=1e-5)
  expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, state.params, *deltas)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc_state.params, expected
  )


def test_non_finite_step_is_flagged_and_stops_run(tiny_config, tmp_path, monkeypatch):
  model = models.build(tiny_config.model)
  tx = steps.make_optimizer(1e-3)
  state = steps.create_state(jax.random.PRNGKey(0), model=model, tx=tx, image_shape=(16, 16, 1))
  bad = {
    "image": np.full((2, 16, 16, 1), np.nan, np.float32),
    "label": np.zeros((2, 16, 16, 1), np.float32),
  }
  new, m = jax.jit(
    functools.partial(steps.train_step, model=model, tx=tx, loss_cfg=tiny_config.loss)
  )(state, bad)
  assert float(m["finite"]) == 0.0

  # In the loop: step 3 gets a NaN batch; the run stops naming it, checkpoint 2 stays readable.
  real_next = input_pipeline.TrainIterator.__next__

  def poisoned_next(self):
    batch = real_next(self)
    if self.get_state()["step"] == 3:
      batch = {k: v * jnp.nan if k == "image" else v for k, v in batch.items()}
    return batch

  monkeypatch.setattr(input_pipeline.TrainIterator, "__next__", poisoned_next)
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match="step 3"):
    train.train_and_evaluate(tiny_config, workdir)
  params, _ = _final_params(workdir, tiny_config)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_load_for_inference_reproduces_eval_logits(tiny_config, tmp_path):
  """The weights and contract saved by a run rebuild the same network with no config file."""
  tiny_config.data.test_split = ""
  tiny_config.train.num_steps = 2
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config, workdir)
  model, variables, contract = predict.load_model(workdir)
  assert contract["model"]["base"] == tiny_config.model.base
  x = np.random.default_rng(0).normal(size=(2, 128, 128, 1)).astype(np.float32)
  ref_model = models.build(tiny_config.model)
  ref_vars, _ = _final_params(workdir, tiny_config)
  np.testing.assert_array_equal(
    model.apply(variables, x, train=False), ref_model.apply(ref_vars, x, train=False)
  )


def test_plateau_and_early_stopping_bookkeeping(tiny_config):
  t = tiny_config.train
  t.plateau_patience, t.early_stop_patience, t.best_mode = 2, 3, "min"
  meta = {"best": None, "since_best": 0, "stopped_early": False}
  seen = []
  for value in [1.0, 0.9, 0.95, 0.93, 0.92, 0.8, 0.85, 0.84, 0.83]:
    improved = train._update_plateau(meta, value, t)  # pylint: disable=protected-access
    seen.append((improved, meta["lr_drop"], meta["stopped_early"]))
  assert [s[0] for s in seen] == [True, True, False, False, False, True, False, False, False]
  # LR drops after 2 evaluations without improvement (and again after 4), stop after 3.
  assert [s[1] for s in seen] == [False, False, False, True, False, False, False, True, False]
  assert [s[2] for s in seen] == [False] * 4 + [True] * 5  # once stopped, stays stopped
  assert meta["best"] == 0.8


def test_init_checkpoint_starts_from_its_weights(tiny_config, tmp_path):
  tiny_config.data.test_split = ""
  tiny_config.train.num_steps = 2
  first = str(tmp_path / "first")
  train.train_and_evaluate(tiny_config, first)
  tiny_config.train.init_checkpoint = first
  tiny_config.train.learning_rate = 0.0  # Adam with lr 0: the weights stay the restored ones
  tiny_config.train.num_steps = 1
  second = str(tmp_path / "second")
  train.train_and_evaluate(tiny_config, second)
  a, _ = _final_params(first, tiny_config)
  b, _ = _final_params(second, tiny_config)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])


def test_paper_head_trains_and_predict_reads_its_lesion_channel(tiny_config, tmp_path):
  """The authors' 2-channel sigmoid head: trains, its contract names channel 1, and predict
  returns sigmoid of that channel."""
  from tvunet_jax import contract as contract_lib  # pylint: disable=g-import-not-at-top
  from tvunet_jax import predict  # pylint: disable=g-import-not-at-top

  tiny_config.model.num_outputs = 2
  tiny_config.data.test_split = ""
  tiny_config.train.num_steps = 2
  workdir = str(tmp_path / "paper_head")
  final = train.train_and_evaluate(tiny_config, workdir)
  assert np.isfinite(final["eval/loss"])
  c = contract_lib.read(workdir)
  assert c["output_channel"] == 1 and c["model"]["num_outputs"] == 2
  predictor, _ = predict.checkpoint_predictor(workdir, mesh=sharding.make_mesh(1), batch_size=4)
  model, variables, _ = predict.load_model(workdir, sharding.make_mesh(1))
  x = np.random.default_rng(0).uniform(0, 1, (3, 128, 128)).astype(np.float32)
  logits = np.asarray(model.apply(variables, x[..., None], train=False))
  assert logits.shape == (3, 128, 128, 2)
  np.testing.assert_allclose(predictor(x), 1 / (1 + np.exp(-logits[..., 1])), atol=1e-5)
