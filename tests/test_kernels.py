"""Tests for tvunet_jax.kernels.conv: the oneDNN convolutions behind `jax.jit` (XLA FFI).

What is pinned, always against references independent of the kernels
(`lax.conv_general_dilated` with precision HIGHEST, numpy):

  * the three kernels (forward, input gradient, weight gradient) on the U-Net's
    shapes and on odd ones (non-square images, odd channel counts, batch 1,
    asymmetric padding), float32 and bfloat16;
  * the drop-in `conv_general_dilated(backend)`: string padding, and the cases
    the kernels do not take falling back to XLA with the same numbers;
  * backend resolution: a missing library falls back to XLA with one warning,
    TVUNET_CONV_BACKEND overrides the config, bad names raise; `ConvOps` is a
    hashable value that, once chosen, no longer reads the environment;
  * the U-Net with `conv_backend='onednn'` against 'xla' (same parameters,
    outputs, gradients), and a sharded train step on 8 fake devices against 1
    device, with the kernels running per shard (no gathered batch).

Tests that need the built library (`python -m tvunet_jax.kernels.build`) carry
`needs_onednn`: skipped when `library.available()` is False, failed instead when
TVUNET_REQUIRE_ONEDNN=1 (CI sets it, so a broken build cannot pass as skips).
The fallback test runs in a subprocess without the library and runs always.

Speed: shapes are tiny; the U-Net comparison uses base 4 / depth 2 on 16x16
images with variables from one `jit(init)` on an 'rbg' key (threefry init
compiles for tens of seconds on XLA:CPU); the sharded train step uses the tiny
config at depth 1 with numpy-made variables (no init compile); each
computation is one jitted program.
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from experiments.configs import tiny
from tests.conftest import random_variables
from tvunet_jax import layers, models, sharding, steps
from tvunet_jax.kernels import conv, custom_calls, library

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NHWC = ("NHWC", "HWIO", "NHWC")
FWD, BWD_DATA, BWD_WEIGHTS = (
  "tvunet_onednn_conv_fwd",
  "tvunet_onednn_conv_bwd_data",
  "tvunet_onednn_conv_bwd_weights",
)
DFWD, DBWD_DATA, DBWD_WEIGHTS = (
  "tvunet_onednn_deconv_fwd",
  "tvunet_onednn_deconv_bwd_data",
  "tvunet_onednn_deconv_bwd_weights",
)
REQUIRE_ONEDNN = os.environ.get("TVUNET_REQUIRE_ONEDNN") == "1"


@pytest.fixture
def onednn_library():
  """Skips the test when the kernel library is not built; under TVUNET_REQUIRE_ONEDNN=1 fails it
  instead (reported as an error in set-up).

  (Without this, tests comparing 'onednn' against 'xla' would pass vacuously on a machine where
  'onednn' silently resolves to XLA.)
  """
  if not library.available():
    why = library._state.get("why", "unknown reason")  # pylint: disable=protected-access
    msg = f"oneDNN kernel library unavailable: {why}"
    if REQUIRE_ONEDNN:
      pytest.fail(f"{msg} (TVUNET_REQUIRE_ONEDNN=1)")
    pytest.skip(msg)


needs_onednn = pytest.mark.usefixtures("onednn_library")


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
  """Every test starts without TVUNET_CONV_BACKEND: a value in the caller's environment would
  silently turn the oneDNN-vs-XLA comparisons into XLA-vs-XLA."""
  monkeypatch.delenv(conv.ENV_BACKEND, raising=False)


# ------------------------------------------------------------------ helpers


def _normal(seed, shape, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32), dtype)


def _rel_err(a, b):
  """max |a - b| / max |b| in float64 (b the reference)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _out_shape(x_shape, w_shape, pads):
  n, h, w, _ = x_shape
  kh, kw, _, co = w_shape
  return (n, h + pads[0] + pads[1] - kh + 1, w + pads[2] + pads[3] - kw + 1, co)


def _ref_conv(x, w, pads):
  """The reference: XLA's convolution at full float32 precision."""
  return lax.conv_general_dilated(
    x,
    w,
    (1, 1),
    ((pads[0], pads[1]), (pads[2], pads[3])),
    dimension_numbers=NHWC,
    precision=lax.Precision.HIGHEST,
  )


def _fwd_and_grads(conv_fn, x, w, cot):
  """(y, dx, dw) of y = conv_fn(x, w) for the cotangent `cot`, through `jax.vjp`."""
  y, vjp = jax.vjp(conv_fn, x, w)
  dx, dw = vjp(cot)
  return y, dx, dw


def _assert_bf16_matches_f32_reference(got, x, w, cot, ref):
  """`got` = (y, dx, dw) in bfloat16, within bf16 rounding of the float32 reference `ref(x, w)`
  computed on the same (bf16-rounded) inputs."""
  f32 = lambda a: a.astype(jnp.float32)
  want = jax.jit(functools.partial(_fwd_and_grads, ref))(f32(x), f32(w), f32(cot))
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.dtype == jnp.bfloat16, (name, g.dtype)
    assert _rel_err(g, r) <= 1e-2, (name, _rel_err(g, r))


def _lowered(fn, *args):
  """StableHLO text of jit(fn) at args (lowering only, no compile)."""
  return jax.jit(fn).lower(*args).as_text()


def _uses_onednn(fn, *args, op="conv"):
  """Whether jit(fn) calls the oneDNN kernels of `op` ('conv' or 'deconv', the transposed conv)."""
  return f"tvunet_onednn_{op}_" in _lowered(fn, *args)


# The U-Net's kinds of convolutions, then odd ones. (x shape, w shape, pads (top, bottom, left,
# right)); pads that differ per side and non-square kernels catch swapped H/W or top/bottom.
KERNEL_CASES = {
  "3x3_same": ((2, 8, 8, 4), (3, 3, 4, 8), (1, 1, 1, 1)),
  "3x3_same_16ch": ((3, 16, 12, 16), (3, 3, 16, 16), (1, 1, 1, 1)),
  "2x2_subpixel": ((2, 8, 8, 8), (2, 2, 8, 16), (1, 0, 1, 0)),
  "1x1_head": ((2, 8, 8, 8), (1, 1, 8, 1), (0, 0, 0, 0)),
  "nonsquare_odd_ch_3to5": ((1, 6, 10, 3), (3, 3, 3, 5), (1, 1, 1, 1)),
  "nonsquare_odd_ch_5to7": ((1, 7, 5, 5), (3, 3, 5, 7), (1, 1, 1, 1)),
  "2x2_subpixel_odd": ((1, 9, 4, 7), (2, 2, 7, 3), (1, 0, 1, 0)),
  "3x3_valid_batch1": ((1, 5, 7, 3), (3, 3, 3, 2), (0, 0, 0, 0)),
  "asymmetric_pads_3x2_kernel": ((2, 6, 9, 3), (3, 2, 3, 5), (2, 0, 0, 1)),
}


