"""Which convolution the U-Net runs: oneDNN through the XLA FFI on CPU, XLA's own elsewhere.

XLA:CPU's convolutions, above all their weight gradients, are several times slower than oneDNN's
(measured in `experiments/README.md`), so on CPU the U-Net's convolutions can call oneDNN primitives
(`onednn_conv.cc`, built by `python -m tvunet_jax.kernels.build`) as XLA custom calls. This module
owns that choice and the JAX side of the kernels:

* `ConvOps`: the convolutions one model runs, a frozen value chosen once when the model is built
  (`choose(backend, axis_name=...)`): `ops.conv` is a drop-in for `lax.conv_general_dilated`
  (what `flax.linen.Conv(conv_general_dilated=...)` takes), `ops.conv_transpose` one for
  `lax.conv_transpose`, `ops.fuse_skip` whether an up block takes its skip pair unconcatenated.
  `conv_general_dilated(backend)` and `conv_transpose(backend)` return the same drop-ins.
  Backends:
  - 'xla': always `lax.conv_general_dilated`.
  - 'onednn': the oneDNN kernels for every stride-1, undilated, ungrouped NHWC/HWIO conv (all of
    the U-Net's); anything else, or a missing library, falls back to XLA (one log line).
  - 'auto' (default): 'onednn' when JAX's default backend is CPU and the library loads, else
    'xla' (TPU and GPU always run XLA's convolutions).
  The environment variable TVUNET_CONV_BACKEND (xla / onednn / auto) overrides the config; both
  are read in one place, `resolve`, which `choose` calls when the model is built, so nothing
  reads them again while a function is traced.
  Parameters and checkpoints are the same under every backend; results agree to float32
  rounding (tests/test_kernels.py).
* `conv_transpose(backend)`: the same for `lax.conv_transpose` (flax's convention): on 'onednn'
  a 2D transposed conv with equal strides and 'SAME'/'VALID' padding runs as oneDNN's own
  transposed convolution (`onednn_conv_transpose`: the kernel flipped, the padding converted),
  which the U-Net's up-sampling uses instead of its sub-pixel form on oneDNN (9 multiply taps per
  output 2x2 block instead of 16, and no depth-to-space).
* `onednn_conv(x, w, pads)`: the kernels under a `jax.custom_vjp` (forward, input gradient, weight
  gradient, each one oneDNN primitive); `onednn_conv_transpose(x, w, stride, pads)` likewise.
* `winograd_conv(x, w)`: a 3x3 'SAME' float32 convolution by Winograd's F(4x4, 3x3) algorithm
  (`winograd.cc`: 36 products per 4x4 output tile instead of 144, in the forward pass and both
  gradients). On 'onednn' the drop-in runs the convolutions `use_winograd` picks this way, those
  where it measured faster than oneDNN's direct kernel; the environment variable TVUNET_WINOGRAD
  (auto / off / all) changes the choice and, like TVUNET_CONV_BACKEND, is read by `choose` into
  the `ConvOps` (`ConvOps.winograd`). Its results differ from the direct convolution's by float32
  rounding (about 1e-5 relative instead of 1e-6, tests/test_winograd.py).
  bfloat16 runs natively where oneDNN has bf16 kernels (AVX-512 and AMX); elsewhere (AVX2) both
  compute it in float32 and round, since oneDNN 3.2 has no bf16 convolution there.
* Sharding. A custom call is opaque to XLA's SPMD partitioner, which would gather the whole batch
  onto one device to run it. Given the name of the mesh axis the batch is split along
  (`axis_name`: the caller's, e.g. `tvunet_jax.sharding.DATA_AXIS`; this package imports nothing
  of the project), when the context mesh has that axis (`jax.set_mesh(mesh)`, as `train.py`,
  `predict.py` and `evaluate.py` do around their jitted steps) each kernel runs under
  `jax.shard_map` on the local rows of the batch, and the weight gradient is summed over the axis.
  Without an axis name the kernels run unsplit (correct, but the batch is gathered).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from tvunet_jax.kernels import build as _build

BACKENDS = ("auto", "onednn", "xla")
ENV_BACKEND = "TVUNET_CONV_BACKEND"
ENV_LIBRARY = "TVUNET_ONEDNN_LIB"  # a library built elsewhere; default: next to this file
# op -> FFI target: 0-2 conv forward / input grad / weight grad, 3-5 the same, transposed
TARGETS = {
  0: "tvunet_onednn_conv_fwd",
  1: "tvunet_onednn_conv_bwd_data",
  2: "tvunet_onednn_conv_bwd_weights",
  3: "tvunet_onednn_deconv_fwd",
  4: "tvunet_onednn_deconv_bwd_data",
  5: "tvunet_onednn_deconv_bwd_weights",
}
WINOGRAD_TARGETS = ("tvunet_winograd_conv", "tvunet_winograd_wgrad")  # winograd.cc
ENV_WINOGRAD = "TVUNET_WINOGRAD"  # auto (default) / off / all: see `use_winograd`
WINOGRAD_MODES = ("auto", "off", "all")
# `use_winograd`'s 'auto' thresholds (measured: experiments/README.md, per-layer table).
WINOGRAD_MIN_WORK = 40  # Ci*Co / (Ci + Co): GEMM work per tile over transform traffic per tile
WINOGRAD_MIN_TILES = 32  # 4x4 tiles per device per call, to amortise the weight transform
_NHWC = ("NHWC", "HWIO", "NHWC")

_state: dict[str, Any] = {}
_warned: set[str] = set()


def _log_once(msg: str) -> None:
  if msg not in _warned:
    _warned.add(msg)
    logging.warning("%s", msg)


def library_path() -> str:
  """Where the kernel library is looked for: $TVUNET_ONEDNN_LIB, else next to this file."""
  return os.environ.get(ENV_LIBRARY) or _build.LIBRARY


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
  """This CPU's feature flags from /proc/cpuinfo (or the given text); None where unreadable."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return None
  for line in cpuinfo.splitlines():
    if line.startswith("flags"):
      return set(line.split(":", 1)[1].split())
  return None


