"""The U-Net's layers in their fast forms: same parameters and numbers as the flax layers.

This module owns the layer implementations `tvunet_jax.models` assembles into the paper's
network, and the Keras initialisers. Every form changes speed only, never the parameter tree or
the numbers, so checkpoints are interchangeable between them:

  * `SubpixelConvTranspose` is `nn.ConvTranspose(f, (3, 3), (2, 2), 'SAME')` (`flax_conv_transpose`
    here, always XLA's): on XLA it applies the (3, 3, Cin, Cout) kernel as a stride-1 2x2
    convolution to 4 * Cout channels followed by depth-to-space (XLA:CPU's gradient of the
    stride-2 transposed conv is the slow part); on oneDNN it is oneDNN's own transposed
    convolution (`ConvOps.conv_transpose`).
  * `ConcatInputConv` is a 3x3 conv on the channel concatenation of its inputs, computed without
    building it (one conv per input on its rows of the kernel, summed); the U-Net uses it for an
    up block's [upsampled, skip] pair where `ConvOps.fuse_skip` (oneDNN). In bfloat16 the halves'
    outputs are rounded to bfloat16 before they are summed: one rounding more than the
    concatenated conv (float32 is unaffected beyond summation order).
  * `Dropout` is flax's inverted dropout with threefry bits from `lax.rng_bit_generator`; a tuple
    of arrays is dropped as their concatenation would be (the same mask, bit for bit).
  * `pool_2x2(x, 'reshape')` reshapes to (B, H/2, 2, W/2, 2, C) and reduces with max, a faster
    gradient on CPU than `nn.max_pool`'s select-and-scatter ('max_pool'). The two gradients differ
    only where a 2x2 window holds tied maxima (reduce-max splits the gradient among ties,
    select-and-scatter gives it to one); in the U-Net pools follow a ReLU, whose gradient is 0 at
    the only value that ties in practice (0).

Transposed-conv alignment. We follow flax/`lax.conv_transpose` 'SAME' (no kernel flip; input
dilated by 2 and padded (2, 1)). Per axis, with kernel taps w0, w1, w2 and input x:

    o[2i]     = w0 * x[i - 1] + w2 * x[i]
    o[2i + 1] = w1 * x[i]

Keras' `Conv2DTranspose(3, strides=2, padding='same')` computes o[2i] = w0 * x[i] + w2 * x[i - 1],
o[2i + 1] = w1 * x[i], i.e. the same layer with the kernel flipped spatially, so a Keras kernel
converts to ours by `kernel[::-1, ::-1]` (plus a (kh, kw, out, in) -> (kh, kw, in, out)
transpose). PyTorch's `ConvTranspose2d(3, 2, padding=1, output_padding=1)` is Keras' layer shifted
by one output pixel (o[2i - 1] = w0 * x[i] + w2 * x[i - 1]). `tests/test_models.py` pins our
alignment on a delta input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from tvunet_jax.kernels import conv

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

POOL_KINDS = ("max_pool", "reshape")
_NHWC = ("NHWC", "HWIO", "NHWC")

# Keras `he_normal`: truncated normal whose post-truncation stddev is sqrt(2 / fan_in); flax's
# variance_scaling applies the same truncation correction.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
glorot_uniform = nn.initializers.glorot_uniform()
zeros = nn.initializers.zeros_init()

# Per output parity (row 0: even outputs, row 1: odd outputs), the 3x3 kernel tap that multiplies
# input offsets (-1, 0). Index 3 points at a zero row that `subpixel_kernel` appends: odd outputs
# see only x[i], through tap 1.
_PARITY_TAPS = ((0, 2), (3, 1))


def subpixel_kernel(kernel: Array) -> Array:
  """Rearranges a 3x3 stride-2 'SAME' transposed-conv kernel for a 2x2 conv.

  Args:
    kernel: (3, 3, Cin, Cout), any float dtype; the `nn.ConvTranspose` kernel.

  Returns:
    (2, 2, Cin, 4 * Cout), same dtype: a stride-1 conv kernel over input offsets (-1, 0) in each
    spatial axis whose output channels are ordered (row parity, column parity, Cout), as
    `depth_to_space` expects.
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"subpixel_kernel: expected a (3, 3, Cin, Cout) kernel, got {kernel.shape}")
  cin, cout = kernel.shape[2:]
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # (4, 4, Cin, Cout)
  taps = jnp.asarray(_PARITY_TAPS)
  # (a, dy, 4, Cin, Cout) -> (a, dy, b, dx, Cin, Cout)
  gathered = padded[taps][:, :, taps]
  gathered = gathered.transpose(1, 3, 4, 0, 2, 5)  # (dy, dx, Cin, a, b, Cout)
  return gathered.reshape(2, 2, cin, 4 * cout)


