"""Tests for tvunet_jax.models and tvunet_jax.layers: shapes, the paper's parameter count, the
parameter tree and numbers of checkpoints written before the layers moved out of models.py,
train/eval, the backend chosen once, and the sub-pixel up-sampling, reshape pooling and dropout
against their flax references.

Speed: XLA:CPU spends ~3 s compiling each threefry call site (the default key
type), so inputs and variables come from numpy, dropout uses 'rbg' keys (~6x
faster to compile) and the flax initialisers run in one test only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import random_variables
from tvunet_jax import layers, models
from tvunet_jax.kernels import conv

KEY = jax.random.key(0)  # only traced by eval_shape or never reached (errors)


def _dropout_key(seed):
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _shapes(model, shape):
  return jax.eval_shape(
    lambda: model.init({"params": KEY}, jnp.zeros(shape, jnp.float32), train=False)
  )


def _variables(model, shape, seed=0):
  """conftest.random_variables as jax arrays."""
  return jax.tree.map(jnp.asarray, random_variables(model, shape, seed))


def _apply_fn(model):
  """Jitted apply(variables, x, train, dropout_key) -> (logits, new_batch_stats)."""

  def apply(variables, x, train, key):
    if train:
      rngs = None if key is None else {"dropout": key}  # None: a dropout-0 model
      out, state = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
      return out, state["batch_stats"]
    return model.apply(variables, x, train=False), variables["batch_stats"]

  return jax.jit(apply, static_argnums=2)


# ------------------------------------------------------------------ whole network


@pytest.mark.parametrize(
  "hw, base, depth, num_outputs",
  [
    ((16, 16), 4, 2, 1),
    ((32, 48), 4, 3, 2),
    ((16, 32), 2, 4, 3),
  ],
)
def test_output_shape_and_dtype(hw, base, depth, num_outputs):
  model = models.UNet(base=base, depth=depth, num_outputs=num_outputs)
  x = _normal(0, (2, *hw, 1))
  variables = _variables(model, x.shape)
  logits, _ = _apply_fn(model)(variables, x, False, None)
  assert logits.shape == (2, *hw, num_outputs)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Widths: level l has base * 2**l channels, the first up step base * 2**(depth-1).
  p = variables["params"]
  assert p["down_0"]["conv_0"]["kernel"].shape == (3, 3, 1, base)
  assert p["bottleneck"]["conv_1"]["kernel"].shape == (3, 3, base * 2**depth, base * 2**depth)
  top = depth - 1
  assert p[f"upsample_{top}"]["kernel"].shape == (3, 3, base * 2**depth, base * 2**top)
  # Concatenation [upsampled, skip] doubles the width into the up block.
  assert p[f"up_{top}"]["conv_0"]["kernel"].shape == (3, 3, base * 2**depth, base * 2**top)
  assert p["head"]["kernel"].shape == (1, 1, base, num_outputs)


# The variables of UNet(base=2, depth=2, num_outputs=2) at 8x8x1 input, as `jax.tree_util`
# key paths and shapes, generated from models.py before the layers moved to layers.py (HEAD
# 1aa73df): a checkpoint written then has exactly this tree.
OLD_TREE = """
batch_stats bottleneck bn_0 mean 8 | batch_stats bottleneck bn_0 var 8
batch_stats bottleneck bn_1 mean 8 | batch_stats bottleneck bn_1 var 8
batch_stats down_0 bn_0 mean 2 | batch_stats down_0 bn_0 var 2
batch_stats down_0 bn_1 mean 2 | batch_stats down_0 bn_1 var 2
batch_stats down_1 bn_0 mean 4 | batch_stats down_1 bn_0 var 4
batch_stats down_1 bn_1 mean 4 | batch_stats down_1 bn_1 var 4
batch_stats up_0 bn_0 mean 2 | batch_stats up_0 bn_0 var 2
batch_stats up_0 bn_1 mean 2 | batch_stats up_0 bn_1 var 2
batch_stats up_1 bn_0 mean 4 | batch_stats up_1 bn_0 var 4
batch_stats up_1 bn_1 mean 4 | batch_stats up_1 bn_1 var 4
params bottleneck bn_0 bias 8 | params bottleneck bn_0 scale 8
params bottleneck bn_1 bias 8 | params bottleneck bn_1 scale 8
params bottleneck conv_0 bias 8 | params bottleneck conv_0 kernel 3,3,4,8
params bottleneck conv_1 bias 8 | params bottleneck conv_1 kernel 3,3,8,8
params down_0 bn_0 bias 2 | params down_0 bn_0 scale 2
params down_0 bn_1 bias 2 | params down_0 bn_1 scale 2
params down_0 conv_0 bias 2 | params down_0 conv_0 kernel 3,3,1,2
params down_0 conv_1 bias 2 | params down_0 conv_1 kernel 3,3,2,2
params down_1 bn_0 bias 4 | params down_1 bn_0 scale 4
params down_1 bn_1 bias 4 | params down_1 bn_1 scale 4
params down_1 conv_0 bias 4 | params down_1 conv_0 kernel 3,3,2,4
params down_1 conv_1 bias 4 | params down_1 conv_1 kernel 3,3,4,4
params head bias 2 | params head kernel 1,1,2,2
params up_0 bn_0 bias 2 | params up_0 bn_0 scale 2
params up_0 bn_1 bias 2 | params up_0 bn_1 scale 2
params up_0 conv_0 bias 2 | params up_0 conv_0 kernel 3,3,4,2
params up_0 conv_1 bias 2 | params up_0 conv_1 kernel 3,3,2,2
params up_1 bn_0 bias 4 | params up_1 bn_0 scale 4
params up_1 bn_1 bias 4 | params up_1 bn_1 scale 4
params up_1 conv_0 bias 4 | params up_1 conv_0 kernel 3,3,8,4
params up_1 conv_1 bias 4 | params up_1 conv_1 kernel 3,3,4,4
params upsample_0 bias 2 | params upsample_0 kernel 3,3,4,2
params upsample_1 bias 4 | params upsample_1 kernel 3,3,8,4
"""
# What that code computed on `_old_checkpoint()` and x = N(0, 1) (seed 1, (2, 8, 8, 1)), dropout 0,
# under every upsample switch and both conv backends alike: eval logits (sum, sum of squares,
# [0, 3, 4, 0], [1, 7, 0, 1]), train-mode logits (sum, sum of squares, [0, 3, 4, 0]) and the
# updated running variance batch_stats.up_0.bn_1.var[1].
OLD_NUMBERS = (-278.023, 635.099, -2.02092, -0.404313, -94.2806, 294.078, 0.177987, 1.08609)


def _old_tree():
  """OLD_TREE as [(key path string, shape)], in `tree_leaves_with_path` order."""
  rows = []
  for pair in OLD_TREE.replace("\n", " | ").split("|"):
    if pair.strip():
      *keys, shape = pair.split()
      rows.append(("".join(f"['{k}']" for k in keys), tuple(int(d) for d in shape.split(","))))
  return rows


def _old_checkpoint(seed=0):
  """A variables dict with OLD_TREE's structure (built from the list, not from the model)."""
  rng = np.random.default_rng(seed)
  tree = {}
  for path, shape in _old_tree():
    *keys, name = path[2:-2].split("']['")
    node = tree
    for k in keys:
      node = node.setdefault(k, {})
    if name == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("var", "scale"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    node[name] = jnp.asarray(value, jnp.float32)
  return tree


@pytest.mark.parametrize("upsample", models.UPSAMPLE_KINDS)
@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_parameter_tree_is_the_old_one(upsample, backend):
  """The key paths and shapes of `init` are those of the code before the split, whichever
  up-sampling and convolution backend ('auto': oneDNN where built) build the model."""
  model = models.UNet(base=2, depth=2, num_outputs=2, upsample=upsample, conv_backend=backend)
  shapes = _shapes(model, (1, 8, 8, 1))
  got = [(jax.tree_util.keystr(p), s.shape) for p, s in jax.tree_util.tree_leaves_with_path(shapes)]
  assert got == _old_tree()
  assert len(got) == 66


@pytest.mark.parametrize("upsample", models.UPSAMPLE_KINDS)
def test_old_checkpoint_applies_with_the_old_numbers(upsample):
  """A checkpoint-shaped tree of the old code applies to the new one and gives the numbers the
  old code gave (OLD_NUMBERS, float32 rounding), in eval and train mode."""
  model = models.UNet(base=2, depth=2, num_outputs=2, dropout=0.0, upsample=upsample)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)), jnp.float32)
  apply = _apply_fn(model)
  variables = _old_checkpoint()
  e = np.asarray(apply(variables, x, False, None)[0], np.float64)
  t, stats = apply(variables, x, True, None)
  t = np.asarray(t, np.float64)
  var = float(stats["up_0"]["bn_1"]["var"][1])
  got = (e.sum(), (e**2).sum(), e[0, 3, 4, 0], e[1, 7, 0, 1], t.sum(), (t**2).sum(), t[0, 3, 4, 0])
  np.testing.assert_allclose((*got, var), OLD_NUMBERS, rtol=2e-5, atol=1e-5)