def _missing_isa(lib: ctypes.CDLL, flags: set[str] | None = None) -> list[str]:
  """The extensions the library was compiled for (`-march=native` on the machine that built it)
  that this CPU lacks; [] when none are, or when the CPU's flags cannot be read."""
  lib.tvunet_build_isa.restype = ctypes.c_char_p
  built = lib.tvunet_build_isa().decode().split()
  flags = cpu_flags() if flags is None else flags
  return [] if flags is None else [f for f in built if f not in flags]


def load() -> ctypes.CDLL | None:
  """Loads the kernel library and registers its FFI targets once; None if it is unavailable."""
  if "lib" not in _state:
    path, lib = library_path(), None
    if not os.path.exists(path):
      _state["why"] = (
        f'{path} not built (pip install -e ".[onednn]" && python -m tvunet_jax.kernels.build)'
      )
    else:
      try:
        lib = ctypes.CDLL(path)
        missing = _missing_isa(lib)
        if missing:
          raise OSError(f"it was built for a CPU with {', '.join(missing)}, which this one lacks")
        for name in (*TARGETS.values(), *WINOGRAD_TARGETS):
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        lib.tvunet_onednn_impl.argtypes = (
          [ctypes.c_int] * 2 + [ctypes.c_int64] * 12 + [ctypes.c_char_p, ctypes.c_int]
        )
      except (OSError, AttributeError) as e:  # libdnnl.so.3 moved, a library older than
        # this source (a missing handler symbol), or one built on a CPU with more extensions
        _state["why"], lib = (
          (f"{path} does not load ({e}); rebuild it: python -m tvunet_jax.kernels.build"),
          None,
        )
    _state["lib"] = lib
  return _state["lib"]


def available() -> bool:
  """Whether the kernel library loads (and its FFI targets are registered)."""
  return load() is not None


def onednn_version() -> str | None:
  """oneDNN's version ('3.2.0'), or None without the library."""
  lib = load()
  if lib is None:
    return None
  buf = ctypes.create_string_buffer(64)
  lib.tvunet_onednn_version(buf, 64)
  return buf.value.decode()


