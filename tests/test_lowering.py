"""The train step and predict's network lower for TPU and CUDA on this CPU-only machine.

`jax.export` lowers a jitted function for platforms that are not present. With the TPU config's
model settings (bfloat16 compute, float32 parameters) over a mesh of the 8 fake devices, the
lowered modules must exist and hold no CPU-only custom call (the oneDNN / Winograd kernels, or any
CPU library call). What has to be set for that: the model's `conv_backend="xla"` (and no
TVUNET_CONV_BACKEND overriding it): with 'auto', the backend is chosen from JAX's default
backend (CPU here), not from the export's target platform, and the oneDNN kernels are traced in.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import tpu
from tvunet_jax import export, models, sharding, steps
from tvunet_jax.kernels import conv, library

SIZE = 32  # tiny model (base 4, depth 2) at 32x32: lowering is shape-only, seconds
BATCH = 16  # global batch: 2 rows per fake device
CPU_TARGET = re.compile(r"^(tvunet|lapack_|ducc_|cpu_|xla_cpu|onednn|__onednn)")


def _tpu_model(conv_backend: str) -> tuple[models.UNet, object]:
  """The TPU config's model settings at tiny size, and its config."""
  cfg = tpu.get_config()
  model_cfg = {**cfg.model.to_dict(), "base": 4, "depth": 2, "conv_backend": conv_backend}
  model = models.build(model_cfg)
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
  return model, cfg


@pytest.fixture
def mesh(monkeypatch):
  monkeypatch.delenv(conv.ENV_BACKEND, raising=False)  # the model's field decides
  m = sharding.make_mesh()
  assert m.devices.size == 8
  return m


def _lower_train_step(model, cfg, mesh, platform):
  tx = steps.make_optimizer(cfg.train.learning_rate)
  init = functools.partial(steps.create_state, model=model, tx=tx, image_shape=(SIZE, SIZE, 1))
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sh = sharding.state_shardings(mesh, abstract)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh
  )
  rows = sharding.batch_sharding(mesh)
  batch = {
    k: jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 1), jnp.float32, sharding=rows)
    for k in ("image", "label")
  }
  train_fn = steps.make_train_fn(
    model=model, tx=tx, loss_cfg=cfg.loss, mesh=mesh, state_shardings=state_sh
  )
  # make_train_fn returns the jitted step wrapped (functools.wraps) to run under the mesh;
  # jax.export needs the jit object itself, so it is exported under the same mesh here.
  with jax.set_mesh(mesh):
    return jax.export.export(train_fn.__wrapped__, platforms=(platform,))(abstract, batch), abstract


def _lower_network(model, mesh, platform):
  variables = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.PRNGKey(0),
    jnp.zeros((1, SIZE, SIZE, 1), jnp.float32),
  )
  rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  variables = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), variables
  )
  images = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 1), jnp.float32, sharding=rows)
  # predict's network function, sharded as predict runs it: variables replicated, rows split.
  fn = jax.jit(
    functools.partial(export.network_probabilities, model),
    in_shardings=(rep, rows),
    out_shardings=rows,
  )
  with jax.set_mesh(mesh):
    return jax.export.export(fn, platforms=(platform,))(variables, images)


def _check_portable(module, platform):
  assert module.platforms == (platform,)
  assert module.nr_devices == 8
  text = module.mlir_module()
  assert "stablehlo.convolution" in text
  assert "bf16" in text  # bfloat16 compute
  targets = export.custom_call_targets(text)
  assert not [t for t in targets if CPU_TARGET.match(t)], targets
  assert not targets & {*library.TARGETS.values(), *library.WINOGRAD_TARGETS}
  return text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_train_step_lowers(mesh, platform):
  model, cfg = _tpu_model("xla")
  module, abstract = _lower_train_step(model, cfg, mesh, platform)
  _check_portable(module, platform)
  params = jax.tree.leaves(abstract.params)
  assert params and all(p.dtype == jnp.float32 for p in params)  # float32 parameters
  n_state = len(jax.tree.leaves(abstract))
  assert len(module.in_avals) == n_state + 2  # state leaves, image, label
  assert module.in_avals[-1].shape == (BATCH, SIZE, SIZE, 1)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_predict_network_lowers(mesh, platform):
  model, _ = _tpu_model("xla")
  module = _lower_network(model, mesh, platform)
  _check_portable(module, platform)
  assert module.out_avals[0].shape == (BATCH, SIZE, SIZE)
  assert module.out_avals[0].dtype == jnp.float32


@pytest.mark.skipif(not library.available(), reason="oneDNN kernel library not built")
def test_auto_backend_traces_cpu_kernels_into_an_accelerator_export(mesh):
  """Why the model must be built with conv_backend='xla': 'auto' decides from JAX's default
  backend (CPU), so a TPU export of the train step traces the oneDNN custom calls and fails."""
  model, cfg = _tpu_model("auto")
  with pytest.raises(ValueError, match="custom calls") as e:
    _lower_train_step(model, cfg, mesh, "tpu")
  assert "tvunet_onednn" in str(e.value)
