"""Tests for the Winograd F(4x4, 3x3) convolutions (tvunet_jax/kernels/winograd.cc, conv.py).

What is pinned, against references independent of the kernels (`lax.conv_general_dilated` at
precision HIGHEST, and a float64 numpy loop):

  * `winograd_conv`: forward, input gradient and weight gradient on shapes that cross every edge
    of the algorithm (H, W not multiples of the 4x4 tile, a 1x1 image, channel counts across the
    64-channel vector blocks, batch 1) and at the paper model's widest layers (512 and 1024
    channels), within the float32 rounding the transforms add (5e-5 relative; the direct kernels
    are held to 1e-5);
  * under an 8-device data mesh (per-shard kernels, the weight gradient summed once);
  * `kernels.winograd.choose`: which layers the AVX2 rule picks for the paper model, the
    'off'/'all' modes, what never qualifies (bf16, other kernels or pads), a misspelt mode; a
    measured table deciding each pass on hand-made timings, per machine, bad table files named;
    a per-pass choice lowered to exactly those kernels, with lax's numbers;
  * the drop-in `conv_general_dilated('onednn')` routing qualifying convs to it, and the U-Net
    with every 3x3 conv on it (TVUNET_WINOGRAD=all) against XLA;
  * the handlers' one-line errors on inconsistent shapes.

Tests need the built library (`needs_onednn` from test_kernels: skipped without it, failed under
TVUNET_REQUIRE_ONEDNN=1). Shapes are tiny; the 'auto' rule is tested on shapes alone (no large
arrays).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_kernels import (
  NHWC,
  _assert_trees_close,
  _fwd_and_grads,
  _normal,
  _ref_conv,
  _rel_err,
  _tiny_unet,
  needs_onednn,
  onednn_library,  # noqa: F401  (the fixture `needs_onednn` names)
)
from tvunet_jax import sharding
from tvunet_jax.kernels import conv, custom_calls, library, winograd

SAME = (1, 1, 1, 1)
RTOL = 5e-5  # F(4x4, 3x3) measured 1e-6..2e-5 on these shapes (the direct kernels: ~1e-6)
WINOGRAD = "tvunet_winograd_"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  """No TVUNET_CONV_BACKEND / TVUNET_WINOGRAD from the caller's environment."""
  monkeypatch.delenv(conv.ENV_BACKEND, raising=False)
  monkeypatch.delenv(winograd.ENV_MODE, raising=False)


CASES = {  # (x shape, Co)
  "tiles_exact": ((2, 8, 8, 4), 8),
  "ragged_tiles_odd_channels": ((1, 13, 9, 5), 7),
  "one_pixel": ((1, 1, 1, 3), 2),
  "tall_narrow_batch3": ((3, 17, 4, 8), 16),
  "channels_across_blocks": ((2, 8, 8, 130), 129),
  "one_input_channel": ((1, 6, 7, 1), 64),
  # 128 tiles and 128 channels: the weight gradient sums 128 tiles per coefficient, as a real
  # layer does (the rounding grows with the sum's length)
  "many_tiles_128ch": ((2, 32, 32, 128), 128),
}


@needs_onednn
@pytest.mark.parametrize("x_shape,co", CASES.values(), ids=CASES.keys())
def test_winograd_matches_lax(x_shape, co):
  x, w = _normal(0, x_shape), _normal(1, (3, 3, x_shape[3], co)) / np.sqrt(9 * x_shape[3])
  cot = _normal(2, (*x_shape[:3], co))
  got = jax.jit(functools.partial(_fwd_and_grads, custom_calls.winograd_conv))(x, w, cot)
  want = jax.jit(functools.partial(_fwd_and_grads, lambda a, b: _ref_conv(a, b, SAME)))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.shape == r.shape and g.dtype == jnp.float32, (name, g.shape, g.dtype)
    assert _rel_err(g, r) <= RTOL, (name, _rel_err(g, r))