def test_backend_is_resolved_once_when_the_model_is_built(monkeypatch):
  """`UNet(conv_backend=<str>)` and `build` resolve the backend at construction into a
  `conv.ConvOps` field; init and apply then never call `conv.resolve` (nor read
  TVUNET_CONV_BACKEND), and an explicit ConvOps is kept as it is."""
  cfg = {
    "base": 2,
    "depth": 1,
    "dropout": 0.0,
    "num_outputs": 1,
    "dtype": "float32",
    "upsample": "subpixel",
    "pool": "reshape",
  }
  built = models.build(cfg, axis_name="data")
  assert isinstance(built.conv_backend, conv.ConvOps)
  assert built.conv_backend.axis_name == "data"  # the caller's mesh axis, kept
  assert models.build(cfg).conv_backend.axis_name is None  # none given: kernels unsplit
  assert built == models.build(cfg, axis_name="data") and hash(built.conv_backend) == hash(
    models.build(cfg, axis_name="data").conv_backend
  )
  xla = models.UNet(base=2, depth=1, dropout=0.0, conv_backend="xla")
  assert xla.conv_backend.backend in ("xla", conv.resolve("xla"))  # the variable may override

  def no_resolve(backend):
    raise AssertionError(f"conv.resolve({backend!r}) called after the model was built")

  monkeypatch.setattr(conv, "resolve", no_resolve)
  x = _normal(0, (2, 8, 8, 1))
  for model in (built, xla, models.UNet(base=2, depth=1, dropout=0.0, conv_backend=conv.XLA)):
    variables = _variables(model, x.shape)
    out, _ = _apply_fn(model)(variables, x, True, None)
    assert out.shape == (2, 8, 8, 1)
  assert models.build({**cfg, "conv_backend": conv.XLA}).conv_backend is conv.XLA