def impl_info(
  op: int,
  dtype: Any,
  x_shape: Sequence[int],
  w_shape: Sequence[int],
  pads: Sequence[int],
  stride: int = 1,
) -> str:
  """oneDNN's kernel for one op (0-2 conv, 3-5 transposed conv), e.g. 'jit:avx2'.

  Args:
    op: 0, 1 or 2 for a stride-1 convolution; 3, 4, 5 for the same of oneDNN's transposed
      convolution (see `onednn_conv_transpose`).
    dtype: float32 or bfloat16 (activations).
    x_shape: (N, H, W, Ci); w_shape: (KH, KW, Ci, Co).
    pads: (top, bottom, left, right), oneDNN's.
    stride: the transposed convolution's stride (1 for ops 0-2).

  Raises RuntimeError when the library is missing or oneDNN has no kernel for the case.
  """
  lib = load()
  if lib is None:
    raise RuntimeError(_state["why"])
  n, h, w, ci = x_shape
  kh, kw, _, co = w_shape
  buf = ctypes.create_string_buffer(256)
  bf16 = int(jnp.dtype(dtype) == jnp.bfloat16)
  rc = lib.tvunet_onednn_impl(op, bf16, n, h, w, ci, kh, kw, co, *pads, stride, buf, 256)
  if rc != 0:
    raise RuntimeError(f"oneDNN: {buf.value.decode()}")
  return buf.value.decode()


@functools.cache
def native_bf16() -> bool:
  """Whether oneDNN has optimised bf16 convolutions on this CPU (not its reference loop)."""
  if not available():
    return False
  try:  # on AVX2 oneDNN 3.2 has no bf16 convolution at all and the primitive is refused
    return not impl_info(0, jnp.bfloat16, (1, 8, 8, 16), (3, 3, 16, 16), (1, 1, 1, 1)).startswith(
      "ref"
    )
  except RuntimeError:
    return False


def resolve(backend: str | ConvOps) -> str:
  """'onednn' or 'xla' for a configured backend, after TVUNET_CONV_BACKEND and availability.

  The one place that reads the variable; `choose` calls it when a model is built. A `ConvOps`
  is already resolved: its backend is returned as it is (the variable is not read again).
  """
  if isinstance(backend, ConvOps):
    return backend.backend
  backend = os.environ.get(ENV_BACKEND) or backend
  if backend not in BACKENDS:
    raise ValueError(
      f"conv backend must be one of {BACKENDS}, got {backend!r} "
      f"(config model.conv_backend or ${ENV_BACKEND})"
    )
  if backend == "xla" or jax.default_backend() != "cpu":
    return "xla"
  if not available():
    if backend == "onednn":
      _log_once(f"oneDNN convolutions unavailable, using XLA's: {_state['why']}")
    return "xla"
  return "onednn"


# --- the kernels ---------------------------------------------------------------------------------


def _ffi(
  target: str, a: jax.Array, b: jax.Array, out_shape: tuple[int, ...], out_dtype: Any, **attrs: Any
) -> jax.Array:
  """One custom call of the library on (a, b)."""
  if load() is None:
    raise RuntimeError(f"oneDNN convolutions unavailable: {_state['why']}")
  # vmap runs the kernel once per mapped element (it takes rank-4 operands only).
  return jax.ffi.ffi_call(
    target, jax.ShapeDtypeStruct(out_shape, out_dtype), vmap_method="sequential"
  )(a, b, **attrs)


def _call(
  op: int,
  a: jax.Array,
  b: jax.Array,
  out_shape: tuple[int, ...],
  out_dtype: Any,
  pads: tuple[int, int, int, int],
  stride: int | None = None,
) -> jax.Array:
  top, bottom, left, right = pads
  attrs = dict(
    top=np.int64(top), bottom=np.int64(bottom), left=np.int64(left), right=np.int64(right)
  )
  if stride is not None:  # the transposed convolution's targets (ops 3-5) take a stride
    attrs["stride"] = np.int64(stride)
  return _ffi(TARGETS[op], a, b, out_shape, out_dtype, **attrs)


def _data_mesh(batch: int, axis_name: str | None) -> Any:
  """The context mesh if it splits `axis_name` (dividing `batch`) over several devices."""
  if axis_name is None:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis_name not in mesh.axis_names or mesh.shape[axis_name] == 1:
    return None
  # A batch the axis does not divide (e.g. `init` on one example) is not split: XLA then runs
  # the call on every device, which is correct and only ever happens on tiny inputs.
  return mesh if batch % mesh.shape[axis_name] == 0 else None


