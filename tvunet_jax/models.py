"""The TV-UNet network: a Flax (linen) U-Net equivalent to the authors' Keras model.

This module owns the network only (no loss, no data, no devices); its layers' fast forms and the
Keras initialisers are in `tvunet_jax.layers`, the convolutions in `tvunet_jax.kernels.conv`. It
reproduces `get_unet` of the authors' code (github.com/narges-sa/COVID-CT-Segmentation,
`TV_UNET.py`):

  * `depth` (4) down-sampling levels of widths base * (1, 2, 4, 8) and a bottleneck of width
    base * 16 (base 64); every block is two [3x3 conv 'SAME' (with bias) -> BatchNorm -> ReLU];
  * 2x2 max-pool, then dropout 0.2, after each down block;
  * up-sampling by a 3x3 stride-2 transposed conv with bias whose width is the width of the level
    it returns to (base * 8 first), no BN/ReLU after it; its output is concatenated with the skip
    as `[upsampled, skip]` (Keras order), then dropout 0.2, then a conv block;
  * a 1x1 head. The authors' head has a sigmoid; ours returns logits (float32, even when
    computing in bfloat16) and the loss applies the sigmoid.

Keras-equivalent details: BatchNorm momentum 0.99, epsilon 1e-3 (flax and Keras both update
`ra = m * ra + (1 - m) * batch`); he-normal conv kernels (Keras' truncated normal, stddev
sqrt(2 / fan_in) after truncation); Glorot-uniform transposed-conv and head kernels; zero biases.

Parameter count. `paper_unet()` at 128x128x1 input has 34,535,810 variables counting the
BatchNorm statistics (mean and var), i.e. Keras' "Total params" of `model.summary()`: 34,524,034
trainable (kernels, biases, BN scale and bias) + 11,776 BatchNorm statistics. The number pins both
choices the authors' code makes: conv biases kept before BatchNorm (Keras' default
`use_bias=True`, 5,888 of them) and a 2-channel sigmoid head (`num_class = 2`: channel 0
background, channel 1 lesion). A 1-channel head gives 34,535,745; dropping the pre-BN biases gives
34,529,922; both 34,529,857; not counting the statistics 34,524,034, so no other of these variants
can hit the number. A conv bias before a train-mode BatchNorm gets an exactly zero gradient (the
batch mean removes it), so these 5,888 biases only carry parity with Keras. `count_params` counts
every leaf, so pass `variables['params']` for the trainable count.

The switches `upsample`, `pool` and `conv_backend` change speed only, never the parameter tree or
the numbers (checkpoints are interchangeable; `tvunet_jax.layers` says how). The convolution
backend is chosen once, when the model is built, and travels as one value, a `conv.ConvOps`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tvunet_jax import layers
from tvunet_jax.kernels import conv

Array = jax.Array
Dtype = Any

UPSAMPLE_KINDS = ("conv_transpose", "subpixel")
POOL_KINDS = layers.POOL_KINDS


def conv_ops(backend: str | conv.ConvOps, axis_name: str | None = None) -> conv.ConvOps:
  """The convolutions for a configured backend ('auto', 'onednn', 'xla'; TVUNET_CONV_BACKEND
  overrides it), the kernels split along the mesh axis `axis_name` (the caller's: train and
  predict pass `sharding.DATA_AXIS`; None runs them unsplit); a `ConvOps` is kept as it is."""
  if isinstance(backend, conv.ConvOps):
    return backend
  return conv.choose(backend, axis_name=axis_name)


class ConvBlock(nn.Module):
  """Two [3x3 conv 'SAME' with bias -> BatchNorm -> ReLU], Keras `conv2d_block`."""

  features: int
  bn_momentum: float = 0.99
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  ops: conv.ConvOps = conv.XLA

  @nn.compact
  def __call__(self, x: Array | tuple[Array, ...], *, train: bool) -> Array:
    """Maps (B, H, W, Cin) to (B, H, W, features) in `dtype`.

    `x` may be a tuple of (B, H, W, C_i) arrays standing for their concatenation along the
    channels (Cin = sum C_i; the skip connection of an up block): the parameters are those of
    the concatenated input either way.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(2):
      if isinstance(x, tuple) and self.ops.fuse_skip:
        x = layers.ConcatInputConv(self.features, ops=self.ops, name=f"conv_{i}", **kw)(x)
      else:
        if isinstance(x, tuple):
          x = jnp.concatenate(x, axis=-1)
        x = nn.Conv(
          self.features,
          (3, 3),
          padding="SAME",
          use_bias=True,
          kernel_init=layers.he_normal,
          bias_init=layers.zeros,
          conv_general_dilated=self.ops.conv,
          name=f"conv_{i}",
          **kw,
        )(x)
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=1e-3,
        name=f"bn_{i}",
        **kw,
      )(x)
      x = nn.relu(x)
    return x