def test_paper_parameter_count():
  def count(**overrides):
    shapes = _shapes(models.paper_unet(**overrides), (1, 128, 128, 1))
    return models.count_params(shapes), models.count_params(shapes["params"])

  # Keras "Total params" of the authors' model (BatchNorm mean and var included).
  assert count() == (34_535_810, 34_535_810 - 11_776)
  assert count(upsample="conv_transpose", pool="max_pool") == (34_535_810, 34_535_810 - 11_776)
  # 2 output channels are needed for the number: 1 channel is 65 (64 weights + 1 bias) fewer.
  assert count(num_outputs=1)[0] == 34_535_810 - 65


def test_count_params_hand():
  tree = {
    "a": jnp.zeros((2, 3)),
    "b": {"c": jnp.zeros(4), "d": jax.ShapeDtypeStruct((5, 1), jnp.float32)},
  }
  assert models.count_params(tree) == 6 + 4 + 5


def test_paper_unet_overrides():
  model = models.paper_unet(num_outputs=1, dtype=jnp.bfloat16)
  assert (model.base, model.depth, model.dropout, model.num_outputs) == (64, 4, 0.2, 1)
  assert model.dtype == jnp.bfloat16
  assert models.paper_unet().num_outputs == 2


def test_initialisers_match_keras():
  model = models.UNet(base=16, depth=1, num_outputs=2)
  variables = jax.jit(lambda k: model.init({"params": k}, jnp.zeros((1, 8, 8, 1)), train=False))(
    jax.random.key(0, impl="rbg")
  )
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    name, leaf = jax.tree_util.keystr(path), np.asarray(leaf)
    if name.endswith("['bias']") or name.endswith("['mean']"):
      assert np.all(leaf == 0), name
    elif name.endswith("['scale']") or name.endswith("['var']"):
      assert np.all(leaf == 1), name
    elif "['upsample_" in name or "['head']" in name:
      # Glorot uniform: U(-l, l), l = sqrt(6 / (fan_in + fan_out)), std l / sqrt(3).
      fan_in, fan_out = np.prod(leaf.shape[:-1]), np.prod(leaf.shape[:-2]) * leaf.shape[-1]
      limit = np.sqrt(6 / (fan_in + fan_out))
      assert np.max(np.abs(leaf)) <= limit, name
      if leaf.size > 1000:
        assert abs(leaf.std() / (limit / np.sqrt(3)) - 1) < 0.1, name
    else:
      # Keras he_normal: truncated at 2 sigma, sigma = sqrt(2 / fan_in) / 0.8796 so
      # that the truncated std is sqrt(2 / fan_in).
      std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      assert np.max(np.abs(leaf)) <= 2 * std / 0.87962566103423978 + 1e-6, name
      if leaf.size > 1000:
        assert abs(leaf.std() / std - 1) < 0.1, name


