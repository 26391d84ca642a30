"""Which convolution the U-Net runs: oneDNN through the XLA FFI on CPU, XLA's own elsewhere.

XLA:CPU's convolutions, above all their weight gradients, are several times slower than oneDNN's
(measured in `experiments/README.md`), so on CPU the U-Net's convolutions can call the kernel
library (`library.py`; the JAX functions in `custom_calls.py`). This module owns that choice:

* `ConvOps`: the convolutions one model runs, a frozen value chosen once when the model is built
  (`choose(backend, axis_name=...)`): `ops.conv` is a drop-in for `lax.conv_general_dilated`
  (what `flax.linen.Conv(conv_general_dilated=...)` takes), `ops.conv_transpose` one for
  `lax.conv_transpose` (flax's convention), `ops.fuse_skip` whether an up block takes its skip
  pair unconcatenated. `conv_general_dilated(backend)` and `conv_transpose(backend)` return the
  same drop-ins. Backends:
  - 'xla': always XLA's convolutions.
  - 'onednn': oneDNN for every stride-1, undilated, ungrouped NHWC/HWIO conv (all of the U-Net's)
    and for 2D transposed convs with equal strides and 'SAME'/'VALID' padding (the kernel flipped,
    the padding converted: 9 taps per output 2x2 block instead of the sub-pixel form's 16);
    anything else, or a missing library, falls back to XLA (one log line). A 3x3 float32 conv's
    passes run Winograd F(4x4, 3x3) where `kernels.winograd.choose` picks it: this machine's
    measured table (`machine_table`, filled by `python -m tvunet_jax.tune`), else a rule by ISA.
  - 'auto' (default): 'onednn' when JAX's default backend is CPU and the library loads, else
    'xla' (TPU and GPU always run XLA's convolutions).
  TVUNET_CONV_BACKEND (xla / onednn / auto) overrides the config and TVUNET_WINOGRAD (auto / off /
  all) sets the Winograd mode; both, and the table, are read in `choose` when the model is built,
  never while a function is traced. Parameters and checkpoints are the same under every backend;
  results agree to float32 rounding (tests/test_kernels.py, tests/test_winograd.py).
  bfloat16 runs natively where oneDNN has bf16 kernels (AVX-512 and AMX); elsewhere (AVX2) it is
  computed in float32 and rounded, since oneDNN 3.2 has no bf16 convolution there.
* Sharding: `axis_name` is the mesh axis the batch is split along (the caller's, e.g.
  `tvunet_jax.sharding.DATA_AXIS`; this package imports nothing of the project); under a context
  mesh with that axis (`jax.set_mesh`, as train, predict and evaluate do) the kernels run per
  shard (`custom_calls.py`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tvunet_jax.kernels import custom_calls, library, winograd

BACKENDS = ("auto", "onednn", "xla")
ENV_BACKEND = "TVUNET_CONV_BACKEND"
_NHWC = ("NHWC", "HWIO", "NHWC")


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
  if not library.available():
    if backend == "onednn":
      library.log_once(f"oneDNN convolutions unavailable, using XLA's: {library.why()}")
    return "xla"
  return "onednn"


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
      (`kernels.winograd.choose`; `choose` reads $TVUNET_WINOGRAD).
    winograd_table: this machine's measured choices, `winograd.decisions(...)` of the tuning
      table (`machine_table`); () without one.
    isa: `winograd.isa_level` of this CPU, for the fallback rule where the table has no entry.
  """

  backend: str
  axis_name: str | None = None
  winograd: str = "auto"
  winograd_table: tuple = ()
  isa: str = "other"

  def __post_init__(self) -> None:
    if self.backend not in ("onednn", "xla"):
      raise ValueError(
        f"ConvOps: backend must be 'onednn' or 'xla' (resolved), got "
        f"{self.backend!r}; `choose` resolves {BACKENDS}"
      )
    if self.winograd not in winograd.MODES:
      raise ValueError(f"ConvOps: winograd must be one of {winograd.MODES}, got {self.winograd!r}")

  def describe(self) -> str:
    """One line for logs: the backend and, on oneDNN, how the Winograd choice is made."""
    if self.backend != "onednn":
      return self.backend
    if self.winograd != "auto":
      return f"onednn, Winograd {self.winograd} (${winograd.ENV_MODE})"
    tuned = (
      f"a measured table of {len(self.winograd_table)} shapes, else " if self.winograd_table else ""
    )
    return f"onednn, Winograd by {tuned}the {self.isa} rule"

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
    the oneDNN kernels (Winograd's for the passes `kernels.winograd.choose` picks); anything else
    runs XLA's."""
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
    mesh = custom_calls.data_mesh(lhs.shape[0], self.axis_name)
    local = lhs.shape[0] // (mesh.shape[self.axis_name] if mesh is not None else 1)
    choice = winograd.choose(
      lhs.shape,
      rhs.shape,
      jnp.dtype(lhs.dtype).name,
      pads,
      local_batch=local,
      mode=self.winograd,
      table=self.winograd_table,
      isa=self.isa,
    )
    if any(choice):
      kernels = custom_calls.chosen_kernels(tuple(lhs.shape[1:3]), tuple(rhs.shape), choice)
      return custom_calls.sharded(lhs, rhs, kernels, self.axis_name)
    return custom_calls.onednn_conv(lhs, rhs, pads, axis_name=self.axis_name)

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
    return custom_calls.onednn_conv_transpose(
      lhs, rhs[::-1, ::-1], strides[0], pads, axis_name=self.axis_name
    )


XLA = ConvOps("xla")  # XLA's own convolutions: portable, the layers' default


def choose(backend: str = "auto", *, axis_name: str | None = None) -> ConvOps:
  """The `ConvOps` for a configured backend ('auto', 'onednn', 'xla'; TVUNET_CONV_BACKEND
  overrides it, through `resolve`), with the batch's mesh axis `axis_name`; on oneDNN with
  $TVUNET_WINOGRAD's mode and this machine's Winograd table (`machine_table`). The environment
  and the table are read here, not when the convolutions are traced."""
  backend = resolve(backend)
  if backend != "onednn":
    return ConvOps(backend, axis_name)
  isa = winograd.isa_level(library.cpu_flags())
  return ConvOps(backend, axis_name, winograd.mode_from_env(), machine_table(), isa)


def machine_key() -> str:
  """This machine's section of the Winograd table (`winograd.machine_key`)."""
  return winograd.machine_key(
    library.cpu_model(), library.cpu_flags(), library.usable_cores(), library.onednn_version()
  )


def machine_table(path: str | None = None) -> tuple:
  """This machine's measured Winograd choices (`winograd.decisions`) from the table at `path`
  (default `winograd.tuning_path()`); () where it has none. ValueError naming an unreadable
  file."""
  tables = winograd.read_tables(path or winograd.tuning_path())
  return winograd.decisions(tables.get(machine_key(), {}))


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