class UNet(nn.Module):
  """U-Net of TV-UNet; see the module docstring for the architecture.

  Attributes:
    base: width of the first level; level l has base * 2**l channels.
    depth: number of 2x down-samplings (4 in the paper).
    dropout: rate after each pool and each skip concatenation.
    num_outputs: logit channels (1 lesion channel; 2 as the authors: background, lesion; or C
      classes).
    dtype: compute dtype (float32, or bfloat16 on TPU); logits are float32.
    param_dtype: parameter dtype (keep float32).
    upsample: 'subpixel' or 'conv_transpose'; same parameters and numbers.
    pool: 'reshape' or 'max_pool'; same numbers.
    bn_momentum: BatchNorm running-average decay (Keras 0.99). The running statistics reach
      their data values only after ~3 / (1 - momentum) steps; a run of a few hundred steps needs
      a lower value (0.9) or its eval-mode outputs use half-initial statistics.
    conv_backend: who computes the convolutions: a `conv.ConvOps`, or 'auto', 'onednn' or 'xla',
      which construction resolves into one (`conv_ops`: TVUNET_CONV_BACKEND overrides the
      string; 'auto' is oneDNN on CPU when its library is built, XLA otherwise), so after
      construction the field always holds a `ConvOps`. Same parameters and, to float32 rounding,
      the same numbers.

  Parameter tree: `down_{l}` (l = 0..depth-1), `bottleneck`, then per level l = depth-1..0
  `upsample_{l}` ('kernel', 'bias') and `up_{l}`, then `head`. Each block holds `conv_{0,1}` and
  `bn_{0,1}` ('batch_stats': mean, var).
  """

  base: int = 64
  depth: int = 4
  dropout: float = 0.2
  num_outputs: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upsample: str = "subpixel"
  pool: str = "reshape"
  bn_momentum: float = 0.99
  conv_backend: str | conv.ConvOps = "auto"

  def __post_init__(self) -> None:
    # Resolved here, once per model: clones (flax makes them on init/apply) receive the ConvOps
    # and keep it, so neither the environment nor the library is consulted while tracing.
    object.__setattr__(self, "conv_backend", conv_ops(self.conv_backend))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Segments a batch of slices.

    Args:
      x: (B, H, W, C_in) float; H and W divisible by 2**depth.
      train: True uses batch statistics (update them by applying with `mutable=['batch_stats']`)
        and dropout (needs rngs={'dropout': key}); False uses the running statistics and no
        dropout (deterministic). On XLA:CPU each threefry call site (init: one per parameter;
        train: one per dropout) is slow to compile; keys made with
        `jax.random.key(seed, impl='rbg')` compile much faster.

    Returns:
      (B, H, W, num_outputs) float32 logits.
    """
    self._check(x)
    ops = self.conv_backend
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = dict(bn_momentum=self.bn_momentum, ops=ops, **kw)
    drop = layers.Dropout(self.dropout, deterministic=not train)

    skips = []
    for level in range(self.depth):
      x = ConvBlock(self.base * 2**level, name=f"down_{level}", **block)(x, train=train)
      skips.append(x)
      x = drop(layers.pool_2x2(x, self.pool))
    x = ConvBlock(self.base * 2**self.depth, name="bottleneck", **block)(x, train=train)

    for level in reversed(range(self.depth)):
      width, name = self.base * 2**level, f"upsample_{level}"
      if self.upsample == "subpixel":
        x = layers.SubpixelConvTranspose(width, ops=ops, name=name, **kw)(x)
      else:
        x = layers.flax_conv_transpose(width, name=name, **kw)(x)
      # Keras order [upsampled, skip]: matters only for importing Keras weights. The pair stands
      # for its channel concatenation (`layers.Dropout`, `ConvBlock`), built only where the
      # backend does not fuse it.
      x = drop((x, skips[level]))
      x = ConvBlock(width, name=f"up_{level}", **block)(x, train=train)

    logits = nn.Conv(
      self.num_outputs,
      (1, 1),
      kernel_init=layers.glorot_uniform,
      bias_init=layers.zeros,
      conv_general_dilated=ops.conv,
      name="head",
      **kw,
    )(x)
    return logits.astype(jnp.float32)

  def _check(self, x: Array) -> None:
    if self.upsample not in UPSAMPLE_KINDS:
      raise ValueError(f"UNet: upsample must be one of {UPSAMPLE_KINDS}, got {self.upsample!r}")
    if self.pool not in POOL_KINDS:
      raise ValueError(f"UNet: pool must be one of {POOL_KINDS}, got {self.pool!r}")
    if self.depth < 1 or self.base < 1 or self.num_outputs < 1:
      raise ValueError(
        f"UNet: depth, base and num_outputs must be >= 1, got depth={self.depth}, "
        f"base={self.base}, num_outputs={self.num_outputs}"
      )
    if x.ndim != 4:
      raise ValueError(f"UNet: input must be (B, H, W, C), got shape {tuple(x.shape)}")
    h, w = x.shape[1:3]
    m = 2**self.depth
    if h % m or w % m or h == 0 or w == 0:
      raise ValueError(
        f"UNet: H and W must be positive multiples of 2**depth = {m} (depth={self.depth}), "
        f"got H={h}, W={w}"
      )


def build(model_cfg: Any, *, axis_name: str | None = None) -> UNet:
  """The U-Net a config's `model` block describes, its convolution backend resolved.

  Args:
    model_cfg: a ConfigDict or the dict saved in a model contract, with base, depth, dropout,
      num_outputs, dtype, upsample, pool, optional bn_momentum (older contracts: Keras' 0.99) and
      optional conv_backend ('auto' when missing; a `conv.ConvOps` is taken as it is, bypassing
      TVUNET_CONV_BACKEND, e.g. `conv.XLA` for an export).
    axis_name: the mesh axis the batch is split along, for the oneDNN kernels' per-shard calls
      (`sharding.DATA_AXIS` under the project's meshes; None: unsplit).

  Returns:
    An unbound `UNet` whose `conv_backend` is a `conv.ConvOps`.
  """
  get = model_cfg.get
  return UNet(
    base=get("base"),
    depth=get("depth"),
    dropout=get("dropout"),
    num_outputs=get("num_outputs"),
    dtype=jnp.dtype(get("dtype")),
    upsample=get("upsample"),
    pool=get("pool"),
    bn_momentum=get("bn_momentum", 0.99),
    conv_backend=conv_ops(get("conv_backend", "auto"), axis_name),
  )


def paper_unet(**overrides: Any) -> UNet:
  """The paper's network: base 64, depth 4, dropout 0.2, 2 output channels.

  Args:
    **overrides: any `UNet` field, e.g. num_outputs=1 or dtype=jnp.bfloat16.

  Returns:
    An unbound `UNet`; at 128x128x1 input it has 34,535,810 variables (params + BatchNorm
    statistics) with the defaults.
  """
  fields = dict(base=64, depth=4, dropout=0.2, num_outputs=2)
  fields.update(overrides)
  return UNet(**fields)


def count_params(variables: Any) -> int:
  """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s.

  Pass the whole `variables` dict for Keras' "Total params" (BatchNorm mean and var included) or
  `variables['params']` for the trainable count.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables))