def test_switches_share_parameters_and_numbers():
  x = _normal(1, (2, 8, 12, 1))
  # dropout 0: the switches do not touch dropout, and it keeps the compiles cheap.
  make = lambda up, pool: models.UNet(base=4, depth=1, dropout=0.0, upsample=up, pool=pool)
  variables = _variables(make("conv_transpose", "max_pool"), x.shape)
  shapes = jax.tree_util.tree_map(jnp.shape, variables)
  outputs = {}
  for upsample in models.UPSAMPLE_KINDS:
    for pool in models.POOL_KINDS:
      model = make(upsample, pool)
      # Same tree (names and shapes) whichever implementation builds it.
      assert jax.tree_util.tree_map(jnp.shape, _shapes(model, x.shape)) == shapes
      outputs[upsample, pool] = _apply_fn(model)(variables, x, True, None)
  ref_out, ref_stats = outputs["conv_transpose", "max_pool"]
  for key, (out, stats) in outputs.items():
    assert _rel_err(out, ref_out) < 1e-5, key
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, ref_stats
    )


def test_switches_give_the_same_gradients():
  # Reference layers against the defaults, through a train-mode network
  # (each switch alone is tested at layer level below).
  x, cot = _normal(1, (2, 8, 8, 1)), _normal(2, (2, 8, 8, 1))
  grads = {}
  for upsample, pool in (("conv_transpose", "max_pool"), ("subpixel", "reshape")):
    model = models.UNet(base=4, depth=1, dropout=0.0, upsample=upsample, pool=pool)
    variables = _variables(model, x.shape)

    def loss(params, model=model, variables=variables):
      out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(out * cot)

    grads[upsample] = jax.jit(jax.grad(loss))(variables["params"])
  ref, new = grads["conv_transpose"], grads["subpixel"]
  # One scale for the whole gradient: the pre-BN conv biases' true gradient is
  # 0, so their values are rounding noise and have no relative error.
  scale = max(np.max(np.abs(leaf)) for leaf in jax.tree_util.tree_leaves(ref))
  errs = jax.tree_util.tree_map(lambda a, b: np.max(np.abs(a - b)) / scale, new, ref)
  assert max(jax.tree_util.tree_leaves(errs)) < 1e-5, errs
  # Conv biases before a train-mode BatchNorm get no gradient (the batch mean
  # removes them); they exist for Keras parity only.
  for block in ("down_0", "bottleneck", "up_0"):
    for name in ("conv_0", "conv_1"):
      g = ref[block][name]
      assert np.max(np.abs(g["bias"])) < 1e-5 * np.max(np.abs(g["kernel"])), (block, name)