# ------------------------------------------------------------------ 1. kernels vs lax, float32


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, pads", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_onednn_conv_matches_lax_float32(x_shape, w_shape, pads):
  """Forward, input gradient and weight gradient of `onednn_conv` equal XLA's to f32 rounding.

  Pins each of the three handlers (and the custom_vjp wiring between them: which operand is the
  cotangent, the padding passed to the backward kernels, the HWIO <-> oneDNN weight reorders) on
  every kind of conv the U-Net runs and on shapes where H/W or Ci/Co mix-ups would show.
  """
  x, w = _normal(0, x_shape), _normal(1, w_shape)
  cot = _normal(2, _out_shape(x_shape, w_shape, pads))
  got = jax.jit(
    functools.partial(_fwd_and_grads, lambda a, b: custom_calls.onednn_conv(a, b, pads))
  )(x, w, cot)
  want = jax.jit(functools.partial(_fwd_and_grads, lambda a, b: _ref_conv(a, b, pads)))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.shape == r.shape and g.dtype == jnp.float32, name
    assert _rel_err(g, r) <= 1e-5, (name, _rel_err(g, r))


@needs_onednn
def test_onednn_conv_matches_numpy():
  """The forward against a plain numpy loop, so the reference itself is not only XLA."""
  x_shape, w_shape, pads = (1, 5, 6, 3), (3, 2, 3, 4), (2, 0, 1, 1)
  x, w = _normal(3, x_shape), _normal(4, w_shape)
  y = np.asarray(jax.jit(lambda a, b: custom_calls.onednn_conv(a, b, pads))(x, w))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), pads[:2], pads[2:], (0, 0)))
  wn = np.asarray(w, np.float64)
  ho, wo = _out_shape(x_shape, w_shape, pads)[1:3]
  ref = np.zeros((1, ho, wo, 4))
  for i in range(w_shape[0]):
    for j in range(w_shape[1]):
      ref += np.einsum("nhwc,co->nhwo", xp[:, i : i + ho, j : j + wo, :], wn[i, j])
  assert _rel_err(y, ref) <= 1e-5


@needs_onednn
@pytest.mark.parametrize(
  "x_shape, w_shape, pads",
  [KERNEL_CASES["3x3_same_16ch"], KERNEL_CASES["2x2_subpixel"], KERNEL_CASES["1x1_head"]],
  ids=["3x3", "2x2", "1x1"],
)
def test_float32_kernels_are_optimised(x_shape, w_shape, pads):
  """oneDNN picks a real kernel, not its reference loop ('ref:...'), for the U-Net's f32 convs.

  A 'ref' implementation is correct but orders of magnitude slower: it would silently defeat the
  point of the library.
  """
  for op in range(3):
    impl = library.impl_info(op, jnp.float32, x_shape, w_shape, pads)
    assert impl and not impl.startswith("ref"), (op, impl)


@needs_onednn
@pytest.mark.parametrize("batch", [8, 6])
def test_kernels_under_a_data_mesh_match_lax(batch):
  """With an 8-device data mesh as context mesh the kernels run per shard and still match.

  batch 8 (rows split over the devices): each device convolves its row; the weight gradient is
  the psum of the per-shard ones (a missing or doubled reduction would be off by a factor).
  batch 6 (not divisible by 8, so replicated, like `init` on one example): the kernels run
  unsplit, which must be equally correct.
  """
  mesh = sharding.make_mesh(8)
  rows = sharding.batch_sharding(mesh) if batch % 8 == 0 else sharding.replicated(mesh)
  x_shape, w_shape, pads = (batch, 6, 5, 3), (3, 3, 3, 4), (1, 1, 1, 1)
  x = jax.device_put(_normal(0, x_shape), rows)
  w = _normal(1, w_shape)
  cot = jax.device_put(_normal(2, _out_shape(x_shape, w_shape, pads)), rows)
  per_shard = lambda a, b: custom_calls.onednn_conv(a, b, pads, axis_name=sharding.DATA_AXIS)
  got = sharding.under_mesh(mesh, jax.jit(functools.partial(_fwd_and_grads, per_shard)))(x, w, cot)
  want = jax.jit(functools.partial(_fwd_and_grads, lambda a, b: _ref_conv(a, b, pads)))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert _rel_err(g, r) <= 1e-5, (name, batch, _rel_err(g, r))


# ------------------------------------------------------------------ 2. bfloat16


BF16_CASES = {
  k: KERNEL_CASES[k] for k in ("3x3_same_16ch", "2x2_subpixel", "1x1_head", "nonsquare_odd_ch_5to7")
}


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, pads", BF16_CASES.values(), ids=BF16_CASES.keys())
def test_bfloat16_through_drop_in_matches_float32_reference(x_shape, w_shape, pads):
  """bf16 inputs through `conv_general_dilated('onednn')`: bf16 outputs and gradients, equal to
  the float32 conv of the same bf16-rounded values within bf16 rounding.

  This is the path a `dtype=bfloat16` U-Net takes: native bf16 kernels where oneDNN has them,
  float32 kernels and a rounding elsewhere (AVX2). Either way the oneDNN kernels must run.
  """
  x = _normal(0, x_shape, jnp.bfloat16)
  w = _normal(1, w_shape, jnp.bfloat16)
  cot = _normal(2, _out_shape(x_shape, w_shape, pads), jnp.bfloat16)
  padding = ((pads[0], pads[1]), (pads[2], pads[3]))
  drop_in = lambda a, b: conv.conv_general_dilated("onednn")(
    a, b, (1, 1), padding, dimension_numbers=NHWC
  )
  assert _uses_onednn(drop_in, x, w)
  got = jax.jit(functools.partial(_fwd_and_grads, drop_in))(x, w, cot)
  _assert_bf16_matches_f32_reference(got, x, w, cot, functools.partial(_ref_conv, pads=pads))


