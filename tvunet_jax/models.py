"""The TV-UNet network: a Flax (linen) U-Net equivalent to the authors' Keras model.

This module owns the network only (no loss, no data, no devices). It reproduces
`get_unet` of the authors' code (github.com/narges-sa/COVID-CT-Segmentation,
`TV_UNET.py`):

  * `depth` (4) down-sampling levels of widths base * (1, 2, 4, 8) and a
    bottleneck of width base * 16 (base 64); every block is two
    [3x3 conv 'SAME' (with bias) -> BatchNorm -> ReLU];
  * 2x2 max-pool, then dropout 0.2, after each down block;
  * up-sampling by a 3x3 stride-2 transposed conv with bias whose width is the
    width of the level it returns to (base * 8 first), no BN/ReLU after it; its
    output is concatenated with the skip as `[upsampled, skip]` (Keras order),
    then dropout 0.2, then a conv block (on oneDNN the pair is used without
    being concatenated; see the switches below);
  * a 1x1 head. The authors' head has a sigmoid; ours returns logits (float32,
    even when computing in bfloat16) and the loss applies the sigmoid.

Keras-equivalent details: BatchNorm momentum 0.99, epsilon 1e-3 (flax and Keras
both update `ra = m * ra + (1 - m) * batch`); he-normal conv kernels (Keras'
truncated normal, stddev sqrt(2 / fan_in) after truncation, which is what
`variance_scaling(2.0, 'fan_in', 'truncated_normal')` draws); Glorot-uniform
transposed-conv and head kernels; zero biases.

Parameter count. `paper_unet()` at 128x128x1 input has 34,535,810 variables
counting the BatchNorm statistics (mean and var), i.e. Keras' "Total params" of
`model.summary()`: 34,524,034 trainable (kernels, biases, BN scale and bias)
+ 11,776 BatchNorm statistics. The number pins both choices the authors' code
makes: conv biases kept before BatchNorm (Keras' default `use_bias=True`, 5,888
of them) and a 2-channel sigmoid head (`num_class = 2`: channel 0 background,
channel 1 lesion). A 1-channel head gives 34,535,745; dropping the pre-BN
biases gives 34,529,922; both 34,529,857; not counting the statistics
34,524,034, so no other of these variants can hit the number. Note that a conv
bias before a train-mode BatchNorm gets an exactly zero gradient (the batch mean
removes it), so these 5,888 biases only carry parity with Keras.
`count_params(variables)` counts every leaf, so pass `variables['params']` for
the trainable count.

Implementation switches change speed only, never the parameter tree or the
numbers (so checkpoints are interchangeable):

  * `upsample='conv_transpose'` uses `nn.ConvTranspose(f, (3, 3), (2, 2),
    'SAME')` (always XLA's); `upsample='subpixel'` (default) is the fast form
    of the same layer: on XLA it applies the (3, 3, Cin, Cout) kernel as a
    stride-1 2x2 convolution to 4 * Cout channels followed by depth-to-space
    (XLA:CPU is 2-3x faster so: the stride-2 transposed conv's gradient is slow
    there); on oneDNN it is oneDNN's own transposed convolution.
  * On oneDNN an up block's first conv takes the pair [upsampled, skip] without
    concatenating it (`ConcatInputConv`: one conv per half on its rows of the
    kernel, summed); dropout draws the pair's mask as that of the concatenation.
    On XLA the pair is concatenated as in Keras. In bfloat16 the two halves'
    outputs are rounded to bfloat16 before they are summed: one rounding more
    than the concatenated conv (float32 is unaffected beyond summation order).
  * `pool='max_pool'` uses `nn.max_pool` (select-and-scatter gradient);
    `pool='reshape'` (default) reshapes to (B, H/2, 2, W/2, 2, C) and reduces
    with max, about 2x faster backward on CPU. The two gradients differ only
    where a 2x2 window holds tied maxima (reduce-max splits the gradient among
    ties, select-and-scatter gives it to one). In this network pools follow a
    ReLU, whose gradient is 0 at the only value that ties in practice (0).

Transposed-conv alignment. We follow flax/`lax.conv_transpose` 'SAME' (no
kernel flip; input dilated by 2 and padded (2, 1)). Per axis, with kernel taps
w0, w1, w2 and input x:

    o[2i]     = w0 * x[i - 1] + w2 * x[i]
    o[2i + 1] = w1 * x[i]

Keras' `Conv2DTranspose(3, strides=2, padding='same')` computes
o[2i] = w0 * x[i] + w2 * x[i - 1], o[2i + 1] = w1 * x[i], i.e. the same
layer with the kernel flipped spatially, so a Keras kernel converts to ours by
`kernel[::-1, ::-1]` (plus a (kh, kw, out, in) -> (kh, kw, in, out) transpose).
PyTorch's `ConvTranspose2d(3, 2, padding=1, output_padding=1)` is Keras' layer
shifted by one output pixel (o[2i - 1] = w0 * x[i] + w2 * x[i - 1]).
`tests/test_models.py` pins our alignment on a delta input.
"""