def test_train_and_eval_modes():
  model = models.UNet(base=4, depth=2, num_outputs=2)
  x = _normal(3, (4, 16, 16, 1), scale=2.0) + 0.5
  variables = _variables(model, x.shape)
  apply = _apply_fn(model)

  # Eval: deterministic, running statistics untouched.
  e1, bs_eval = apply(variables, x, False, None)
  e2, _ = apply(variables, x, False, None)
  np.testing.assert_array_equal(e1, e2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, bs_eval, variables["batch_stats"])

  # Train: dropout depends on the key (and only on it), statistics are updated.
  t1, bs1 = apply(variables, x, True, _dropout_key(10))
  t1b, _ = apply(variables, x, True, _dropout_key(10))
  t2, _ = apply(variables, x, True, _dropout_key(11))
  np.testing.assert_array_equal(t1, t1b)
  assert _rel_err(t1, t2) > 1e-3
  assert _rel_err(t1, e1) > 1e-3

  # First BatchNorm, hand-checked Keras momentum: ra = 0.99 * ra + 0.01 * batch,
  # with batch stats of conv_0's output over (B, H, W).
  p = variables["params"]["down_0"]["conv_0"]
  old = variables["batch_stats"]["down_0"]["bn_0"]
  pre_bn = (
    jax.lax.conv_general_dilated(
      x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + p["bias"]
  )
  mean, var = np.mean(pre_bn, axis=(0, 1, 2)), np.var(pre_bn, axis=(0, 1, 2))
  new = bs1["down_0"]["bn_0"]
  np.testing.assert_allclose(new["mean"], 0.99 * old["mean"] + 0.01 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.99 * old["var"] + 0.01 * var, rtol=1e-4, atol=1e-6)
  # Every statistic moved.
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.all(a != b)), bs1, variables["batch_stats"])
  assert all(jax.tree_util.tree_leaves(moved))


def test_skip_concatenation_order_is_keras():
  # Keras concatenate([upsampled, skip]): the first base channels entering up_0
  # come from upsample_0. Silence upsample_0; then zeroing the kernel rows that
  # read the first half must change nothing, zeroing the second half must.
  model = models.UNet(base=4, depth=1)
  x = _normal(14, (2, 8, 8, 1))
  variables = _variables(model, x.shape)
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["upsample_0"] = jax.tree_util.tree_map(jnp.zeros_like, params["upsample_0"])
  kernel = params["up_0"]["conv_0"]["kernel"]  # (3, 3, 2 * base, base)
  apply = _apply_fn(model)

  def run(k):
    p = {**params, "up_0": {**params["up_0"], "conv_0": {**params["up_0"]["conv_0"], "kernel": k}}}
    return apply({**variables, "params": p}, x, False, None)[0]

  base_out = run(kernel)
  np.testing.assert_array_equal(run(kernel.at[:, :, :4].set(0)), base_out)
  assert _rel_err(run(kernel.at[:, :, 4:].set(0)), base_out) > 1e-2


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = _normal(5, (2, 8, 8, 1))
  model16 = models.UNet(base=8, depth=1, dropout=0.0, dtype=jnp.bfloat16)
  shapes = _shapes(model16, x.shape)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = _variables(model16, x.shape)
  out16, bs16 = _apply_fn(model16)(variables, x, True, None)
  assert out16.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bs16)} == {jnp.dtype(jnp.float32)}
  out32, _ = _apply_fn(models.UNet(base=8, depth=1, dropout=0.0))(variables, x, True, None)
  # bf16 has 8 mantissa bits: close to float32, not equal.
  assert 0 < _rel_err(out16, out32) < 0.1


