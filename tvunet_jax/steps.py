"""The jitted steps: the train state, the optimizer, `train_step`, `eval_step` and their factories.

`train_step` and `eval_step` are module-level, state-first and pure; `make_train_fn` and
`make_eval_fn` bind their static arguments with `functools.partial` and jit them once with explicit
in/out shardings (the state donated), traced under the mesh so the CPU kernels run per shard. They
are the one factory of training, the tests and the benchmark.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from tvunet_jax import losses, metrics, models, sharding

EVAL_NUM_BINS = 1000  # score-histogram bins of the PR curve / AP (`metrics.score_histogram`)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32, optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any  # optax state; the learning rate lives in its hyperparams
  rng: jax.Array  # (4,) uint32 raw `rbg` key data; dropout of step s uses fold_in(rng, s)


DROPOUT_RNG_IMPL = "rbg"


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
  # inject_hyperparams puts the LR into the optimizer state: reduce-on-plateau changes it between
  # steps without recompiling, and checkpoints carry it.
  return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def create_state(
  rng: jax.Array,
  *,
  model: models.UNet,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
) -> TrainState:
  """Fresh state for (H, W, C) inputs; jitted with `out_shardings` so it is born sharded."""
  init_rng, dropout_seed = jax.random.split(rng)
  # Dropout draws from the `rbg` generator (XLA RngBitGenerator): its masks compile ~25x faster
  # than threefry's on XLA:CPU and are identical on 1 and 8 devices (tested).
  state_rng = jax.random.key_data(
    jax.random.key(jax.random.bits(dropout_seed, (), jnp.uint32), impl=DROPOUT_RNG_IMPL)
  )
  # Parameters are born replicated, so the partitionable threefry (needed for layout-independent
  # dropout masks) buys nothing here and compiles ~5x slower on XLA:CPU.
  with jax.threefry_partitionable(False):
    variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=state_rng,
  )


def _microbatches(x: jax.Array, n_devices: int, accum: int) -> jax.Array:
  """(G, ...) rows sharded over devices -> (accum, G / accum, ...), each micro-batch spread over
  all devices (row r of device d goes to micro-batch (r // per_device) of that device's rows)."""
  g = x.shape[0]
  x = x.reshape(n_devices, accum, g // (n_devices * accum), *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(accum, g // accum, *x.shape[3:])


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: models.UNet,
  tx: optax.GradientTransformation,
  loss_cfg: ml_collections.ConfigDict,
  accum: int = 1,
  n_devices: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch.

  Args:
    state: the sharded `TrainState` (donated by the caller's jit).
    batch: "image" (B, H, W, C) f32 and "label" (B, H, W, K) f32, B the global batch.
    accum: micro-batches whose gradients are averaged before the update.

  Returns:
    The new state and scalar metrics: loss, bce, tv, dice (means over the batch), grad_norm,
    update_norm, param_norm, learning_rate and `finite` (1.0 if loss and gradients are finite;
    the caller must not keep or save a state from a step with `finite == 0`).
  """
  dropout_rng = jax.random.fold_in(
    jax.random.wrap_key_data(state.rng, impl=DROPOUT_RNG_IMPL), state.step
  )

  def loss_fn(params, batch_stats, micro, rng):
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      micro["image"],
      train=True,
      rngs={"dropout": rng},
      mutable=["batch_stats"],
    )
    loss, aux = losses.total_loss(
      logits,
      micro["label"],
      tv_weight=loss_cfg.tv_weight,
      tv_reduction=loss_cfg.tv_reduction,
      tv_kind=loss_cfg.tv_kind,
      dice_weight=loss_cfg.dice_weight,
    )
    return loss, (updates["batch_stats"], aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, (batch_stats, aux)), grads = grad_fn(state.params, state.batch_stats, batch, dropout_rng)
  else:
    micro_batches = jax.tree.map(lambda x: _microbatches(x, n_devices, accum), batch)

    def body(carry, xs):
      grads_sum, batch_stats = carry
      micro, i = xs
      (loss, (batch_stats, aux)), grads = grad_fn(
        state.params, batch_stats, micro, jax.random.fold_in(dropout_rng, i)
      )
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats), (loss, aux) = jax.lax.scan(
      body, (zeros, state.batch_stats), (micro_batches, jnp.arange(accum))
    )
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss, aux = jnp.mean(loss), jax.tree.map(jnp.mean, aux)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  # No in-graph guard (a tree-wide select costs compile time and memory traffic every step): the
  # host stops the run on `finite == 0` before anything is saved, so checkpoints stay good.
  out = {
    "loss": loss,
    **aux,
    "grad_norm": grad_norm,
    "update_norm": optax.tree.norm(updates),
    "param_norm": optax.tree.norm(params),
    "learning_rate": opt_state.hyperparams["learning_rate"],
    "finite": finite.astype(jnp.float32),
  }
  return new_state, out


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: models.UNet,
  loss_cfg: ml_collections.ConfigDict,
  num_bins: int = EVAL_NUM_BINS,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
  """Loss sums, metric sums and probabilities of one padded evaluation batch (padding: valid 0).

  The loss is computed per image and averaged over images, so `eval/loss` does not depend on the
  eval batch size; with `dice_weight > 0` its Dice term is per image (training pools the soft Dice
  over its batch), so eval and train losses differ by construction.

  Returns:
    ({"loss_sum", "bce_sum", "tv_sum", "count"} summed over valid rows;
     `metrics.batch_stats` of the lesion channel over valid rows (confusion counts at the paper's
     thresholds, the `num_bins` score histograms, the paper-mIoU sums): sums over the whole
     batch, so they reduce across devices inside the step;
     probabilities (B, H, W) float32 of the lesion channel (`losses.lesion_channel`), left
     batch-sharded: each host reads only its own rows, for the per-slice statistics).
  """
  logits = model.apply(
    {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
  )
  valid = batch["valid"]

  def per_image(lg, lb):
    loss, aux = losses.total_loss(
      lg[None],
      lb[None],
      tv_weight=loss_cfg.tv_weight,
      tv_reduction=loss_cfg.tv_reduction,
      tv_kind=loss_cfg.tv_kind,
      dice_weight=loss_cfg.dice_weight,
    )
    return loss, aux["bce"], aux["tv"]

  loss, bce, tv = jax.vmap(per_image)(logits, batch["label"])
  probs = jax.nn.sigmoid(logits[..., losses.lesion_channel(logits.shape[-1])])
  sums = {
    "loss_sum": jnp.sum(loss * valid),
    "bce_sum": jnp.sum(bce * valid),
    "tv_sum": jnp.sum(tv * valid),
    "count": jnp.sum(valid),
  }
  stats = metrics.batch_stats(
    probs,
    batch["label"][..., 0],
    metrics.PAPER_THRESHOLDS,
    valid[:, None, None].astype(probs.dtype),
    num_bins=num_bins,
  )
  return sums, stats, probs


def make_train_fn(
  *,
  model: models.UNet,
  tx: optax.GradientTransformation,
  loss_cfg: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  state_shardings: Any,
  accum: int = 1,
):
  """The one jitted `train_step`: (state, batch) -> (state, metrics), used by training, tests and
  the benchmark. The state is donated; batches are sharded over the mesh's data axis, metrics
  replicated; it traces under `mesh` so the CPU kernels run per shard."""
  batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    loss_cfg=loss_cfg,
    accum=accum,
    n_devices=mesh.shape[sharding.DATA_AXIS],
  )
  return sharding.under_mesh(
    mesh,
    jax.jit(
      step,
      in_shardings=(state_shardings, batch_sh),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
    ),
  )


def make_eval_fn(
  *,
  model: models.UNet,
  loss_cfg: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  state_shardings: Any,
):
  """The one jitted `eval_step`: (state, batch) -> (loss sums, metric sums, probabilities); the
  sums replicated, the probabilities batch-sharded."""
  batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return sharding.under_mesh(
    mesh,
    jax.jit(
      functools.partial(eval_step, model=model, loss_cfg=loss_cfg),
      in_shardings=(state_shardings, batch_sh),
      out_shardings=(replicated, replicated, batch_sh),
    ),
  )
