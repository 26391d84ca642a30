"""The kernel library's convolutions as JAX functions: custom calls under `custom_vjp`, sharded.

* `onednn_conv(x, w, pads)`: a stride-1 convolution by oneDNN (forward, input gradient, weight
  gradient: one primitive each); `onednn_conv_transpose(x, w, stride, pads)`: oneDNN's transposed
  convolution, likewise.
* `winograd_conv(x, w)`: a 3x3 'SAME' float32 convolution by Winograd's F(4x4, 3x3) algorithm
  (`winograd.cc`: 36 products per 4x4 output tile instead of 144, in all three passes; results
  differ from the direct convolution by float32 rounding, about 1e-5 relative).
* `chosen_kernels(x_hw, w_shape, choice)`: a 3x3 pad-1 conv's passes, each from oneDNN's direct
  kernel or Winograd's as `kernels.winograd.choose` decided; `sharded(x, w, kernels, axis)` runs
  them.
* `onednn_ops` / `winograd_ops`: the kernels alone, for timing (`tvunet_jax.tune`, the benchmark).

Sharding: a custom call is opaque to XLA's SPMD partitioner, which would gather the whole batch
onto one device to run it. Given the mesh axis the batch is split along (`axis_name`), when the
context mesh has that axis each kernel runs under `jax.shard_map` on the local rows, and the
weight gradient is summed over the axis. Without an axis name the kernels run unsplit.
All are reverse-mode only (`jax.grad`/`vjp` work, `jax.jvp`/`jacfwd` do not).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from tvunet_jax.kernels import library, winograd


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
  return library.ffi_call(library.TARGETS[op], a, b, out_shape, out_dtype, **attrs)


def data_mesh(batch: int, axis_name: str | None) -> Any:
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
def sharded(x, w, kernels: _Kernels, axis_name: str | None):
  mesh = data_mesh(x.shape[0], axis_name)
  if mesh is None:
    return kernels.fwd(x, w)
  return jax.shard_map(
    kernels.fwd, mesh=mesh, in_specs=(P(axis_name), P()), out_specs=P(axis_name), check_vma=False
  )(x, w)


def _sharded_fwd(x, w, kernels, axis_name):
  return sharded(x, w, kernels, axis_name), (x, w)


def _sharded_bwd(kernels, axis_name, res, g):
  x, w = res
  mesh = data_mesh(x.shape[0], axis_name)
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


sharded.defvjp(_sharded_fwd, _sharded_bwd)


def _onednn(x, w, pads, stride, axis_name):
  return sharded(x, w, _direct(x.shape[1:3], w.shape, pads, stride), axis_name)


def _onednn_any_bf16(x, w, pads, stride, axis_name):
  """`_onednn`, with bfloat16 computed in float32 and rounded where oneDNN has no bf16 kernels
  (AVX2: oneDNN 3.2 refuses the primitive)."""
  if x.dtype == jnp.bfloat16 and not library.native_bf16():
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
  fwd=lambda x, w: library.ffi_call(
    library.WINOGRAD_TARGETS[0],
    x,
    w,
    (*x.shape[:3], w.shape[3]),
    jnp.float32,
    transposed=np.int64(0),
  ),
  bwd_data=lambda dy, w: library.ffi_call(
    library.WINOGRAD_TARGETS[0],
    dy,
    w,
    (*dy.shape[:3], w.shape[2]),
    jnp.float32,
    transposed=np.int64(1),
  ),
  bwd_weights=lambda x, dy: library.ffi_call(
    library.WINOGRAD_TARGETS[1], x, dy, (3, 3, x.shape[3], dy.shape[3]), jnp.float32
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
  return sharded(x, w, _WINOGRAD, axis_name)


@functools.cache  # one object per (shape, choice), as `_direct`, for custom_vjp's trace cache
def chosen_kernels(
  x_hw: tuple[int, int], w_shape: tuple[int, ...], choice: winograd.Choice
) -> _Kernels:
  """The 3x3 pad-1 conv's direct oneDNN kernels with the passes `choice` flags (forward,
  input_grad, weight_grad) run by Winograd instead."""
  direct = _direct(x_hw, w_shape, (1, 1, 1, 1), None)
  return _Kernels(*(wk if c else dk for c, wk, dk in zip(choice, _WINOGRAD, direct)))