def depth_to_space(x: Array) -> Array:
  """Interleaves 4 parity channel groups into a 2x larger image.

  Args:
    x: (B, H, W, 4 * C), channels ordered (row parity, column parity, C).

  Returns:
    (B, 2H, 2W, C), same dtype, with out[:, 2i + a, 2j + b] = x[:, i, j, (a, b)].
  """
  b, h, w, c4 = x.shape
  c = c4 // 4
  x = x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)


class SubpixelConvTranspose(nn.Module):
  """`nn.ConvTranspose(features, (3, 3), (2, 2), 'SAME')` in the fastest form per backend.

  Same parameters ('kernel' (3, 3, Cin, Cout), 'bias' (Cout,)) and the same output as the flax
  layer, so either can load the other's checkpoint. Where `ops.native_transpose` (oneDNN) it is
  one transposed-convolution primitive per pass (9 taps, no depth-to-space). Elsewhere it is a
  stride-1 2x2 conv + depth-to-space: even output rows/columns get taps (0, 2) on input offsets
  (-1, 0); odd ones get tap 1 on offset 0 (module docstring); the zero taps cost 7 of the 16
  multiply slots but remove the stride-2 transposed conv, whose XLA:CPU gradient is slow.
  """

  features: int
  kernel_init: Initializer = glorot_uniform
  bias_init: Initializer = zeros
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  ops: conv.ConvOps = conv.XLA

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Up-samples (B, H, W, Cin) to (B, 2H, 2W, features) in `dtype`."""
    kernel = self.param(
      "kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype
    )
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.ops.native_transpose(x.dtype):
      return self.ops.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=_NHWC) + bias
    y = self.ops.conv(
      x,
      subpixel_kernel(kernel),
      window_strides=(1, 1),
      padding=((1, 0), (1, 0)),  # offsets -1 and 0: one row/col of zeros before
      dimension_numbers=_NHWC,
    )
    return depth_to_space(y) + bias


def flax_conv_transpose(
  features: int, *, name: str, dtype: Dtype, param_dtype: Dtype
) -> nn.ConvTranspose:
  """The reference up-sampling layer `nn.ConvTranspose(features, (3, 3), (2, 2), 'SAME')` with
  the Keras initialisers; always XLA's conv (a stride-2 transposed conv is an lhs-dilated conv,
  which the oneDNN drop-in does not take)."""
  return nn.ConvTranspose(
    features,
    (3, 3),
    strides=(2, 2),
    padding="SAME",
    use_bias=True,
    kernel_init=glorot_uniform,
    bias_init=zeros,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


class Dropout(nn.Module):
  """Inverted dropout, as `nn.Dropout`, with masks drawn by XLA's threefry bit generator.

  Same semantics as flax's layer (zero with probability `rate`, scale the rest by 1 / (1 - rate);
  an identity when `deterministic`; no parameters, so checkpoints are unaffected) but a different
  random stream: the random bits come from `lax.rng_bit_generator(..., algorithm=RNG_THREE_FRY)`
  seeded by the layer's 'dropout' key. Why: `jax.random.bernoulli` on an 'rbg' key calls the same
  generator with XLA's default algorithm (Philox), which XLA:CPU runs several times slower
  (experiments/README.md). A bit is kept when its uint32 is >= round(rate * 2**32), so the drop
  probability is `rate` to within 2**-32.
  """

  rate: float
  deterministic: bool = False
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: Array | tuple[Array, ...]) -> Array | tuple[Array, ...]:
    """(...) array of any float dtype -> same shape and dtype.

    A tuple of arrays that differ only in their last axis is dropped as their concatenation along
    it would be (the same mask, bit for bit), and returned as a tuple of the same shapes: the
    U-Net's skip connections need not be concatenated to be dropped.
    """
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jax.tree.map(jnp.zeros_like, x)
    parts = x if isinstance(x, tuple) else (x,)
    shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
    key = self.make_rng(self.rng_collection)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a legacy raw (2,) uint32 key
      key = jax.random.wrap_key_data(key)
    data = jax.random.key_data(key)  # 'rbg' (train.py's): (4,) uint32, the generator's state
    if data.shape != (4,):  # e.g. threefry: (2,) uint32
      data = jax.random.bits(key, (4,), jnp.uint32)
    _, bits = lax.rng_bit_generator(
      data, shape, dtype=jnp.uint32, algorithm=lax.RandomAlgorithm.RNG_THREE_FRY
    )
    threshold = min(round(self.rate * 2.0**32), 2**32 - 1)
    keep = bits >= jnp.uint32(threshold)
    out, start = [], 0
    for p in parts:
      k = keep[..., start : start + p.shape[-1]]
      start += p.shape[-1]
      out.append(lax.select(k, p / jnp.asarray(1.0 - self.rate, p.dtype), jnp.zeros_like(p)))
    return tuple(out) if isinstance(x, tuple) else out[0]


def pool_2x2(x: Array, method: str = "reshape") -> Array:
  """2x2 stride-2 max pooling.

  Args:
    x: (B, H, W, C) with even H and W, any float dtype.
    method: 'max_pool' (`nn.max_pool`) or 'reshape' (reshape + max; same forward, faster
      gradient on CPU).

  Returns:
    (B, H/2, W/2, C), same dtype.
  """
  if method == "max_pool":
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  if method == "reshape":
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  raise ValueError(f"pool_2x2: method must be one of {POOL_KINDS}, got {method!r}")


class ConcatInputConv(nn.Module):
  """`nn.Conv(features, (3, 3), padding='SAME')` with bias, applied to the channel concatenation
  of its inputs without building it.

  Same parameters as that layer on the concatenated input ('kernel' (3, 3, sum C_i, features),
  'bias' (features,), same initialisers), so checkpoints are interchangeable. Convolution is
  linear in its input, so conv(concat_i x_i, K) = sum_i conv(x_i, K[:, :, rows of x_i]): one
  convolution per input on its slice of the kernel, summed. On oneDNN that saves writing and
  reading the concatenation, and oneDNN 3.2's wide 3x3 convs are slow (experiments/README.md).
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  ops: conv.ConvOps = conv.XLA

  @nn.compact
  def __call__(self, xs: tuple[Array, ...]) -> Array:
    """(B, H, W, C_i) arrays -> (B, H, W, features) in `dtype`."""
    cin = sum(x.shape[-1] for x in xs)
    kernel = self.param("kernel", he_normal, (3, 3, cin, self.features), self.param_dtype)
    bias = self.param("bias", zeros, (self.features,), self.param_dtype)
    *xs, kernel, bias = nn.dtypes.promote_dtype(*xs, kernel, bias, dtype=self.dtype)
    y, start = None, 0
    for x in xs:
      rows = kernel[:, :, start : start + x.shape[-1]]
      part = self.ops.conv(x, rows, (1, 1), "SAME", dimension_numbers=_NHWC)
      start += x.shape[-1]
      y = part if y is None else y + part
    return y + bias