@pytest.mark.parametrize(
  "shape, match",
  [
    ((1, 14, 16, 1), r"multiples of 2\*\*depth = 4"),
    ((1, 16, 18, 1), r"multiples of 2\*\*depth = 4"),
    ((16, 16, 1), r"\(B, H, W, C\)"),
  ],
)
def test_bad_input_shape_raises(shape, match):
  model = models.UNet(base=2, depth=2)
  with pytest.raises(ValueError, match=match):
    _shapes(model, shape)


def test_bad_switch_raises():
  with pytest.raises(ValueError, match="upsample must be one of"):
    _shapes(models.UNet(base=2, depth=1, upsample="bilinear"), (1, 4, 4, 1))
  with pytest.raises(ValueError, match="pool must be one of"):
    _shapes(models.UNet(base=2, depth=1, pool="avg"), (1, 4, 4, 1))
  with pytest.raises(ValueError, match="method must be one of"):
    layers.pool_2x2(jnp.zeros((1, 4, 4, 1)), "avg")


# ------------------------------------------------------------------ up-sampling


def test_subpixel_equals_conv_transpose_forward_and_gradients():
  # Odd, non-square sizes so that every border is exercised; non-zero bias.
  x = _normal(6, (2, 5, 7, 3))
  params = {"kernel": _normal(7, (3, 3, 3, 4), 0.3), "bias": _normal(8, (4,))}
  flax_layer = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding="SAME")
  sub_layer = layers.SubpixelConvTranspose(4)
  for layer in (flax_layer, sub_layer):  # same parameter names and shapes
    assert jax.tree_util.tree_map(jnp.shape, jax.eval_shape(layer.init, KEY, x)["params"]) == {
      "kernel": (3, 3, 3, 4),
      "bias": (4,),
    }
  f_flax = lambda p, x: flax_layer.apply({"params": p}, x)
  f_sub = lambda p, x: sub_layer.apply({"params": p}, x)
  y_ref, y_sub = jax.jit(f_flax)(params, x), jax.jit(f_sub)(params, x)
  assert y_sub.shape == y_ref.shape == (2, 10, 14, 4)
  assert _rel_err(y_sub, y_ref) < 1e-5
  cot = _normal(9, y_ref.shape)
  grad = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * cot), argnums=(0, 1)))
  (gp_ref, gx_ref), (gp_sub, gx_sub) = grad(f_flax)(params, x), grad(f_sub)(params, x)
  assert _rel_err(gx_sub, gx_ref) < 1e-5
  assert _rel_err(gp_sub["kernel"], gp_ref["kernel"]) < 1e-5
  assert _rel_err(gp_sub["bias"], gp_ref["bias"]) < 1e-5


def test_upsampling_alignment_on_a_delta():
  # Flax 'SAME' (our convention), per axis: o[2i] = w0 x[i-1] + w2 x[i], o[2i+1] = w1 x[i].
  # A delta at input (2, 3) therefore lands on output rows 4, 5, 6 through taps 2, 1, 0,
  # and columns 6, 7, 8 through taps 2, 1, 0. Keras would use taps 0, 1, 2 there.
  x = jnp.zeros((1, 5, 6, 1)).at[0, 2, 3, 0].set(1.0)
  w = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)  # w[ty, tx] = 3 * ty + tx + 1
  params = {"kernel": w, "bias": jnp.zeros(1)}
  expected = np.zeros((10, 12))
  expected[4:7, 6:9] = [[9, 8, 7], [6, 5, 4], [3, 2, 1]]
  for layer in (
    nn.ConvTranspose(1, (3, 3), strides=(2, 2), padding="SAME"),
    layers.SubpixelConvTranspose(1),
  ):
    out = jax.jit(layer.apply)({"params": params}, x)[0, :, :, 0]
    np.testing.assert_array_equal(out, expected)