from collections.abc import Callable
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from tvunet_jax.kernels import conv

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

UPSAMPLE_KINDS = ('conv_transpose', 'subpixel')
POOL_KINDS = ('max_pool', 'reshape')

# Keras `he_normal`: truncated normal whose post-truncation stddev is
# sqrt(2 / fan_in); flax's variance_scaling applies the same 0.8796 correction.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
glorot_uniform = nn.initializers.glorot_uniform()
zeros = nn.initializers.zeros_init()

# Per output parity (row 0: even outputs, row 1: odd outputs), the 3x3 kernel
# tap that multiplies input offsets (-1, 0). Index 3 points at a zero row that
# `subpixel_kernel` appends: odd outputs see only x[i], through tap 1.
_PARITY_TAPS = ((0, 2), (3, 1))


def subpixel_kernel(kernel: Array) -> Array:
  """Rearranges a 3x3 stride-2 'SAME' transposed-conv kernel for a 2x2 conv.

  Args:
    kernel: (3, 3, Cin, Cout), any float dtype; the `nn.ConvTranspose` kernel.

  Returns:
    (2, 2, Cin, 4 * Cout), same dtype: a stride-1 conv kernel over input
    offsets (-1, 0) in each spatial axis whose output channels are ordered
    (row parity, column parity, Cout), as `depth_to_space` expects.
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'subpixel_kernel: expected a (3, 3, Cin, Cout) kernel, got {kernel.shape}')
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

  Same parameters ('kernel' (3, 3, Cin, Cout), 'bias' (Cout,)) and the same
  output as the flax layer, so either can load the other's checkpoint.
  On XLA it is a stride-1 2x2 conv + depth-to-space: even output rows/columns
  get taps (0, 2) on input offsets (-1, 0); odd ones get tap 1 on offset 0
  (see the module docstring); the zero taps cost 7 of the 16 multiply slots
  but remove the stride-2 transposed conv, whose XLA:CPU gradient is the slow
  part. On oneDNN (`conv_backend` resolving to 'onednn') it is one oneDNN
  transposed-convolution primitive per pass (`kernels.conv.conv_transpose`).
  """

  features: int
  kernel_init: Initializer = glorot_uniform
  bias_init: Initializer = zeros
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  conv_backend: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Up-samples (B, H, W, Cin) to (B, 2H, 2W, features) in `dtype`."""
    kernel = self.param(
        'kernel', self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if conv.resolve(self.conv_backend) == 'onednn' and conv.transpose_supported(x.dtype):
      # One oneDNN transposed-convolution primitive per pass: 9 taps, no depth-to-space
      # (1.3-2.4x faster per layer than the sub-pixel form on oneDNN; a few per cent of a step,
      # experiments/README.md). Other dtypes keep the sub-pixel form below, XLA's fast one.
      y = conv.conv_transpose(self.conv_backend)(
          x, kernel, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return y + bias
    y = conv.conv_general_dilated(self.conv_backend)(
        x, subpixel_kernel(kernel), window_strides=(1, 1),
        padding=((1, 0), (1, 0)),  # offsets -1 and 0: one row/col of zeros before
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return depth_to_space(y) + bias


class Dropout(nn.Module):
  """Inverted dropout, as `nn.Dropout`, with masks drawn by XLA's threefry bit generator.

  Same semantics as flax's layer (zero with probability `rate`, scale the rest by
  1 / (1 - rate); an identity when `deterministic`; no parameters, so checkpoints are
  unaffected) but a different random stream: the random bits come from
  `lax.rng_bit_generator(..., algorithm=RNG_THREE_FRY)` seeded by the layer's 'dropout' key.
  Why: `jax.random.bernoulli` on an 'rbg' key calls the same generator with XLA's default
  algorithm, which XLA:CPU runs 3.5x slower (Philox: 263 vs 76 ms for one 8x128x128x128 mask);
  at the paper model's size the eight dropout masks were ~6% of a CPU train step
  (`experiments/README.md`). A bit is kept when its uint32 is >= round(rate * 2**32), so the
  drop probability is `rate` to within 2**-32.
  """

  rate: float
  deterministic: bool = False
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, x: Array | tuple[Array, ...]) -> Array | tuple[Array, ...]:
    """(...) array of any float dtype -> same shape and dtype.

    A tuple of arrays that differ only in their last axis is dropped as their concatenation
    along it would be (the same mask, bit for bit), and returned as a tuple of the same shapes:
    the U-Net's skip connections need not be concatenated to be dropped.
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
    _, bits = lax.rng_bit_generator(data, shape, dtype=jnp.uint32,
                                    algorithm=lax.RandomAlgorithm.RNG_THREE_FRY)
    threshold = min(round(self.rate * 2.0**32), 2**32 - 1)
    keep = bits >= jnp.uint32(threshold)
    out, start = [], 0
    for p in parts:
      k = keep[..., start:start + p.shape[-1]]
      start += p.shape[-1]
      out.append(lax.select(k, p / jnp.asarray(1.0 - self.rate, p.dtype), jnp.zeros_like(p)))
    return tuple(out) if isinstance(x, tuple) else out[0]