def _out_hw(x_hw, w_shape, pads, stride):
  (h, w), (kh, kw) = x_hw, w_shape[:2]
  if stride is None:  # stride-1 convolution
    return h + pads[0] + pads[1] - kh + 1, w + pads[2] + pads[3] - kw + 1
  return (h - 1) * stride - pads[0] - pads[1] + kh, (w - 1) * stride - pads[2] - pads[3] + kw


# `stride` None: the stride-1 convolution (ops 0-2); an int: oneDNN's transposed convolution of
# that stride (ops 3-5).
def _fwd_local(x, w, pads, stride=None):
  out = (x.shape[0], *_out_hw(x.shape[1:3], w.shape, pads, stride), w.shape[3])
  return _call(0 if stride is None else 3, x, w, out, x.dtype, pads, stride)


def _bwd_data_local(dy, w, x_hw, pads, stride=None):
  return _call(
    1 if stride is None else 4, dy, w, (dy.shape[0], *x_hw, w.shape[2]), dy.dtype, pads, stride
  )


def _bwd_weights_local(x, dy, w_shape, pads, stride=None):
  return _call(2 if stride is None else 5, x, dy, w_shape, jnp.float32, pads, stride)


def onednn_ops(
  x: jax.Array,
  w: jax.Array,
  dy: jax.Array,
  pads: tuple[int, int, int, int],
  stride: int | None = None,
) -> dict[str, tuple[Callable[..., jax.Array], tuple[jax.Array, ...]]]:
  """The three kernels alone, for timing: name -> (function, its array arguments).

  x: (N, H, W, Ci), w: (KH, KW, Ci, Co), dy: the forward output's shape, all one float dtype;
  pads (top, bottom, left, right); stride None for the stride-1 convolution, else the transposed
  convolution of that stride with oneDNN's pads (see `onednn_conv_transpose`). Jit each function
  and call it on its arguments.
  """
  return {
    "forward": (lambda x, w: _fwd_local(x, w, pads, stride), (x, w)),
    "input_grad": (lambda dy, w: _bwd_data_local(dy, w, x.shape[1:3], pads, stride), (dy, w)),
    "weight_grad": (lambda x, dy: _bwd_weights_local(x, dy, w.shape, pads, stride), (x, dy)),
  }


class _Kernels(NamedTuple):
  """One convolution's three per-device kernels (each on the local rows of the batch)."""

  fwd: Callable[[jax.Array, jax.Array], jax.Array]  # (x, w) -> y
  bwd_data: Callable[[jax.Array, jax.Array], jax.Array]  # (dy, w) -> dx
  bwd_weights: Callable[[jax.Array, jax.Array], jax.Array]  # (x, dy) -> dw, float32