def test_subpixel_bfloat16_compute():
  x = _normal(10, (1, 4, 4, 2))
  params = {"kernel": _normal(11, (3, 3, 2, 3)), "bias": jnp.zeros(3)}
  out = jax.jit(layers.SubpixelConvTranspose(3, dtype=jnp.bfloat16).apply)({"params": params}, x)
  assert out.dtype == jnp.bfloat16
  ref = jax.jit(layers.SubpixelConvTranspose(3).apply)({"params": params}, x)
  assert _rel_err(out, ref) < 0.02


# ---------------------------------------------------------------------- pooling


def test_reshape_pool_equals_max_pool_forward_and_gradient():
  x = _normal(12, (2, 6, 8, 3))  # random floats: no ties
  ref = jax.jit(lambda x: layers.pool_2x2(x, "max_pool"))
  new = jax.jit(lambda x: layers.pool_2x2(x, "reshape"))
  np.testing.assert_array_equal(new(x), ref(x))
  np.testing.assert_array_equal(new(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  cot = _normal(13, (2, 3, 4, 3))
  g = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * cot)))(x)
  np.testing.assert_array_equal(g(new), g(ref))
  # Hand check on one window: the gradient goes to the maximum only.
  win = jnp.array([[1.0, 4.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(
    jax.grad(lambda x: layers.pool_2x2(x).sum())(win)[0, :, :, 0], [[0, 1], [0, 0]]
  )


# ----------------------------------------------------------------------------- dropout


def _dropout_apply(rate, x, key, deterministic=False):
  layer = layers.Dropout(rate, deterministic=deterministic)
  return jax.jit(lambda x, k: layer.apply({}, x, rngs={"dropout": k}))(x, key)


def test_dropout_rate_scale_and_determinism():
  """layers.Dropout is inverted dropout: each element is 0 with probability `rate` (checked on
  1M elements against the binomial spread) and x / (1 - rate) otherwise; the same key
  gives the same mask, another key another mask, and the masks of two keys are independent
  (their overlap matches rate**2)."""
  rate, n = 0.2, 1_000_000
  x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, size=(n,)).astype(np.float32))
  y1 = np.asarray(_dropout_apply(rate, x, _dropout_key(1)))
  y1b = np.asarray(_dropout_apply(rate, x, _dropout_key(1)))
  y2 = np.asarray(_dropout_apply(rate, x, _dropout_key(2)))
  np.testing.assert_array_equal(y1, y1b)
  sd = np.sqrt(rate * (1 - rate) / n)
  for y in (y1, y2):
    dropped = y == 0
    assert abs(dropped.mean() - rate) < 5 * sd, dropped.mean()
    # XLA may turn the division into a multiplication by the reciprocal: 1 ulp
    np.testing.assert_allclose(
      y[~dropped], np.asarray(x)[~dropped] / np.float32(1 - rate), rtol=2e-7
    )
  both = ((y1 == 0) & (y2 == 0)).mean()
  assert abs(both - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / n), both
  assert not np.array_equal(y1 == 0, y2 == 0)


def test_dropout_identity_cases_and_gradient():
  """deterministic or rate 0: the input unchanged (no key needed); rate 1: zeros; the gradient
  is the mask scaled by 1 / (1 - rate), with the output's dtype kept (bfloat16 too)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32))
  for layer in (layers.Dropout(0.2, deterministic=True), layers.Dropout(0.0)):
    np.testing.assert_array_equal(layer.apply({}, x), x)
  np.testing.assert_array_equal(_dropout_apply(1.0, x, _dropout_key(0)), np.zeros_like(x))
  layer = layers.Dropout(0.5)
  key = _dropout_key(3)
  f = lambda a: jnp.sum(layer.apply({}, a, rngs={"dropout": key}))
  g = np.asarray(jax.jit(jax.grad(f))(x))
  y = np.asarray(_dropout_apply(0.5, x, key))
  np.testing.assert_array_equal(g, np.where(y != 0, 2.0, 0.0).astype(np.float32))
  xb = x.astype(jnp.bfloat16)
  assert _dropout_apply(0.2, xb, key).dtype == jnp.bfloat16


def test_dropout_of_a_pair_is_dropout_of_the_concatenation():
  """`Dropout((a, b))` draws the mask of concat(a, b) and returns its two parts: bit for bit
  what dropping the concatenation gives (the U-Net's skip connections rely on it)."""
  a, b = _normal(20, (2, 4, 4, 3)), _normal(21, (2, 4, 4, 5))
  layer = layers.Dropout(0.4)
  key = _dropout_key(7)
  pair = jax.jit(lambda a, b, k: layer.apply({}, (a, b), rngs={"dropout": k}))(a, b, key)
  whole = _dropout_apply(0.4, jnp.concatenate([a, b], -1), key)
  assert isinstance(pair, tuple) and [p.shape for p in pair] == [a.shape, b.shape]
  np.testing.assert_array_equal(jnp.concatenate(pair, -1), whole)
  assert 0 < np.mean(np.asarray(whole) == 0) < 1
  kept = layers.Dropout(0.4, deterministic=True).apply({}, (a, b))
  jax.tree.map(np.testing.assert_array_equal, kept, (a, b))


def test_dropout_accepts_threefry_and_raw_keys():
  """The layer takes every key kind flax passes on: typed 'rbg' (train.py's) and threefry keys,
  and the legacy raw (2,) uint32 PRNGKey."""
  x = jnp.ones((64, 64))
  for key in (jax.random.key(0, impl="rbg"), jax.random.key(0), jax.random.PRNGKey(0)):
    y = np.asarray(_dropout_apply(0.3, x, key))
    assert 0.2 < (y == 0).mean() < 0.4


def test_unet_dropout_layers_draw_different_masks():
  """The U-Net's dropout layers are one module called 8 times: each call must draw its own mask
  (flax's per-call rng counter), or every level would drop the same pattern."""

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = layers.Dropout(0.5)
      return d(x), d(x)

  a, b = Two().apply({}, jnp.ones((128, 128)), rngs={"dropout": _dropout_key(0)})
  assert not np.array_equal(np.asarray(a) == 0, np.asarray(b) == 0)


def test_dropout_mask_is_the_threefry_bits_above_the_threshold():
  """Pinned by hand on 4x4: the mask is exactly `bits >= round(rate * 2**32)` of
  `lax.rng_bit_generator(key_data, shape, uint32, RNG_THREE_FRY)`, kept values scaled by
  1 / (1 - rate)."""
  key = _dropout_key(7)
  x = jnp.arange(1.0, 17.0).reshape(4, 4)
  y = np.asarray(_dropout_apply(0.25, x, key))

  class Probe(nn.Module):  # the key flax's make_rng hands a top-level module's first call
    @nn.compact
    def __call__(self):
      return self.make_rng("dropout")

  layer_key = Probe().apply({}, rngs={"dropout": key})
  _, bits = jax.lax.rng_bit_generator(
    jax.random.key_data(layer_key),
    (4, 4),
    dtype=jnp.uint32,
    algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY,
  )
  keep = np.asarray(bits) >= np.uint32(2**30)
  np.testing.assert_allclose(y, np.where(keep, np.asarray(x) / 0.75, 0.0), rtol=1e-6)