def pool_2x2(x: Array, method: str = 'reshape') -> Array:
  """2x2 stride-2 max pooling.

  Args:
    x: (B, H, W, C) with even H and W, any float dtype.
    method: 'max_pool' (`nn.max_pool`) or 'reshape' (reshape + max; same
      forward, faster gradient on CPU).

  Returns:
    (B, H/2, W/2, C), same dtype.
  """
  if method == 'max_pool':
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  if method == 'reshape':
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  raise ValueError(f'pool_2x2: method must be one of {POOL_KINDS}, got {method!r}')


class ConcatInputConv(nn.Module):
  """`nn.Conv(features, (3, 3), padding='SAME')` with bias, applied to the channel
  concatenation of its inputs without building it.

  Same parameters as that layer on the concatenated input ('kernel' (3, 3, sum C_i, features),
  'bias' (features,), same initialisers), so checkpoints are interchangeable. Convolution is
  linear in its input, so conv(concat_i x_i, K) = sum_i conv(x_i, K[:, :, rows of x_i]): one
  convolution per input on its slice of the kernel, summed. Used on oneDNN, where it saves
  writing and reading the concatenation and runs as fast or faster than the wide convolution
  (oneDNN 3.2's 512-channel 3x3 at 32x32 is slow; experiments/README.md).
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  conv_backend: str = 'auto'

  @nn.compact
  def __call__(self, xs: tuple[Array, ...]) -> Array:
    """(B, H, W, C_i) arrays -> (B, H, W, features) in `dtype`."""
    cin = sum(x.shape[-1] for x in xs)
    kernel = self.param('kernel', he_normal, (3, 3, cin, self.features), self.param_dtype)
    bias = self.param('bias', zeros, (self.features,), self.param_dtype)
    *xs, kernel, bias = nn.dtypes.promote_dtype(*xs, kernel, bias, dtype=self.dtype)
    conv_fn = conv.conv_general_dilated(self.conv_backend)
    y, start = None, 0
    for x in xs:
      part = conv_fn(x, kernel[:, :, start:start + x.shape[-1]], (1, 1), 'SAME',
                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      start += x.shape[-1]
      y = part if y is None else y + part
    return y + bias


class ConvBlock(nn.Module):
  """Two [3x3 conv 'SAME' with bias -> BatchNorm -> ReLU], Keras `conv2d_block`."""

  features: int
  bn_momentum: float = 0.99
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_backend: str = 'auto'

  @nn.compact
  def __call__(self, x: Array | tuple[Array, ...], *, train: bool) -> Array:
    """Maps (B, H, W, Cin) to (B, H, W, features) in `dtype`.

    `x` may be a tuple of (B, H, W, C_i) arrays standing for their concatenation along the
    channels (Cin = sum C_i; the skip connection of an up block): the parameters are those of
    the concatenated input either way.
    """
    for i in range(2):
      if isinstance(x, tuple) and conv.resolve(self.conv_backend) == 'onednn':
        x = ConcatInputConv(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                            conv_backend=self.conv_backend, name=f'conv_{i}')(x)
      else:
        if isinstance(x, tuple):
          x = jnp.concatenate(x, axis=-1)
        x = nn.Conv(
            self.features, (3, 3), padding='SAME', use_bias=True,
            kernel_init=he_normal, bias_init=zeros,
            conv_general_dilated=conv.conv_general_dilated(self.conv_backend),
            dtype=self.dtype, param_dtype=self.param_dtype, name=f'conv_{i}')(x)
      x = nn.BatchNorm(
          use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-3,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f'bn_{i}')(x)
      x = nn.relu(x)
    return x


class UNet(nn.Module):
  """U-Net of TV-UNet; see the module docstring for the architecture.

  Attributes:
    base: width of the first level; level l has base * 2**l channels.
    depth: number of 2x down-samplings (4 in the paper).
    dropout: rate after each pool and each skip concatenation.
    num_outputs: logit channels (1 lesion channel; 2 as the authors:
      background, lesion; or C classes).
    dtype: compute dtype (float32, or bfloat16 on TPU); logits are float32.
    param_dtype: parameter dtype (keep float32).
    upsample: 'subpixel' or 'conv_transpose'; same parameters and numbers.
    pool: 'reshape' or 'max_pool'; same numbers.
    bn_momentum: BatchNorm running-average decay (Keras 0.99). The running statistics
      reach their data values only after ~3 / (1 - momentum) steps; a run of a few hundred
      steps needs a lower value (0.9) or its eval-mode outputs use half-initial statistics.
    conv_backend: 'auto', 'onednn' or 'xla': who computes the convolutions (see
      `tvunet_jax.kernels.conv`); 'auto' is oneDNN on CPU when its library is built, XLA
      otherwise. Same parameters and, to float32 rounding, the same numbers.

  Parameter tree: `down_{l}` (l = 0..depth-1), `bottleneck`, then per level
  l = depth-1..0 `upsample_{l}` ('kernel', 'bias') and `up_{l}`, then `head`.
  Each block holds `conv_{0,1}` and `bn_{0,1}` ('batch_stats': mean, var).
  """

  base: int = 64
  depth: int = 4
  dropout: float = 0.2
  num_outputs: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upsample: str = 'subpixel'
  pool: str = 'reshape'
  bn_momentum: float = 0.99
  conv_backend: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Segments a batch of slices.

    Args:
      x: (B, H, W, C_in) float; H and W divisible by 2**depth.
      train: True uses batch statistics (update them by applying with
        `mutable=['batch_stats']`) and dropout (needs rngs={'dropout': key});
        False uses the running statistics and no dropout (deterministic).
        On XLA:CPU each threefry call site (init: one per parameter; train:
        one per dropout) costs ~3 s of compile; keys made with
        `jax.random.key(seed, impl='rbg')` compile ~6x faster.

    Returns:
      (B, H, W, num_outputs) float32 logits.
    """
    self._check(x)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv_backend=self.conv_backend)
    bn = dict(bn_momentum=self.bn_momentum)
    drop = Dropout(self.dropout, deterministic=not train)

    skips = []
    for level in range(self.depth):
      x = ConvBlock(self.base * 2**level, name=f'down_{level}', **bn, **kw)(x, train=train)
      skips.append(x)
      x = drop(pool_2x2(x, self.pool))
    x = ConvBlock(self.base * 2**self.depth, name='bottleneck', **bn, **kw)(x, train=train)

    up_cls = SubpixelConvTranspose if self.upsample == 'subpixel' else _FlaxConvTranspose
    for level in reversed(range(self.depth)):
      width = self.base * 2**level
      x = up_cls(width, name=f'upsample_{level}', **kw)(x)
      # Keras order [upsampled, skip]: matters only for importing Keras weights. The pair
      # stands for its channel concatenation (`Dropout`, `ConvBlock`), which only the XLA
      # path builds.
      x = drop((x, skips[level]))
      x = ConvBlock(width, name=f'up_{level}', **bn, **kw)(x, train=train)

    logits = nn.Conv(
        self.num_outputs, (1, 1), kernel_init=glorot_uniform, bias_init=zeros,
        dtype=self.dtype, param_dtype=self.param_dtype,
        conv_general_dilated=conv.conv_general_dilated(self.conv_backend), name='head')(x)
    return logits.astype(jnp.float32)

  def _check(self, x: Array) -> None:
    if self.upsample not in UPSAMPLE_KINDS:
      raise ValueError(f'UNet: upsample must be one of {UPSAMPLE_KINDS}, got {self.upsample!r}')
    if self.pool not in POOL_KINDS:
      raise ValueError(f'UNet: pool must be one of {POOL_KINDS}, got {self.pool!r}')
    if self.depth < 1 or self.base < 1 or self.num_outputs < 1:
      raise ValueError(
          f'UNet: depth, base and num_outputs must be >= 1, got depth={self.depth}, '
          f'base={self.base}, num_outputs={self.num_outputs}')
    if x.ndim != 4:
      raise ValueError(f'UNet: input must be (B, H, W, C), got shape {tuple(x.shape)}')
    h, w = x.shape[1:3]
    m = 2**self.depth
    if h % m or w % m or h == 0 or w == 0:
      raise ValueError(
          f'UNet: H and W must be positive multiples of 2**depth = {m} (depth={self.depth}), '
          f'got H={h}, W={w}')