# The paper model's widest 3x3 convs (issue #18), batch 2: level 3 (16x16, 512 -> 512), the
# bottleneck's first and second convs (8x8, 512 -> 1024 and 1024 -> 1024). The longest sums the
# transforms round: 9 * 1024 products per output.
WIDE_CASES = {
  "level3_16px_512to512": ((2, 16, 16, 512), 512),
  "bottleneck_8px_512to1024": ((2, 8, 8, 512), 1024),
  "bottleneck_8px_1024to1024": ((2, 8, 8, 1024), 1024),
}


@needs_onednn
@pytest.mark.parametrize("x_shape,co", WIDE_CASES.values(), ids=WIDE_CASES.keys())
def test_winograd_matches_lax_at_the_widest_layers(x_shape, co):
  """Forward, input gradient and weight gradient at 512 and 1024 channels, within the same
  rounding bound as the small shapes (RTOL against lax at precision HIGHEST)."""
  ci = x_shape[3]
  x, w = _normal(10, x_shape), _normal(11, (3, 3, ci, co)) / np.sqrt(9 * ci)
  cot = _normal(12, (*x_shape[:3], co))
  got = jax.jit(functools.partial(_fwd_and_grads, custom_calls.winograd_conv))(x, w, cot)
  want = jax.jit(functools.partial(_fwd_and_grads, lambda a, b: _ref_conv(a, b, SAME)))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.shape == r.shape and g.dtype == jnp.float32, (name, g.shape, g.dtype)
    assert _rel_err(g, r) <= RTOL, (name, _rel_err(g, r))


