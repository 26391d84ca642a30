"""The oneDNN/Winograd kernel library: loading it, registering its FFI targets, asking it.

`onednn_conv.cc` and `winograd.cc`, built by `python -m tvunet_jax.kernels.build` into one shared
library (next to this file, or $TVUNET_ONEDNN_LIB), hold the XLA FFI handlers. This module loads
it once (refusing, with the reason in `why()`, a library built for a CPU with extensions this one
lacks), registers its targets for the CPU platform, and answers what the CPU and the library
are: `cpu_flags`, `cpu_model`, `usable_cores`, `onednn_version`, `impl_info` (the kernel oneDNN
dispatches for a shape), `native_bf16`. `ffi_call` is the one way the kernels are called.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tvunet_jax.kernels import build as _build

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

_state: dict[str, Any] = {}
_warned: set[str] = set()


def log_once(msg: str) -> None:
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


def missing_isa(lib: ctypes.CDLL, flags: set[str] | None = None) -> list[str]:
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
        missing = missing_isa(lib)
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


def ffi_call(
  target: str, a: jax.Array, b: jax.Array, out_shape: tuple[int, ...], out_dtype: Any, **attrs: Any
) -> jax.Array:
  """One custom call of the library's `target` on (a, b), output `out_shape` / `out_dtype`;
  `attrs` are the handler's attributes (numpy scalars). RuntimeError when the library is
  missing."""
  if load() is None:
    raise RuntimeError(f"oneDNN convolutions unavailable: {_state['why']}")
  # vmap runs the kernel once per mapped element (it takes rank-4 operands only).
  return jax.ffi.ffi_call(
    target, jax.ShapeDtypeStruct(out_shape, out_dtype), vmap_method="sequential"
  )(a, b, **attrs)


def why() -> str:
  """Why the library is unavailable ('' when it loads)."""
  load()
  return _state.get("why", "")


def cpu_model(cpuinfo: str | None = None) -> str:
  """The CPU's 'model name' from /proc/cpuinfo (or the given text); 'unknown' where unreadable."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return "unknown"
  for line in cpuinfo.splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def usable_cores() -> int:
  """Cores this process may run on (its affinity mask, not `os.cpu_count()`)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not Linux
    return os.cpu_count() or 1