def _FlaxConvTranspose(features: int, *, name: str, dtype: Dtype,  # pylint: disable=invalid-name
                       param_dtype: Dtype, conv_backend: str) -> nn.ConvTranspose:
  """The reference up-sampling layer, with the Keras initialisers (always XLA's conv: a
  stride-2 transposed conv is an lhs-dilated one, which the oneDNN kernels do not take)."""
  del conv_backend
  return nn.ConvTranspose(
      features, (3, 3), strides=(2, 2), padding='SAME', use_bias=True,
      kernel_init=glorot_uniform, bias_init=zeros, dtype=dtype,
      param_dtype=param_dtype, name=name)


def build(model_cfg: Any) -> UNet:
  """The U-Net a config's `model` block (a ConfigDict or the dict saved in a model contract)
  describes; missing `bn_momentum` (older contracts) means Keras' 0.99, a missing
  `conv_backend` means 'auto'."""
  get = model_cfg.get
  return UNet(base=get('base'), depth=get('depth'), dropout=get('dropout'),
              num_outputs=get('num_outputs'), dtype=jnp.dtype(get('dtype')),
              upsample=get('upsample'), pool=get('pool'), bn_momentum=get('bn_momentum', 0.99),
              conv_backend=get('conv_backend', 'auto'))


def paper_unet(**overrides: Any) -> UNet:
  """The paper's network: base 64, depth 4, dropout 0.2, 2 output channels.

  Args:
    **overrides: any `UNet` field, e.g. num_outputs=1 or dtype=jnp.bfloat16.

  Returns:
    An unbound `UNet`; at 128x128x1 input it has 34,535,810 variables
    (params + BatchNorm statistics) with the defaults.
  """
  fields = dict(base=64, depth=4, dropout=0.2, num_outputs=2)
  fields.update(overrides)
  return UNet(**fields)


def count_params(variables: Any) -> int:
  """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s.

  Pass the whole `variables` dict for Keras' "Total params" (BatchNorm mean and
  var included) or `variables['params']` for the trainable count.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables))