@functools.cache  # the same object per shape: custom_vjp's trace cache then hits across layers
def _direct(
  x_hw: tuple[int, int],
  w_shape: tuple[int, ...],
  pads: tuple[int, int, int, int],
  stride: int | None,
) -> _Kernels:
  """oneDNN's direct convolution (stride None) or transposed convolution (int stride)."""
  return _Kernels(
    functools.partial(_fwd_local, pads=pads, stride=stride),
    functools.partial(_bwd_data_local, x_hw=x_hw, pads=pads, stride=stride),
    functools.partial(_bwd_weights_local, w_shape=w_shape, pads=pads, stride=stride),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sharded(x, w, kernels: _Kernels, axis_name: str | None):
  mesh = _data_mesh(x.shape[0], axis_name)
  if mesh is None:
    return kernels.fwd(x, w)
  return jax.shard_map(
    kernels.fwd, mesh=mesh, in_specs=(P(axis_name), P()), out_specs=P(axis_name), check_vma=False
  )(x, w)


def _sharded_fwd(x, w, kernels, axis_name):
  return _sharded(x, w, kernels, axis_name), (x, w)


def _sharded_bwd(kernels, axis_name, res, g):
  x, w = res
  mesh = _data_mesh(x.shape[0], axis_name)
  if mesh is None:
    dx, dw = kernels.bwd_data(g, w), kernels.bwd_weights(x, g)
  else:
    dx = jax.shard_map(
      kernels.bwd_data,
      mesh=mesh,
      in_specs=(P(axis_name), P()),
      out_specs=P(axis_name),
      check_vma=False,
    )(g, w)
    dw = jax.shard_map(
      lambda a, b: lax.psum(kernels.bwd_weights(a, b), axis_name),
      mesh=mesh,
      in_specs=(P(axis_name), P(axis_name)),
      out_specs=P(),
      check_vma=False,
    )(x, g)
  return dx, dw.astype(w.dtype)


_sharded.defvjp(_sharded_fwd, _sharded_bwd)


def _onednn(x, w, pads, stride, axis_name):
  return _sharded(x, w, _direct(x.shape[1:3], w.shape, pads, stride), axis_name)


def _onednn_any_bf16(x, w, pads, stride, axis_name):
  """`_onednn`, with bfloat16 computed in float32 and rounded where oneDNN has no bf16 kernels
  (AVX2: oneDNN 3.2 refuses the primitive)."""
  if x.dtype == jnp.bfloat16 and not native_bf16():
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    return _onednn(x32, w32, pads, stride, axis_name).astype(x.dtype)
  return _onednn(x, w, pads, stride, axis_name)


def onednn_conv(
  x: jax.Array, w: jax.Array, pads: tuple[int, int, int, int], *, axis_name: str | None = None
) -> jax.Array:
  """`lax.conv_general_dilated(x, w, (1, 1), [(top, bottom), (left, right)], ('NHWC', 'HWIO',
  'NHWC'))` by oneDNN.

  Reverse-mode only (a `custom_vjp`: `jax.grad`/`vjp` work, `jax.jvp`/`jacfwd` do not).

  Args:
    x: (N, H, W, Ci) float32 or bfloat16 (native bf16 kernels where `native_bf16()`, else computed
      in float32 and rounded).
    w: (KH, KW, Ci, Co), x's dtype.
    pads: (top, bottom, left, right) zero padding, non-negative Python ints.
    axis_name: the mesh axis the batch is split along: under a context mesh with that axis the
      kernels run per shard (module docstring); None runs them on the whole batch.

  Returns:
    (N, H + top + bottom - KH + 1, W + left + right - KW + 1, Co) in x's dtype.
  """
  return _onednn_any_bf16(x, w, tuple(pads), None, axis_name)


def onednn_conv_transpose(
  x: jax.Array,
  w: jax.Array,
  stride: int,
  pads: tuple[int, int, int, int],
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """oneDNN's transposed convolution ("deconvolution") of `stride`, in oneDNN's convention.

  out[s * i - top + k] += x[i] w[k] (per spatial axis, summed over input channels): the input
  gradient of a stride-s convolution with kernel w. `lax.conv_transpose` (flax's convention, no
  kernel flip) is this with the kernel flipped spatially and pads (KH - 1 - lo, KH - 1 - hi);
  `conv_transpose` below does that conversion. Reverse-mode only, like `onednn_conv`.

  Args:
    x: (N, H, W, Ci) float32 or bfloat16 (as `onednn_conv`).
    w: (KH, KW, Ci, Co), x's dtype.
    stride: the up-sampling factor, a Python int >= 1.
    pads: (top, bottom, left, right), non-negative Python ints, cropped from the full output.
    axis_name: as `onednn_conv`.

  Returns:
    (N, (H - 1) * stride - top - bottom + KH, (W - 1) * stride - left - right + KW, Co), x's
    dtype.
  """
  return _onednn_any_bf16(x, w, tuple(pads), int(stride), axis_name)


# --- Winograd F(4x4, 3x3) (winograd.cc) ----------------------------------------------------------

_WINOGRAD = _Kernels(
  fwd=lambda x, w: _ffi(
    WINOGRAD_TARGETS[0], x, w, (*x.shape[:3], w.shape[3]), jnp.float32, transposed=np.int64(0)
  ),
  bwd_data=lambda dy, w: _ffi(
    WINOGRAD_TARGETS[0], dy, w, (*dy.shape[:3], w.shape[2]), jnp.float32, transposed=np.int64(1)
  ),
  bwd_weights=lambda x, dy: _ffi(
    WINOGRAD_TARGETS[1], x, dy, (3, 3, x.shape[3], dy.shape[3]), jnp.float32
  ),
)


def winograd_ops(
  x: jax.Array, w: jax.Array, dy: jax.Array
) -> dict[str, tuple[Callable[..., jax.Array], tuple[jax.Array, ...]]]:
  """The three Winograd kernels alone, for timing, as `onednn_ops` (3x3 'SAME', float32)."""
  return {
    "forward": (_WINOGRAD.fwd, (x, w)),
    "input_grad": (_WINOGRAD.bwd_data, (dy, w)),
    "weight_grad": (_WINOGRAD.bwd_weights, (x, dy)),
  }


def winograd_conv(x: jax.Array, w: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """`lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`
  for a 3x3 kernel by Winograd's F(4x4, 3x3) algorithm (`winograd.cc`).

  36 multiplications per 4x4 output tile and channel pair instead of 144, for the forward pass
  and both gradients; the results differ from the direct convolution by float32 rounding
  (relative error about 1e-5, tested). Reverse-mode only, like `onednn_conv`, and sharded the same
  way under a context mesh with the axis `axis_name`.

  Args:
    x: (N, H, W, Ci) float32, any H, W >= 1.
    w: (3, 3, Ci, Co) float32.
    axis_name: as `onednn_conv`.

  Returns:
    (N, H, W, Co) float32.
  """
  if x.dtype != jnp.float32 or w.dtype != jnp.float32 or w.shape[:2] != (3, 3):
    raise ValueError(
      f"winograd_conv takes float32 x and a (3, 3, Ci, Co) kernel, got "
      f"{x.dtype} {x.shape} and {w.dtype} {w.shape}"
    )
  return _sharded(x, w, _WINOGRAD, axis_name)


def winograd_mode() -> str:
  """$TVUNET_WINOGRAD: 'auto' (default), 'off' or 'all'."""
  mode = os.environ.get(ENV_WINOGRAD) or "auto"
  if mode not in WINOGRAD_MODES:
    raise ValueError(f"${ENV_WINOGRAD} must be one of {WINOGRAD_MODES}, got {mode!r}")
  return mode


def use_winograd(
  x_shape: Sequence[int],
  w_shape: Sequence[int],
  dtype: Any,
  pads: Sequence[int],
  local_batch: int | None = None,
  mode: str | None = None,
) -> bool:
  """Whether the oneDNN backend runs this convolution by `winograd_conv`.

  Only 3x3, pad-1, float32 convolutions qualify: bfloat16 keeps oneDNN's direct kernels, which
  use bf16 arithmetic where the CPU has it (AVX-512 bf16, AMX), and the F(4x4, 3x3) transforms'
  coefficients (up to 8 in A^T, 5 in B^T) would cost bf16 too many bits. Under $TVUNET_WINOGRAD
  'all' every qualifying convolution runs Winograd, under 'off' none; under 'auto' (the default)
  those where it measured faster than the direct kernel, forward and backward (the benchmark's
  per-layer table, experiments/README.md): Ci * Co / (Ci + Co) >= WINOGRAD_MIN_WORK, i.e. enough
  GEMM work per tile for the transforms' memory traffic (which grows with Ci + Co), and at least
  WINOGRAD_MIN_TILES 4x4 tiles per device, to amortise the weight transform (which does not shrink
  with the batch). For the paper model at batch 8 on one device that is every 3x3 conv but the
  first (1 -> 64 channels) and the 64 -> 64 ones of the 128x128 level, whose transforms cost as
  much as the multiplications saved. Split over devices, fewer tiles per device qualify.

  Args:
    x_shape: (N, H, W, Ci); w_shape: (KH, KW, Ci, Co); dtype: the activations' dtype.
    pads: (top, bottom, left, right).
    local_batch: rows per device (default N).
    mode: 'auto', 'off' or 'all' (a `ConvOps`'s); default $TVUNET_WINOGRAD (`winograd_mode`).
  """
  mode = winograd_mode() if mode is None else mode
  if (
    mode == "off"
    or tuple(w_shape[:2]) != (3, 3)
    or tuple(pads) != (1, 1, 1, 1)
    or jnp.dtype(dtype) != jnp.float32
  ):
    return False
  if mode == "all":
    return True
  n, h, w = local_batch or x_shape[0], x_shape[1], x_shape[2]
  tiles = n * -(-h // 4) * -(-w // 4)
  ci, co = w_shape[2], w_shape[3]
  return ci * co >= WINOGRAD_MIN_WORK * (ci + co) and tiles >= WINOGRAD_MIN_TILES


# --- the drop-ins for lax.conv_general_dilated and lax.conv_transpose ----------------------------


def _explicit_pads(padding: Any, x_shape, w_shape) -> tuple[int, int, int, int] | None:
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], (1, 1), padding)
  (top, bottom), (left, right) = [tuple(int(v) for v in p) for p in padding]
  pads = (top, bottom, left, right)
  return pads if min(pads) >= 0 else None


def _supported(
  lhs,
  rhs,
  window_strides,
  lhs_dilation,
  rhs_dilation,
  dimension_numbers,
  feature_group_count,
  batch_group_count,
) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4 or tuple(window_strides) != (1, 1):
    return False
  if any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
    return False
  if feature_group_count != 1 or batch_group_count != 1:
    return False
  if lhs.dtype not in (jnp.float32, jnp.bfloat16) or rhs.dtype != lhs.dtype:
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


def onednn_transpose_pads(
  padding: Any, k_hw: Sequence[int], stride: int
) -> tuple[int, int, int, int] | None:
  """oneDNN's (top, bottom, left, right) for `lax.conv_transpose`'s `padding`, or None.

  `lax.conv_transpose` pads the stride-dilated input by (lo, hi) per axis (computed from a string
  as `jax.lax` does) and correlates with the kernel; oneDNN's transposed convolution with the
  flipped kernel crops (k - 1 - lo, k - 1 - hi) from its full output, which is the same sum.
  """
  pairs = []
  for k in k_hw:
    if padding == "SAME":
      pad_len = k + stride - 2
      lo = k - 1 if stride > k - 1 else -(-pad_len // 2)
    elif padding == "VALID":
      pad_len = k + stride - 2 + max(k - stride, 0)
      lo = k - 1
    else:
      return None
    pairs.append((lo, pad_len - lo))
  (top, bottom), (left, right) = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(k_hw, pairs)]
  pads = (top, bottom, left, right)
  return pads if min(pads) >= 0 else None


def transpose_supported(dtype: Any) -> bool:
  """Whether the oneDNN transposed convolution takes activations of `dtype`."""
  return jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class ConvOps:
  """The convolutions one model runs, chosen once when it is built (`choose`).

  A frozen value of strings, so it is hashable and compares by value: a flax module can hold it
  as a field, and two models built alike are equal (jit's cache keys on them).

  Attributes:
    backend: 'onednn' or 'xla', already resolved (never 'auto'; `choose` resolves).
    axis_name: the mesh axis the batch is split along; under a context mesh with that axis the
      oneDNN kernels run per shard (module docstring). None: they run on the whole batch.
    winograd: which 3x3 convs the oneDNN backend runs by Winograd, 'auto', 'off' or 'all'
      (`use_winograd`; `choose` reads $TVUNET_WINOGRAD).
  """

  backend: str
  axis_name: str | None = None
  winograd: str = "auto"

  def __post_init__(self) -> None:
    if self.backend not in ("onednn", "xla"):
      raise ValueError(
        f"ConvOps: backend must be 'onednn' or 'xla' (resolved), got "
        f"{self.backend!r}; `choose` resolves {BACKENDS}"
      )
    if self.winograd not in WINOGRAD_MODES:
      raise ValueError(f"ConvOps: winograd must be one of {WINOGRAD_MODES}, got {self.winograd!r}")

  @property
  def fuse_skip(self) -> bool:
    """Whether an up block's first conv takes the pair [upsampled, skip] without concatenating
    it (one conv per half, summed): on oneDNN, where that saves writing the concatenation."""
    return self.backend == "onednn"

  def native_transpose(self, dtype: Any) -> bool:
    """Whether a 3x3 stride-2 up-sampling in `dtype` runs as `conv_transpose` (one oneDNN
    transposed-convolution primitive) rather than as a sub-pixel 2x2 conv through `conv`."""
    return self.backend == "onednn" and transpose_supported(dtype)

  def conv(
    self,
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ) -> jax.Array:
    """`lax.conv_general_dilated` on this backend (what `flax.linen.Conv(conv_general_dilated=)`
    takes): on 'onednn' every stride-1, undilated, ungrouped NHWC/HWIO float32/bfloat16 conv runs
    the oneDNN kernels (or Winograd where `use_winograd` says); anything else runs XLA's."""
    pads = None
    if (
      self.backend == "onednn"
      and preferred_element_type is None
      and _supported(
        lhs,
        rhs,
        window_strides,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
      )
    ):
      pads = _explicit_pads(padding, lhs.shape, rhs.shape)
    if pads is None:
      return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
      )
    # `precision` does not apply: oneDNN computes float32 in float32 and bf16 with f32 sums.
    mesh = _data_mesh(lhs.shape[0], self.axis_name)
    local = lhs.shape[0] // (mesh.shape[self.axis_name] if mesh is not None else 1)
    if use_winograd(lhs.shape, rhs.shape, lhs.dtype, pads, local, self.winograd):
      return winograd_conv(lhs, rhs, axis_name=self.axis_name)
    return onednn_conv(lhs, rhs, pads, axis_name=self.axis_name)

  def conv_transpose(
    self,
    lhs,
    rhs,
    strides,
    padding,
    rhs_dilation=None,
    dimension_numbers=None,
    transpose_kernel=False,
    precision=None,
    preferred_element_type=None,
    use_consistent_padding=False,
  ) -> jax.Array:
    """`lax.conv_transpose` (flax's convention: the kernel is not flipped) on this backend.

    Shapes as `lax.conv_transpose`: lhs (N, H, W, Ci), rhs (KH, KW, Ci, Co) with the default or
    NHWC/HWIO dimension numbers. On 'onednn' a 2D float32/bfloat16 transposed conv with equal
    strides and 'SAME' or 'VALID' padding is one oneDNN primitive per pass
    (`onednn_conv_transpose` on the spatially flipped kernel); anything else runs XLA's.
    """
    pads = None
    strides = tuple(strides)
    # lax.conv_transpose reads dimension_numbers=None as NHWC / HWIO for 2D
    dn = _NHWC if dimension_numbers is None and lhs.ndim == 4 else dimension_numbers
    if (
      self.backend == "onednn"
      and not transpose_kernel
      and preferred_element_type is None
      and not use_consistent_padding
      and lhs.ndim == 4
      and rhs.ndim == 4
      and len(set(strides)) == 1
      and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
      and transpose_supported(lhs.dtype)
      and rhs.dtype == lhs.dtype
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    ):
      pads = onednn_transpose_pads(padding, rhs.shape[:2], strides[0])
    if pads is None:
      return lax.conv_transpose(
        lhs,
        rhs,
        strides,
        padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        transpose_kernel=transpose_kernel,
        precision=precision,
        preferred_element_type=preferred_element_type,
        use_consistent_padding=use_consistent_padding,
      )
    return onednn_conv_transpose(lhs, rhs[::-1, ::-1], strides[0], pads, axis_name=self.axis_name)


XLA = ConvOps("xla")  # XLA's own convolutions: portable, the layers' default


def choose(backend: str = "auto", *, axis_name: str | None = None) -> ConvOps:
  """The `ConvOps` for a configured backend ('auto', 'onednn', 'xla'; TVUNET_CONV_BACKEND
  overrides it, through `resolve`), with the batch's mesh axis `axis_name`; on oneDNN with
  $TVUNET_WINOGRAD's mode. The environment is read here, not when the convolutions are traced."""
  backend = resolve(backend)
  return ConvOps(backend, axis_name, winograd_mode() if backend == "onednn" else "auto")


def conv_general_dilated(
  backend: str = "auto", *, axis_name: str | None = None
) -> Callable[..., jax.Array]:
  """`choose(backend, axis_name=axis_name).conv`: a drop-in for `lax.conv_general_dilated`.

  The backend is resolved when this is called (not when the returned function is traced).
  """
  return choose(backend, axis_name=axis_name).conv


def conv_transpose(
  backend: str = "auto", *, axis_name: str | None = None
) -> Callable[..., jax.Array]:
  """`choose(backend, axis_name=axis_name).conv_transpose`: a drop-in for `lax.conv_transpose`
  (flax's convention), resolved when this is called."""
  return choose(backend, axis_name=axis_name).conv_transpose