@needs_onednn
def test_native_bfloat16_kernels_match_float32_reference():
  """Where oneDNN has bf16 kernels (AVX-512 / AMX), `onednn_conv` on bf16 directly: bf16 output
  and input gradient, the weight gradient rounded to bf16 from its f32 accumulation."""
  if not library.native_bf16():
    pytest.skip(
      "no native oneDNN bf16 convolutions on this CPU (e.g. AVX2): the drop-in "
      "computes bf16 in float32, tested above"
    )
  x_shape, w_shape, pads = KERNEL_CASES["3x3_same_16ch"]
  x = _normal(0, x_shape, jnp.bfloat16)
  w = _normal(1, w_shape, jnp.bfloat16)
  cot = _normal(2, _out_shape(x_shape, w_shape, pads), jnp.bfloat16)
  got = jax.jit(
    functools.partial(_fwd_and_grads, lambda a, b: custom_calls.onednn_conv(a, b, pads))
  )(x, w, cot)
  _assert_bf16_matches_f32_reference(got, x, w, cot, functools.partial(_ref_conv, pads=pads))


# ------------------------------------------------------------ 3. the drop-in: padding, fallbacks


@needs_onednn
@pytest.mark.parametrize(
  "padding, kernel, explicit",
  [
    ("SAME", (3, 3), ((1, 1), (1, 1))),
    ("SAME", (2, 2), ((0, 1), (0, 1))),  # XLA's SAME puts the odd row/column at the end
    ("SAME_LOWER", (2, 2), ((1, 0), (1, 0))),  # ... SAME_LOWER at the start (the sub-pixel pads)
    ("SAME", (1, 1), ((0, 0), (0, 0))),
    ("SAME", (3, 2), ((1, 1), (0, 1))),  # non-square kernels: per-axis pads not swapped
    ("SAME", (1, 3), ((0, 0), (1, 1))),
    ("VALID", (3, 3), ((0, 0), (0, 0))),
  ],
  ids=["same_3x3", "same_2x2", "same_lower_2x2", "same_1x1", "same_3x2", "same_1x3", "valid_3x3"],
)
def test_drop_in_string_padding_equals_explicit(padding, kernel, explicit):
  """String padding is turned into the same explicit pads as XLA's, and runs on oneDNN."""
  x, w = _normal(0, (2, 7, 6, 3)), _normal(1, (*kernel, 3, 5))
  drop_in = conv.conv_general_dilated("onednn")
  by_name = lambda a, b: drop_in(a, b, (1, 1), padding, dimension_numbers=NHWC)
  by_pads = lambda a, b: drop_in(a, b, (1, 1), explicit, dimension_numbers=NHWC)
  assert _uses_onednn(by_name, x, w) and _uses_onednn(by_pads, x, w)
  y_name, y_pads = jax.jit(by_name)(x, w), jax.jit(by_pads)(x, w)
  np.testing.assert_array_equal(y_name, y_pads)  # same kernel, same pads: bitwise
  ref = lax.conv_general_dilated(
    x, w, (1, 1), padding, dimension_numbers=NHWC, precision=lax.Precision.HIGHEST
  )
  assert y_name.shape == ref.shape
  assert _rel_err(y_name, ref) <= 1e-5


# Cases the kernels do not take: (name, kwargs for conv_general_dilated on x (2, 8, 8, 4)).
FALLBACK_CASES = {
  "stride_2": dict(window_strides=(2, 2), padding="SAME"),
  "rhs_dilation_2": dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2)),
  "lhs_dilation_2": dict(window_strides=(1, 1), padding=((2, 1), (2, 1)), lhs_dilation=(2, 2)),
  "feature_group_count_2": dict(window_strides=(1, 1), padding="SAME", feature_group_count=2),
  "negative_padding": dict(window_strides=(1, 1), padding=((-1, 1), (1, 1))),
  "preferred_element_type": dict(
    window_strides=(1, 1), padding="SAME", preferred_element_type=jnp.float32
  ),
  "nchw_layout": dict(
    window_strides=(1, 1), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
  ),
}