def _numpy_conv_same(x, w):
  """y[n,i,j,o] = sum_{k,l,c} xpad[n,i+k,j+l,c] w[k,l,c,o] in float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = np.zeros((n, h, wd, w.shape[3]))
  for k in range(3):
    for j in range(3):
      y += np.einsum("nhwc,co->nhwo", xp[:, k : k + h, j : j + wd], w[k, j])
  return y


@needs_onednn
def test_winograd_matches_numpy_and_its_gradients_are_the_adjoints():
  """The forward against a float64 loop; the gradients through the adjoint identity
  <conv(x, w), c> = <x, dx(c)> = <w, dw(c)> (both sides linear in one argument)."""
  x, w, cot = _normal(3, (2, 9, 6, 3)), _normal(4, (3, 3, 3, 5)), _normal(5, (2, 9, 6, 5))
  y, dx, dw = jax.jit(functools.partial(_fwd_and_grads, custom_calls.winograd_conv))(x, w, cot)
  assert _rel_err(y, _numpy_conv_same(x, w)) <= RTOL
  inner = float(np.sum(_numpy_conv_same(x, w) * np.asarray(cot, np.float64)))
  for g, a in ((dx, x), (dw, w)):
    got = float(np.sum(np.asarray(g, np.float64) * np.asarray(a, np.float64)))
    assert abs(got - inner) <= RTOL * np.sum(np.abs(_numpy_conv_same(x, w) * cot)), (got, inner)


@needs_onednn
@pytest.mark.parametrize("batch", [8, 6])
def test_winograd_under_a_data_mesh_matches_lax(batch):
  """8 devices: batch 8 runs one row per device and psums the weight gradient (a missing or
  doubled reduction is off by a factor); batch 6 does not divide and runs unsplit."""
  mesh = sharding.make_mesh(8)
  rows = sharding.batch_sharding(mesh) if batch % 8 == 0 else sharding.replicated(mesh)
  x = jax.device_put(_normal(0, (batch, 6, 5, 3)), rows)
  w = _normal(1, (3, 3, 3, 4))
  cot = jax.device_put(_normal(2, (batch, 6, 5, 4)), rows)
  per_shard = functools.partial(custom_calls.winograd_conv, axis_name=sharding.DATA_AXIS)
  got = sharding.under_mesh(mesh, jax.jit(functools.partial(_fwd_and_grads, per_shard)))(x, w, cot)
  want = jax.jit(functools.partial(_fwd_and_grads, lambda a, b: _ref_conv(a, b, SAME)))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert _rel_err(g, r) <= RTOL, (name, batch, _rel_err(g, r))


def test_winograd_conv_rejects_what_it_does_not_compute():
  with pytest.raises(ValueError, match="winograd_conv takes float32"):
    custom_calls.winograd_conv(
      jnp.zeros((1, 4, 4, 2), jnp.bfloat16), jnp.zeros((3, 3, 2, 2), jnp.bfloat16)
    )
  with pytest.raises(ValueError, match=r"\(3, 3, Ci, Co\) kernel"):
    custom_calls.winograd_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)))


# The paper model's 3x3 convs at batch 8 (x shape, w shape) -> what 'auto' picks: all but the
# first conv and the 64 -> 64 convs of the 128x128 level (Ci*Co/(Ci+Co) = 32 < 40), as measured
# by the benchmark's per-layer table; the 8x8 bottleneck has 8 * 2 * 2 = 32 tiles, just enough.
PAPER_LEVELS = {
  "first_1to64": ((8, 128, 128, 1), (3, 3, 1, 64), False),
  "level0_128px_64ch": ((8, 128, 128, 64), (3, 3, 64, 64), False),
  "level1_first_64to128": ((8, 64, 64, 64), (3, 3, 64, 128), True),
  "level1_64px_128ch": ((8, 64, 64, 128), (3, 3, 128, 128), True),
  "level2_32px_256ch": ((8, 32, 32, 256), (3, 3, 256, 256), True),
  "level3_16px_512ch": ((8, 16, 16, 512), (3, 3, 512, 512), True),
  "bottleneck_8px_1024ch": ((8, 8, 8, 1024), (3, 3, 1024, 1024), True),
  "bottleneck_batch4": ((4, 8, 8, 1024), (3, 3, 1024, 1024), False),  # 16 tiles
}


def _wins(x_shape, w_shape, dtype="float32", pads=SAME, **kw):
  """Whether the AVX2 rule (no table) runs any pass of this conv by Winograd."""
  kw.setdefault("isa", "avx2")
  return any(winograd.choose(x_shape, w_shape, dtype, pads, **kw))


@pytest.mark.parametrize("x_shape,w_shape,want", PAPER_LEVELS.values(), ids=PAPER_LEVELS.keys())
def test_avx2_rule_on_the_paper_model(x_shape, w_shape, want):
  got = winograd.choose(x_shape, w_shape, "float32", SAME, isa="avx2")
  assert got == (winograd.ALL if want else winograd.NONE)


# The AVX-512 / AMX rule on the same layers: Winograd only at 16-32 px with >= 256 channels
# (measured on an Intel Xeon with AMX: experiments/README.md), the 8 px bottleneck's 32 tiles
# too few.
AVX512_LEVELS = {
  "level1_64px_128ch": ((8, 64, 64, 128), (3, 3, 128, 128), False),
  "level2_first_32px_128to256": ((8, 32, 32, 128), (3, 3, 128, 256), False),
  "level2_32px_256ch": ((8, 32, 32, 256), (3, 3, 256, 256), True),
  "level3_16px_512ch": ((8, 16, 16, 512), (3, 3, 512, 512), True),
  "bottleneck_8px_1024ch": ((8, 8, 8, 1024), (3, 3, 1024, 1024), False),
}


@pytest.mark.parametrize("isa", ["avx512", "amx"])
@pytest.mark.parametrize("x_shape,w_shape,want", AVX512_LEVELS.values(), ids=AVX512_LEVELS.keys())
def test_avx512_rule_on_the_paper_model(isa, x_shape, w_shape, want):
  got = winograd.choose(x_shape, w_shape, "float32", SAME, isa=isa)
  assert got == (winograd.ALL if want else winograd.NONE)


def test_rule_modes_and_what_never_qualifies(monkeypatch):
  big = ((8, 32, 32, 256), (3, 3, 256, 256))
  assert _wins(*big)
  # fewer tiles per device under a mesh: 1 row of 16x16 = 16 tiles < 32
  assert not _wins((8, 16, 16, 256), big[1], local_batch=1)
  assert _wins((8, 16, 16, 256), big[1], local_batch=2)
  assert not _wins(*big, "bfloat16")
  assert not _wins(big[0], (3, 3, 256, 256), pads=(0, 0, 0, 0))
  assert not _wins(big[0], (1, 1, 256, 256), pads=(0, 0, 0, 0))
  assert not _wins(big[0], (2, 2, 256, 256), pads=(1, 0, 1, 0))
  assert not _wins(*big, isa="other")  # a CPU without a measured rule: direct kernels
  small = ((1, 4, 4, 2), (3, 3, 2, 3))
  assert not _wins(*small)
  assert _wins(*small, mode="all")
  assert not _wins(*small, "bfloat16", mode="all")
  assert not _wins(*big, mode="off")
  with pytest.raises(ValueError, match="Winograd mode must be one of"):
    _wins(*big, mode="fast")
  assert winograd.mode_from_env() == "auto"
  monkeypatch.setenv(winograd.ENV_MODE, "fast")
  with pytest.raises(ValueError, match="TVUNET_WINOGRAD must be one of"):
    winograd.mode_from_env()


def test_isa_levels_from_cpu_flags():
  assert winograd.isa_level({"avx2", "fma"}) == "avx2"
  assert winograd.isa_level({"avx2", "avx512f", "avx512_bf16"}) == "avx512"
  assert winograd.isa_level({"avx2", "avx512f", "amx_tile", "amx_bf16"}) == "amx"
  assert winograd.isa_level({"sse4_2"}) == "other" and winograd.isa_level(None) == "other"


def _section(**passes_by_key):
  """A table section from {key: (fwd, dgrad, wgrad) as (direct_ms, winograd_ms) pairs}."""
  return {
    k.replace("_", ","): {
      p: {"direct_ms": d, "winograd_ms": w} for p, (d, w) in zip(winograd.PASSES, v)
    }
    for k, v in passes_by_key.items()
  }


def test_a_measured_table_decides_each_pass_and_the_rule_covers_the_rest():
  """Hand-made timings: forward and weight grad faster on Winograd, the input grad not, for the
  one shape measured; another shape (and the same shape at another per-device batch) falls back
  to the rule."""
  section = _section(**{"8_32_32_256_256": ((2.0, 1.0), (2.0, 3.0), (5.0, 4.9))})
  table = winograd.decisions(section)
  assert table == (("8,32,32,256,256", (True, False, True)),)
  x, w = (8, 32, 32, 256), (3, 3, 256, 256)
  assert winograd.choose(x, w, "float32", SAME, table=table, isa="avx2") == (True, False, True)
  # the same conv split over 2 devices is another per-device call: not in the table -> rule
  assert (
    winograd.choose(x, w, "float32", SAME, local_batch=4, table=table, isa="avx2") == winograd.ALL
  )
  assert (
    winograd.choose(x, w, "float32", SAME, local_batch=4, table=table, isa="other") == winograd.NONE
  )
  # a table entry slower everywhere keeps a shape the rule would give Winograd on direct kernels
  slow = winograd.decisions(_section(**{"8_32_32_256_256": ((1.0, 2.0),) * 3}))
  assert winograd.choose(x, w, "float32", SAME, table=slow, isa="avx2") == winograd.NONE
  # 'off' and 'all' override the table; bf16 never qualifies
  assert winograd.choose(x, w, "float32", SAME, mode="off", table=table) == winograd.NONE
  assert winograd.choose(x, w, "float32", SAME, mode="all", table=slow) == winograd.ALL
  assert winograd.choose(x, w, "bfloat16", SAME, table=table) == winograd.NONE


def test_table_file_is_read_per_machine_and_bad_files_are_named(tmp_path, monkeypatch):
  path = tmp_path / "winograd_table.json"
  assert winograd.read_tables(str(path)) == {}  # no file: no table
  mine = _section(**{"8_32_32_256_256": ((2.0, 1.0), (2.0, 1.0), (2.0, 1.0))})
  other = _section(**{"8_16_16_512_512": ((2.0, 1.0),) * 3})
  path.write_text(json.dumps({conv.machine_key(): mine, "Some Other CPU | avx2 | 64 cores": other}))
  assert conv.machine_table(str(path)) == (("8,32,32,256,256", winograd.ALL),)
  monkeypatch.setenv(winograd.ENV_TABLE, str(path))
  assert winograd.tuning_path() == str(path)
  ops = conv.choose("onednn") if library.available() else None
  if ops is not None:
    assert ops.winograd_table == (("8,32,32,256,256", winograd.ALL),)
    assert "measured table of 1 shapes" in ops.describe()
  path.write_text('{"truncated": ')
  with pytest.raises(ValueError, match=r"winograd_table.json: unreadable Winograd table"):
    conv.machine_table(str(path))
  path.write_text('["not", "a", "table"]')
  with pytest.raises(ValueError, match=r"winograd_table.json: not a Winograd table"):
    conv.machine_table(str(path))


def test_recording_lists_the_convs_asked_about():
  with winograd.recording() as seen:
    winograd.choose((2, 8, 8, 4), (3, 3, 4, 8), "float32", SAME, mode="all")
    winograd.choose((2, 8, 8, 4), (1, 1, 4, 8), "float32", (0, 0, 0, 0))  # never qualifies
    winograd.choose((4, 8, 8, 4), (3, 3, 4, 8), "float32", SAME, local_batch=2)
  assert seen == [((2, 8, 8, 4), (3, 3, 4, 8), 2), ((4, 8, 8, 4), (3, 3, 4, 8), 2)]
  winograd.choose((2, 8, 8, 4), (3, 3, 4, 8), "float32", SAME)
  assert len(seen) == 2  # outside the block nothing is recorded


@needs_onednn
def test_per_pass_choice_runs_those_kernels_with_the_same_numbers():
  """A conv whose table entry picks Winograd for the weight gradient only: the lowered gradient
  program calls oneDNN's direct forward and input-gradient kernels and Winograd's weight-gradient
  kernel, and forward and both gradients match lax."""
  x, w, cot = _normal(0, (2, 9, 7, 4)), _normal(1, (3, 3, 4, 6)), _normal(2, (2, 9, 7, 6))
  table = ((winograd.shape_key(x.shape, w.shape, 2), (False, False, True)),)
  ops = conv.ConvOps("onednn", None, "auto", table, "avx2")
  fn = lambda a, b: ops.conv(a, b, (1, 1), "SAME", dimension_numbers=NHWC)
  run = jax.jit(functools.partial(_fwd_and_grads, fn))
  text = run.lower(x, w, cot).as_text()
  assert "tvunet_onednn_conv_fwd" in text and "tvunet_onednn_conv_bwd_data" in text
  assert WINOGRAD + "wgrad" in text and WINOGRAD + "conv" not in text
  assert "tvunet_onednn_conv_bwd_weights" not in text
  want = jax.jit(functools.partial(_fwd_and_grads, lambda a, b: _ref_conv(a, b, SAME)))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), run(x, w, cot), want):
    assert _rel_err(g, r) <= RTOL, (name, _rel_err(g, r))


@needs_onednn
def test_drop_in_routes_by_the_rule(monkeypatch):
  """conv_general_dilated('onednn') calls the Winograd kernels exactly where the rule says
  (checked on the lowered program: shapes only, nothing large runs), with the same numbers."""
  # The AVX2 rule (the tests' CPU may have another): the routing, not the machine, is tested.
  drop_in = dataclasses.replace(conv.choose("onednn"), isa="avx2").conv
  # A new drop-in per mode: the mode is read when the drop-in is made (`conv.choose`).
  fn = lambda a, b: drop_in(a, b, (1, 1), "SAME", dimension_numbers=NHWC)
  big = (
    jax.ShapeDtypeStruct((8, 32, 32, 128), jnp.float32),
    jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32),
  )
  text = jax.jit(fn).lower(*big).as_text()
  assert WINOGRAD + "conv" in text and "tvunet_onednn_conv_fwd" not in text
  small = (_normal(0, (2, 6, 6, 4)), _normal(1, (3, 3, 4, 5)))
  assert WINOGRAD not in jax.jit(fn).lower(*small).as_text()
  monkeypatch.setenv(winograd.ENV_MODE, "all")
  assert WINOGRAD not in jax.jit(fn).lower(*small).as_text()  # made before: keeps its mode
  all_in = conv.conv_general_dilated("onednn")
  fn_all = lambda a, b: all_in(a, b, (1, 1), "SAME", dimension_numbers=NHWC)
  assert WINOGRAD + "conv" in jax.jit(fn_all).lower(*small).as_text()
  assert _rel_err(jax.jit(fn_all)(*small), _ref_conv(*small, SAME)) <= RTOL
  monkeypatch.setenv(winograd.ENV_MODE, "off")
  off_in = conv.conv_general_dilated("onednn")
  fn_off = lambda a, b: off_in(a, b, (1, 1), "SAME", dimension_numbers=NHWC)
  assert WINOGRAD not in jax.jit(fn_off).lower(*big).as_text()
  assert conv.choose("onednn").winograd == "off" and conv.choose("xla").winograd == "auto"


@needs_onednn
def test_drop_in_counts_tiles_per_device_under_a_mesh():
  """8x16x16x128 has 128 tiles: Winograd on one device; split over an 8-device data mesh each
  device holds 16 tiles (< 32), so the drop-in keeps the direct kernels there."""
  ops = conv.choose("onednn", axis_name=sharding.DATA_AXIS)
  drop_in = dataclasses.replace(ops, isa="avx2").conv  # the AVX2 rule's tile count
  fn = jax.jit(lambda a, b: drop_in(a, b, (1, 1), "SAME", dimension_numbers=NHWC))
  mesh = sharding.make_mesh(8)
  x = jax.ShapeDtypeStruct((8, 16, 16, 128), jnp.float32, sharding=sharding.batch_sharding(mesh))
  w = jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32, sharding=sharding.replicated(mesh))
  assert WINOGRAD + "conv" in fn.lower(x, w).as_text()
  on_mesh = jax.jit(lambda a, b: drop_in(a, b, (1, 1), "SAME", dimension_numbers=NHWC))
  text = sharding.under_mesh(mesh, on_mesh.lower)(x, w).as_text()
  assert WINOGRAD not in text and "tvunet_onednn_conv_fwd" in text


@needs_onednn
def test_unet_with_winograd_equals_xla(monkeypatch, tiny_variables):
  """Every 3x3 conv of the tiny U-Net on Winograd (TVUNET_WINOGRAD=all): eval outputs and the
  gradients of a loss agree with XLA's within the transforms' rounding."""
  monkeypatch.setenv(winograd.ENV_MODE, "all")
  x, target = _normal(0, (2, 16, 16, 1)), _normal(1, (2, 16, 16, 1))
  variables = tiny_variables

  def run(model):
    logits = model.apply(variables, x, train=False)

    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.mean((out - target) ** 2)

    return logits, jax.grad(loss)(variables["params"])

  lowered = {
    b: jax.jit(functools.partial(run, _tiny_unet(b, dropout=0.0))).lower()
    for b in ("onednn", "xla")
  }
  assert WINOGRAD + "conv" in lowered["onednn"].as_text()
  assert WINOGRAD + "wgrad" in lowered["onednn"].as_text()
  got, want = (lowered[b].compile()() for b in ("onednn", "xla"))
  assert _rel_err(got[0], want[0]) <= 2e-4, _rel_err(got[0], want[0])
  _assert_trees_close(got[1], want[1], 2e-4, "grads")


@pytest.fixture(scope="module")
def tiny_variables():
  """The tiny U-Net's variables (one jitted init on an 'rbg' key, as in test_kernels; the
  parameters do not depend on the backend)."""
  model = _tiny_unet("xla")
  return jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 1))
  )


@needs_onednn
def test_handlers_reject_inconsistent_shapes_with_one_line_error():
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
  with pytest.raises(Exception, match=r"winograd conv: inconsistent shapes x\(1,6,6,2\)"):
    jax.block_until_ready(
      jax.jit(
        lambda a, b: library.ffi_call(
          library.WINOGRAD_TARGETS[0], a, b, (1, 5, 6, 4), jnp.float32, transposed=np.int64(0)
        )
      )(x, w)
    )
  with pytest.raises(Exception, match=r"winograd weight grad: inconsistent shapes"):
    jax.block_until_ready(
      jax.jit(
        lambda a, b: library.ffi_call(library.WINOGRAD_TARGETS[1], a, b, (3, 3, 2, 5), jnp.float32)
      )(x, jnp.ones((1, 6, 6, 4)))
    )