@needs_onednn
@pytest.mark.parametrize("kwargs", FALLBACK_CASES.values(), ids=FALLBACK_CASES.keys())
def test_drop_in_falls_back_to_lax_for_unsupported_convs(kwargs):
  """Strided, dilated, grouped, negatively padded, other layouts or a requested accumulation type:
  not for the kernels. The drop-in must hand them to XLA unchanged (no custom call, bitwise
  XLA's result), never run a wrong oneDNN conv."""
  kwargs = dict(kwargs)
  kwargs.setdefault("dimension_numbers", NHWC)
  x = _normal(0, (2, 8, 8, 4))
  groups = kwargs.get("feature_group_count", 1)
  w = _normal(1, (3, 3, 4 // groups, 6))
  if kwargs["dimension_numbers"][0] == "NCHW":
    x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
  drop_in = lambda a, b: conv.conv_general_dilated("onednn")(a, b, **kwargs)
  assert not _uses_onednn(drop_in, x, w)
  xla = lambda a, b: lax.conv_general_dilated(a, b, **kwargs)
  np.testing.assert_array_equal(jax.jit(drop_in)(x, w), jax.jit(xla)(x, w))


@needs_onednn
def test_drop_in_falls_back_to_lax_for_float64():
  """float64 (only with x64 enabled, here scoped to this test) goes to XLA: the kernels are f32 /
  bf16 only."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float64)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 6)), jnp.float64)
    if x.dtype != jnp.float64:
      pytest.skip("float64 unavailable (x64 off)")
    drop_in = lambda a, b: conv.conv_general_dilated("onednn")(
      a, b, (1, 1), "SAME", dimension_numbers=NHWC
    )
    assert not _uses_onednn(drop_in, x, w)
    y = jax.jit(drop_in)(x, w)
    assert y.dtype == jnp.float64
    np.testing.assert_array_equal(
      y, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    )


# ------------------------------------------------------------------ 4. backend resolution


_FALLBACK_SCRIPT = r"""
import json, logging
import numpy as np

messages = []

class Capture(logging.Handler):
  def emit(self, record):
    messages.append(record.getMessage())

logging.getLogger().addHandler(Capture(level=logging.WARNING))

import jax
from jax import lax
from tvunet_jax.kernels import conv, custom_calls, library, winograd

resolved = {b: conv.resolve(b) for b in ('auto', 'onednn')}
conv.resolve('onednn')  # asked again: no second warning
rng = np.random.default_rng(0)
x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
nhwc = ('NHWC', 'HWIO', 'NHWC')
ys = {b: np.asarray(jax.jit(lambda a, c, b=b: conv.conv_general_dilated(b)(
          a, c, (1, 1), 'SAME', dimension_numbers=nhwc))(x, w)) for b in ('auto', 'onednn')}
ref = np.asarray(jax.jit(lambda a, c: lax.conv_general_dilated(
    a, c, (1, 1), 'SAME', dimension_numbers=nhwc))(x, w))
try:
  library.impl_info(0, np.float32, x.shape, w.shape, (1, 1, 1, 1))
  impl_error = None
except RuntimeError as e:
  impl_error = str(e)
print(json.dumps({
    'available': library.available(), 'native_bf16': library.native_bf16(),
    'version': library.onednn_version(), 'resolved': resolved, 'warnings': messages,
    'equal': {b: bool(np.array_equal(y, ref)) for b, y in ys.items()},
    'y': ys['onednn'].tolist(), 'impl_error': impl_error}))
"""


def test_missing_library_falls_back_to_xla_with_one_warning():
  """Without the library (TVUNET_ONEDNN_LIB pointing nowhere, in a fresh process since the
  library loads once per process) everything runs on XLA: 'auto' and 'onednn' resolve to 'xla',
  the 'onednn' request logs one warning naming the missing file, and convs give XLA's numbers.
  Runs whether or not the library is built here."""
  missing = "/nonexistent/lib.so"
  env = dict(os.environ, TVUNET_ONEDNN_LIB=missing, JAX_PLATFORMS="cpu")
  env.pop("TVUNET_CONV_BACKEND", None)
  proc = subprocess.run(
    [sys.executable, "-c", _FALLBACK_SCRIPT],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["available"] is False and out["native_bf16"] is False and out["version"] is None
  assert out["resolved"] == {"auto": "xla", "onednn": "xla"}
  # One warning in all, naming the library, however often 'onednn' was resolved (and traced).
  named = [m for m in out["warnings"] if missing in m]
  assert len(named) == 1, out["warnings"]
  assert "oneDNN" in named[0]
  assert out["impl_error"] and missing in out["impl_error"]
  assert out["equal"] == {"auto": True, "onednn": True}
  # The numbers printed there are XLA's numbers here.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  ref = _ref_conv(x, w, (1, 1, 1, 1))
  np.testing.assert_allclose(np.asarray(out["y"], np.float32), ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_env_backend_overrides_config(monkeypatch):
  """TVUNET_CONV_BACKEND wins over the configured backend, both ways, and it is read when the
  conv is traced: with 'xla' no custom call is emitted even though the library is present."""
  assert conv.resolve("auto") == "onednn" and conv.resolve("onednn") == "onednn"
  x, w = _normal(0, (1, 6, 6, 2)), _normal(1, (3, 3, 2, 3))

  def drop_in():
    # A new function each time: jit caches traces per function, and the variable is read only
    # when tracing (so it must be set before a function is first traced, e.g. at process start).
    return lambda a, b: conv.conv_general_dilated("onednn")(
      a, b, (1, 1), "SAME", dimension_numbers=NHWC
    )

  assert _uses_onednn(drop_in(), x, w)
  monkeypatch.setenv(conv.ENV_BACKEND, "xla")
  assert conv.resolve("auto") == "xla" and conv.resolve("onednn") == "xla"
  assert not _uses_onednn(drop_in(), x, w)
  monkeypatch.setenv(conv.ENV_BACKEND, "onednn")
  assert conv.resolve("xla") == "onednn"


@pytest.mark.parametrize("where", ["argument", "env"])
def test_invalid_backend_raises(monkeypatch, where):
  """A misspelt backend is an error (naming the allowed ones), not a silent fallback, whether it
  comes from the config or from TVUNET_CONV_BACKEND; the model surfaces it when it is built."""
  backend = "cuda"
  if where == "env":
    monkeypatch.setenv(conv.ENV_BACKEND, "cuda")
    backend = "auto"
  with pytest.raises(ValueError, match="conv backend must be one of"):
    conv.resolve(backend)
  with pytest.raises(ValueError, match="conv backend must be one of"):
    conv.conv_general_dilated(backend)
  with pytest.raises(ValueError, match="conv backend must be one of"):
    models.UNet(base=2, depth=1, conv_backend=backend)
  with pytest.raises(ValueError, match="conv backend must be one of"):
    models.build(
      {
        "base": 2,
        "depth": 1,
        "dropout": 0.0,
        "num_outputs": 1,
        "dtype": "float32",
        "upsample": "subpixel",
        "pool": "reshape",
        "conv_backend": backend,
      }
    )
  with pytest.raises(ValueError, match="backend must be 'onednn' or 'xla'"):
    conv.ConvOps("auto")  # a ConvOps is resolved by construction


def test_conv_ops_is_a_hashable_value_chosen_once(monkeypatch):
  """`choose` reads TVUNET_CONV_BACKEND once: the ConvOps it returns (and a model holding it)
  keeps its backend when the variable changes afterwards; equal choices give equal, equally
  hashed values (a flax field, a jit cache key); an explicit ConvOps bypasses the variable."""
  monkeypatch.setenv(conv.ENV_BACKEND, "xla")
  ops = conv.choose("onednn", axis_name="data")
  assert ops == conv.ConvOps("xla", "data") and hash(ops) == hash(conv.ConvOps("xla", "data"))
  assert not ops.fuse_skip and not ops.native_transpose(jnp.float32)
  model = models.UNet(base=2, depth=1, conv_backend="onednn")  # no axis: kernels unsplit
  assert model.conv_backend == conv.ConvOps("xla", None)
  assert model.clone(base=4).conv_backend == model.conv_backend
  assert conv.resolve(ops) == "xla"  # already resolved: the variable is not read again
  monkeypatch.setenv(conv.ENV_BACKEND, "onednn")
  assert conv.resolve("xla") == conv.resolve("auto")  # the variable wins over the argument...
  assert model.conv_backend.backend == "xla" and conv.resolve(ops) == "xla"  # ...once
  assert models.UNet(base=2, depth=1, conv_backend=conv.XLA).conv_backend is conv.XLA
  cfg = {
    "base": 2,
    "depth": 1,
    "dropout": 0.0,
    "num_outputs": 1,
    "dtype": "float32",
    "upsample": "subpixel",
    "pool": "reshape",
    "conv_backend": conv.XLA,
  }
  assert models.build(cfg).conv_backend is conv.XLA
  assert models.build({**cfg, "conv_backend": "xla"}, axis_name=None).conv_backend == (
    conv.choose("xla", axis_name=None)
  )


# ------------------------------------------------------------------ 5. the U-Net, oneDNN vs XLA


def _tiny_unet(backend, **overrides):
  return models.UNet(**{**dict(base=4, depth=2, num_outputs=1, conv_backend=backend), **overrides})


@pytest.fixture(scope="module")
def tiny_variables():
  """Variables of the tiny U-Net (base 4, depth 2, 16x16x1 inputs) initialised with the same key
  under conv_backend 'onednn' and 'xla': {'onednn': ..., 'xla': ...}.

  One jitted program for both ('rbg' key: jit(init) with threefry compiles for tens of seconds
  on XLA:CPU). Init runs a forward pass too, through the backend's convs.
  """
  x = jnp.zeros((1, 16, 16, 1))

  def init(key):
    return {b: _tiny_unet(b).init(key, x, train=False) for b in ("onednn", "xla")}

  return jax.jit(init)(jax.random.key(0, impl="rbg"))


def _assert_trees_close(got, want, rtol, name):
  """Per leaf max|got - want| <= rtol * max|want|; conv biases before BatchNorm (true gradient 0,
  values are round-off) against the whole tree's scale instead."""
  assert jax.tree.structure(got) == jax.tree.structure(want), name
  scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    key = jax.tree_util.keystr(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (name, key)
    pre_bn_bias = "conv_" in key and key.endswith("['bias']")
    bound = rtol * (scale if pre_bn_bias else max(np.max(np.abs(b)), 1e-30))
    assert np.max(np.abs(a - b)) <= bound, (name, key, np.max(np.abs(a - b)), bound)


@needs_onednn
def test_unet_onednn_equals_xla(tiny_variables):
  """`conv_backend` changes who computes the convs, nothing else: the same init gives the same
  parameter tree and values, and eval-mode outputs, train-mode BatchNorm statistics and the
  gradients of a loss agree with XLA's to float32 rounding (1e-4 relative)."""
  x = _normal(0, (2, 16, 16, 1))
  target = _normal(1, (2, 16, 16, 1))
  onednn, xla = _tiny_unet("onednn", dropout=0.0), _tiny_unet("xla", dropout=0.0)
  variables = tiny_variables["onednn"]
  assert jax.tree.structure(variables) == jax.tree.structure(tiny_variables["xla"])
  jax.tree.map(np.testing.assert_array_equal, variables, tiny_variables["xla"])

  def run(model, variables):
    logits = model.apply(variables, x, train=False)

    def loss(params):
      out, updates = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return jnp.mean((out - target) ** 2), updates["batch_stats"]

    grads, stats = jax.grad(loss, has_aux=True)(variables["params"])
    return logits, grads, stats

  lowered = {
    b: jax.jit(functools.partial(run, m)).lower(variables)
    for b, m in (("onednn", onednn), ("xla", xla))
  }
  assert "tvunet_onednn_conv" in lowered["onednn"].as_text()
  assert "tvunet_onednn_deconv" in lowered["onednn"].as_text()  # the up-sampling
  assert "tvunet_onednn_" not in lowered["xla"].as_text()
  got, want = (lowered[b].compile()(variables) for b in ("onednn", "xla"))
  assert got[0].shape == (2, 16, 16, 1) and got[0].dtype == jnp.float32
  assert _rel_err(got[0], want[0]) <= 1e-4, _rel_err(got[0], want[0])
  _assert_trees_close(got[1], want[1], 1e-4, "grads")
  _assert_trees_close(got[2], want[2], 1e-4, "batch_stats")


@pytest.mark.parametrize("backend", ["onednn", "xla"])
def test_concat_input_conv_equals_conv_on_the_concatenation(backend, request):
  """`layers.ConcatInputConv` on (a, b) is `nn.Conv` on concat(a, b): the same parameters from
  the same key, and the same output and gradients (inputs, kernel, bias) to float32 rounding.
  On 'onednn' it makes one oneDNN conv per input and never builds the concatenation. Odd
  channel counts (3 + 5 -> 7) and a non-square input."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  if backend == "onednn":
    request.getfixturevalue("onednn_library")  # needs_onednn, for this case only
  a, b = _normal(0, (2, 6, 5, 3)), _normal(1, (2, 6, 5, 5))
  mine = layers.ConcatInputConv(7, ops=conv.choose(backend))
  ref = nn.Conv(7, (3, 3), padding="SAME", kernel_init=layers.he_normal, bias_init=layers.zeros)
  key = jax.random.key(3)
  params = mine.init(key, (a, b))
  ref_params = ref.init(key, jnp.concatenate([a, b], -1))
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  dy = _normal(2, (2, 6, 5, 7))

  def grads(apply):
    return jax.grad(lambda p, a, b: jnp.sum(apply(p, a, b) * dy), argnums=(0, 1, 2))(params, a, b)

  mine_apply = lambda p, a, b: mine.apply(p, (a, b))
  ref_apply = lambda p, a, b: ref.apply(p, jnp.concatenate([a, b], -1))
  assert _rel_err(jax.jit(mine_apply)(params, a, b), ref_apply(params, a, b)) <= 1e-5
  got_grads = jax.jit(lambda: grads(mine_apply))()
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads(ref_apply))):
    assert _rel_err(got, want) <= 1e-5
  hlo = jax.jit(mine_apply).lower(params, a, b).as_text()
  if backend == "onednn":
    assert hlo.count(f"@{library.TARGETS[0]}(") == 2 and "concatenate" not in hlo, hlo


# ------------------------------------------------------------------ 6. a sharded train step


def _shapes_by_call(hlo, target):
  """Per custom call to `target` in compiled HLO text: its result shape then its operand shapes
  (from operand_layout_constraints), each a tuple of ints."""
  calls = []
  for line in hlo.splitlines():
    if f'custom_call_target="{target}"' not in line:
      continue
    result = re.search(r"= (?:f32|bf16)\[([\d,]*)\]", line)
    operands = re.search(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}", line)
    assert result and operands, line
    shapes = [result.group(1)] + re.findall(r"(?:f32|bf16)\[([\d,]*)\]", operands.group(1))
    calls.append([tuple(int(d) for d in s.split(",")) for s in shapes])
  return calls


def _batch_dims(hlo):
  """Batch sizes seen by every oneDNN custom call: the activation operands and results."""
  dims = []
  for fwd, bwd_data, bwd_weights in ((FWD, BWD_DATA, BWD_WEIGHTS), (DFWD, DBWD_DATA, DBWD_WEIGHTS)):
    for result, *operands in _shapes_by_call(hlo, fwd):  # x -> y
      dims += [operands[0][0], result[0]]
    for result, *operands in _shapes_by_call(hlo, bwd_data):  # dy -> dx
      dims += [operands[0][0], result[0]]
    for _, *operands in _shapes_by_call(hlo, bwd_weights):  # x, dy -> dw (weights: no batch)
      dims += [operands[0][0], operands[1][0]]
  return dims


@needs_onednn
def test_sharded_train_step_matches_one_device():
  """A jitted `steps.train_step` with conv_backend='onednn' on 8 fake devices (under
  `sharding.under_mesh`) equals the same step on 1 device, and runs the kernels per shard.

  As tests/test_train.py does for 1 vs 8 devices, dropout stays on (its 'rbg' masks do not depend
  on the layout). The optimizer is plain SGD with a learning rate of 1e3: the updated parameters
  are then dominated by -1e3 * gradient, so (old - new) / 1e3 compares the gradients themselves
  at 1e-5, not the float32 rounding of the old parameters (with Adam, the first step g / |g| would
  blow up the round-off of near-zero gradients instead). Loss and BatchNorm statistics: 1e-5.
  In the 8-device program every oneDNN call sees 16 / 8 = 2 rows (a custom call is opaque to
  XLA's partitioner, which would otherwise gather the batch onto every device) and no all-gather
  exists; the 1-device program, checked the same way, sees the whole batch of 16.
  """
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.model.conv_backend = "onednn"
  cfg.model.depth = 1  # the tiny config at one level: every kind of conv, a third less compile
  model = models.build(cfg.model, axis_name=sharding.DATA_AXIS)
  assert (
    model.conv_backend == conv.choose("onednn", axis_name=sharding.DATA_AXIS) and model.dropout > 0
  )
  lr = 1e3
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
  variables = random_variables(model, (1, 16, 16, 1))
  params = variables["params"]
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables["batch_stats"],
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(0, impl=steps.DROPOUT_RNG_IMPL)),
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(16, 16, 16, 1)).astype(np.float32),
    "label": (rng.random((16, 16, 16, 1)) > 0.7).astype(np.float32),
  }
  n_convs = sum(
    jax.tree_util.keystr(p).endswith("['kernel']")
    for p, _ in jax.tree_util.tree_leaves_with_path(params)
  )

  results, hlos = {}, {}
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    state_sh = sharding.state_shardings(mesh, state)
    batch_sh = sharding.batch_sharding(mesh)
    jitted = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, loss_cfg=cfg.loss),
      in_shardings=(state_sh, batch_sh),
    )
    s, b = jax.device_put(state, state_sh), jax.device_put(batch, batch_sh)
    # Lowered (traced) under the mesh as train.py does it; the call below reuses the executable.
    hlos[n] = sharding.under_mesh(mesh, jitted.lower)(s, b).compile().as_text()
    new_state, metrics = sharding.under_mesh(mesh, jitted)(s, b)
    results[n] = jax.device_get((new_state, metrics))

  n_up = cfg.model.depth  # one transposed conv (up-sampling) per level
  for n, per_call in ((1, 16), (8, 2)):
    # every conv on oneDNN: the up-samplings as transposed convs, the rest as convs, of which
    # each up block's first is two (`layers.ConcatInputConv`: one per half of the skip pair)
    # (n_convs kernels: minus n_up transposed, plus n_up second halves = n_convs calls)
    for fwd, bwd_weights, count in ((FWD, BWD_WEIGHTS, n_convs), (DFWD, DBWD_WEIGHTS, n_up)):
      assert len(_shapes_by_call(hlos[n], fwd)) == count, (n, fwd)
      assert len(_shapes_by_call(hlos[n], bwd_weights)) == count, (n, bwd_weights)
    dims = _batch_dims(hlos[n])
    assert dims and set(dims) == {per_call}, (n, sorted(set(dims)))
  assert "all-gather" not in hlos[8]

  (s1, m1), (s8, m8) = results[1], results[8]
  assert np.isfinite(m1["loss"])
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  grads = lambda s: jax.tree.map(
    lambda new, old: (np.asarray(old, np.float64) - np.asarray(new, np.float64)) / lr,
    s.params,
    params,
  )
  _assert_trees_close(grads(s8), grads(s1), 1e-5, "gradients")
  _assert_trees_close(s8.batch_stats, s1.batch_stats, 1e-5, "batch_stats")


@needs_onednn
def test_drop_in_under_vmap_matches_lax():
  """`jax.vmap` over an extra leading axis runs the rank-4 kernel once per element (the FFI
  call's vmap_method) and equals lax's batched conv, forward and gradient."""
  xs = jnp.asarray(_normal(3, (3, 2, 6, 5, 2)))
  w = jnp.asarray(_normal(4, (3, 3, 2, 4)))
  dn = ("NHWC", "HWIO", "NHWC")
  mine = conv.conv_general_dilated("onednn")
  f = lambda fn: jax.vmap(lambda a: fn(a, w, (1, 1), "SAME", dimension_numbers=dn))
  ref = f(lambda *a, **k: jax.lax.conv_general_dilated(*a, precision="highest", **k))
  assert _uses_onednn(f(mine), xs)
  assert _rel_err(f(mine)(xs), ref(xs)) <= 1e-5
  g_mine = jax.grad(lambda a: jnp.sum(f(mine)(a) ** 2))(xs)
  g_ref = jax.grad(lambda a: jnp.sum(ref(a) ** 2))(xs)
  assert _rel_err(g_mine, g_ref) <= 1e-5


@needs_onednn
def test_kernel_rejects_inconsistent_shapes_with_one_line_error():
  """The C++ handler checks the operands against the padding and answers with XLA's
  InvalidArgument naming the shapes, instead of reading or writing out of bounds."""
  x = jnp.ones((1, 6, 6, 2), jnp.float32)
  w = jnp.ones((3, 3, 2, 4), jnp.float32)
  bad_out = (1, 5, 6, 4)  # pads (1, 1, 1, 1) give 6 rows, not 5
  with pytest.raises(Exception, match=r"inconsistent shapes x\(1,6,6,2\) w\(3,3,2,4\)"):
    jax.block_until_ready(
      jax.jit(lambda a, b: custom_calls._call(0, a, b, bad_out, jnp.float32, (1, 1, 1, 1)))(x, w)
    )
  with pytest.raises(Exception, match="mismatched dtypes"):
    jax.block_until_ready(
      jax.jit(lambda a, b: custom_calls._call(0, a, b, (1, 6, 6, 4), jnp.float32, (1, 1, 1, 1)))(
        x, w.astype(jnp.bfloat16)
      )
    )


@needs_onednn
def test_transposed_kernel_rejects_bad_shapes_and_stride():
  """The transposed-conv handlers check shapes against stride and pads the same way."""
  x = jnp.ones((1, 4, 4, 2), jnp.float32)
  w = jnp.ones((3, 3, 2, 3), jnp.float32)
  bad_out = (1, 7, 8, 3)  # stride 2, pads (0, 1, 0, 1): (4 - 1) * 2 - 1 + 3 = 8 rows, not 7
  with pytest.raises(Exception, match=r"inconsistent shapes x\(1,4,4,2\) w\(3,3,2,3\)"):
    jax.block_until_ready(
      jax.jit(
        lambda a, b: custom_calls._call(3, a, b, bad_out, jnp.float32, (0, 1, 0, 1), stride=2)
      )(x, w)
    )
  with pytest.raises(Exception, match="stride positive"):
    jax.block_until_ready(
      jax.jit(
        lambda a, b: custom_calls._call(3, a, b, (1, 8, 8, 3), jnp.float32, (0, 1, 0, 1), stride=0)
      )(x, w)
    )


@needs_onednn
def test_conv_transpose_default_dimension_numbers_run_on_onednn():
  """`dimension_numbers=None` means NHWC / HWIO for a 2D `lax.conv_transpose`; the drop-in must
  read it so too (and run oneDNN), not fall back silently."""
  x, w = _normal(0, (2, 4, 5, 3)), _normal(1, (3, 3, 3, 4))
  mine = lambda a, b: conv.conv_transpose("onednn")(a, b, (2, 2), "SAME")
  assert _uses_onednn(mine, x, w, op="deconv")
  ref = lax.conv_transpose(x, w, (2, 2), "SAME", precision=lax.Precision.HIGHEST)
  assert _rel_err(jax.jit(mine)(x, w), ref) <= 1e-5


def test_build_optional_accepts_only_missing_prerequisites(monkeypatch, tmp_path, capsys):
  """`build --optional` (the README's set-up) goes on without a compiler or without oneDNN,
  with one line saying so; a plain `build` fails on both, and nothing is written either way."""
  from tvunet_jax.kernels import build  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "lib.so")
  monkeypatch.setattr(build, "onednn_root", lambda: str(tmp_path))  # "found"; no compiler
  monkeypatch.setattr(build, "compiler", lambda: None)
  assert build.main(["--optional", "--out", out]) == 0
  assert "no C++ compiler found" in capsys.readouterr().err
  assert build.main(["--out", out]) == 1
  monkeypatch.setattr(build, "onednn_root", lambda: None)
  assert build.main(["--optional", "--out", out]) == 0
  assert "oneDNN not found" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 7. the transposed convolution


def _ref_conv_t(x, w, strides, padding):
  """The reference: `lax.conv_transpose` (flax's convention) at full float32 precision."""
  return lax.conv_transpose(
    x, w, strides, padding, dimension_numbers=NHWC, precision=lax.Precision.HIGHEST
  )


def _onednn_conv_t(strides, padding, axis_name=None):
  """`conv_transpose('onednn')` at fixed strides and padding, NHWC/HWIO: (x, w) -> y."""
  fn = conv.conv_transpose("onednn", axis_name=axis_name)
  return lambda a, b: fn(a, b, strides, padding, dimension_numbers=NHWC)


# (x shape, w shape, strides, padding): the U-Net's up-sampling (3x3, stride 2, SAME) at its
# channel widths, then odd ones; non-square images and kernels catch swapped H/W.
TRANSPOSE_CASES = {
  "unet_3x3_s2_same": ((2, 4, 4, 16), (3, 3, 16, 8), (2, 2), "SAME"),
  "nonsquare_odd_ch_batch1": ((1, 5, 3, 7), (3, 3, 7, 5), (2, 2), "SAME"),
  "valid_3x3_s2": ((2, 4, 6, 3), (3, 3, 3, 4), (2, 2), "VALID"),
  "same_2x2_s2": ((2, 3, 5, 4), (2, 2, 4, 3), (2, 2), "SAME"),
  "same_3x2_s2": ((1, 4, 5, 3), (3, 2, 3, 5), (2, 2), "SAME"),
  "same_3x3_s3": ((1, 4, 5, 3), (3, 3, 3, 5), (3, 3), "SAME"),
  "same_4x4_s2": ((2, 5, 4, 3), (4, 4, 3, 2), (2, 2), "SAME"),
  "same_3x3_s1": ((2, 5, 6, 3), (3, 3, 3, 4), (1, 1), "SAME"),
}


@needs_onednn
@pytest.mark.parametrize(
  "x_shape, w_shape, strides, padding", TRANSPOSE_CASES.values(), ids=TRANSPOSE_CASES.keys()
)
def test_conv_transpose_matches_lax_float32(x_shape, w_shape, strides, padding):
  """`conv_transpose('onednn')` (one oneDNN deconvolution per pass, kernel flipped and pads
  converted) equals `lax.conv_transpose` forward, input gradient and weight gradient at 1e-5:
  pins the flip, the (lo, hi) -> oneDNN pad conversion per axis, and the three handlers."""
  x, w = _normal(0, x_shape), _normal(1, w_shape)
  ref = functools.partial(_ref_conv_t, strides=strides, padding=padding)
  cot = _normal(2, jax.eval_shape(ref, x, w).shape)
  mine = _onednn_conv_t(strides, padding)
  assert _uses_onednn(mine, x, w, op="deconv")
  got = jax.jit(functools.partial(_fwd_and_grads, mine))(x, w, cot)
  want = jax.jit(functools.partial(_fwd_and_grads, ref))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.shape == r.shape and g.dtype == jnp.float32, name
    assert _rel_err(g, r) <= 1e-5, (name, _rel_err(g, r))


@needs_onednn
def test_onednn_conv_transpose_matches_numpy_scatter():
  """`onednn_conv_transpose` in oneDNN's own convention against a numpy scatter loop:
  out[s * i - top + k] += x[i] w[k] per axis, cropped by the pads (asymmetric here)."""
  x_shape, w_shape, stride, pads = (1, 3, 4, 2), (3, 2, 2, 3), 2, (1, 0, 0, 1)
  x, w = _normal(3, x_shape), _normal(4, w_shape)
  y = np.asarray(jax.jit(lambda a, b: custom_calls.onednn_conv_transpose(a, b, stride, pads))(x, w))
  xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
  (_, h, wd, _), (kh, kw, _, co) = x_shape, w_shape
  full = np.zeros((1, (h - 1) * stride + kh, (wd - 1) * stride + kw, co))
  for i in range(h):
    for j in range(wd):
      for a in range(kh):
        for b in range(kw):
          full[:, stride * i + a, stride * j + b] += xn[:, i, j] @ wn[a, b]
  ref = full[:, pads[0] : full.shape[1] - pads[1], pads[2] : full.shape[2] - pads[3]]
  assert y.shape == ref.shape
  assert _rel_err(y, ref) <= 1e-5


@needs_onednn
def test_conv_transpose_kernels_are_optimised():
  """oneDNN picks real kernels (not 'ref') for the U-Net's up-sampling, all three passes."""
  for op in (3, 4, 5):
    impl = library.impl_info(op, jnp.float32, (2, 8, 8, 32), (3, 3, 32, 16), (0, 1, 0, 1), 2)
    # composite names ('conv:any+jit:avx2'): no part may be a reference loop
    assert impl and not any(p.startswith("ref") for p in impl.split("+")), (op, impl)


@needs_onednn
def test_conv_transpose_bfloat16_within_rounding():
  """bf16 through `conv_transpose('onednn')`: bf16 results within bf16 rounding of the float32
  reference on the same bf16-rounded inputs (native kernels or f32-and-round, per CPU)."""
  x_shape, w_shape, strides, padding = TRANSPOSE_CASES["unet_3x3_s2_same"]
  x, w = _normal(0, x_shape, jnp.bfloat16), _normal(1, w_shape, jnp.bfloat16)
  ref = functools.partial(_ref_conv_t, strides=strides, padding=padding)
  cot = _normal(2, jax.eval_shape(ref, x, w).shape, jnp.bfloat16)
  mine = _onednn_conv_t(strides, padding)
  assert _uses_onednn(mine, x, w, op="deconv")
  got = jax.jit(functools.partial(_fwd_and_grads, mine))(x, w, cot)
  _assert_bf16_matches_f32_reference(got, x, w, cot, ref)


@needs_onednn
def test_conv_transpose_under_a_data_mesh_matches_lax():
  """Per-shard transposed convs under an 8-device data mesh: the weight gradient is psummed."""
  mesh = sharding.make_mesh(8)
  x_shape, w_shape, strides, padding = TRANSPOSE_CASES["unet_3x3_s2_same"]
  x_shape = (8, *x_shape[1:])
  x = jax.device_put(_normal(0, x_shape), sharding.batch_sharding(mesh))
  w = _normal(1, w_shape)
  ref = functools.partial(_ref_conv_t, strides=strides, padding=padding)
  cot = jax.device_put(_normal(2, jax.eval_shape(ref, x, w).shape), sharding.batch_sharding(mesh))
  mine = _onednn_conv_t(strides, padding, axis_name=sharding.DATA_AXIS)
  got = sharding.under_mesh(mesh, jax.jit(functools.partial(_fwd_and_grads, mine)))(x, w, cot)
  want = jax.jit(functools.partial(_fwd_and_grads, ref))(x, w, cot)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert _rel_err(g, r) <= 1e-5, (name, _rel_err(g, r))


TRANSPOSE_FALLBACKS = {
  "transpose_kernel": dict(strides=(2, 2), padding="SAME", transpose_kernel=True),
  "unequal_strides": dict(strides=(2, 1), padding="SAME"),
  "explicit_padding": dict(strides=(2, 2), padding=((2, 1), (2, 1))),
  # lax pads the dilated input by more than k - 1 at the end: no oneDNN crop equals it
  "same_stride_above_kernel": dict(strides=(4, 4), padding="SAME"),
  "rhs_dilation_2": dict(strides=(2, 2), padding="SAME", rhs_dilation=(2, 2)),
  "preferred_element_type": dict(
    strides=(2, 2), padding="SAME", preferred_element_type=jnp.float32
  ),
}


@needs_onednn
@pytest.mark.parametrize("kwargs", TRANSPOSE_FALLBACKS.values(), ids=TRANSPOSE_FALLBACKS.keys())
def test_conv_transpose_falls_back_to_lax(kwargs):
  """What the oneDNN path does not take goes to `lax.conv_transpose` unchanged (bitwise)."""
  # transpose_kernel=True reads the kernel as (KH, KW, Co, Ci)
  w_shape = (3, 3, 4, 3) if kwargs.get("transpose_kernel") else (3, 3, 3, 4)
  x, w = _normal(0, (2, 5, 4, 3)), _normal(1, w_shape)
  mine = lambda a, b: conv.conv_transpose("onednn")(a, b, dimension_numbers=NHWC, **kwargs)
  assert not _uses_onednn(mine, x, w, op="deconv")
  xla = lambda a, b: lax.conv_transpose(a, b, dimension_numbers=NHWC, **kwargs)
  np.testing.assert_array_equal(jax.jit(mine)(x, w), jax.jit(xla)(x, w))


def test_cpu_flags_parse_proc_cpuinfo():
  text = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nbogomips\t: 4000\n"
  assert library.cpu_flags(text) == {"fpu", "sse2", "avx", "avx2", "fma"}
  assert library.cpu_flags("processor\t: 0\n") is None


@needs_onednn
def test_library_built_for_another_cpu_is_refused():
  """The library is compiled with -march=native: it names the extensions it may use, and a CPU
  lacking one is detected before any handler runs (else: SIGILL). This machine has them all."""
  lib = library.load()
  assert library.missing_isa(lib) == []  # pylint: disable=protected-access
  built = lib.tvunet_build_isa().decode().split()
  if not built:
    pytest.skip("built for a CPU without the extensions the check lists")
  assert library.missing_isa(lib, flags={"sse2"}) == built  # pylint: disable=protected-access
  assert library.missing_isa(lib, flags=set(built)) == []  # pylint: disable=protected-access
