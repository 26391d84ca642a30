"""The PyTorch peer of the TV-UNet train step, imported only by the benchmark's PyTorch children.

It owns one thing: the same network, loss and optimizer as `tvunet_jax` written in PyTorch at its
best on a CPU (channels_last memory format, all cores, bf16 autocast when comparing bf16), so that
the benchmark can state a speed ratio measured in the same run. It is a speed reference, not a
second implementation to train with: weights are PyTorch's default initialisation and nothing is
converted to or from the Flax parameter tree.

Network (as `tvunet_jax.models.UNet`): `depth` down blocks of widths base * 2**l and a bottleneck of
width base * 2**depth; each block is two [3x3 conv with bias -> BatchNorm (eps 1e-3, momentum 0.01,
i.e. Keras/flax 0.99; the benchmark passes 1 - the config's `bn_momentum`) -> ReLU]; 2x2 max-pool
then dropout after every down block; up-sampling by `ConvTranspose2d(3, stride 2, padding 1,
output_padding 1)` with bias, concatenated as [upsampled, skip] and followed by dropout and a
block; a 1x1 head returning logits. The trainable
parameter count equals the Flax model's (tests/test_benchmark.py checks it).

Loss: mean BCE on logits + tv_weight * anisotropic TV of the sigmoid with the authors' 'mean'
reduction (mean |dP/dh| + mean |dP/dw|), the same numbers as `tvunet_jax.losses.total_loss` with
dice_weight=0. Optimizer: Adam, learning rate 1e-3.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch weights the new batch by momentum: 1 - 0.99 of Keras and flax


def set_threads() -> int:
  """One intra-op thread per CPU this process may run on (its affinity mask: a container or
  `taskset` may allow fewer CPUs than `os.cpu_count()` reports); returns the count."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(cpus or 1)
  return torch.get_num_threads()


class ConvBlock(nn.Sequential):
  """Two [3x3 conv 'same' with bias -> BatchNorm -> ReLU]: (B, Cin, H, W) -> (B, Cout, H, W)."""

  def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = BN_MOMENTUM):
    layers = []
    for i in range(2):
      layers += [
        nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=True),
        nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=bn_momentum),
        nn.ReLU(inplace=True),
      ]
    super().__init__(*layers)


class TorchUNet(nn.Module):
  """U-Net of TV-UNet in PyTorch; the architecture of `tvunet_jax.models.UNet`.

  Args:
    base: width of the first level.
    depth: number of 2x down-samplings.
    dropout: rate after each pool and each skip concatenation.
    num_outputs: logit channels.
    in_channels: input channels (1 for CT).
    bn_momentum: PyTorch's BatchNorm momentum, 1 - the flax/Keras one (0.01 = Keras' 0.99).
  """

  def __init__(
    self,
    base: int = 64,
    depth: int = 4,
    dropout: float = 0.2,
    num_outputs: int = 1,
    in_channels: int = 1,
    bn_momentum: float = BN_MOMENTUM,
  ):
    super().__init__()
    if depth < 1 or base < 1 or num_outputs < 1:
      raise ValueError(
        f"TorchUNet: depth, base and num_outputs must be >= 1, got depth={depth}, "
        f"base={base}, num_outputs={num_outputs}"
      )
    self.depth = depth
    widths = [base * 2**level for level in range(depth + 1)]
    self.down = nn.ModuleList()
    cin = in_channels
    for level in range(depth):
      self.down.append(ConvBlock(cin, widths[level], bn_momentum))
      cin = widths[level]
    self.bottleneck = ConvBlock(widths[depth - 1], widths[depth], bn_momentum)
    self.upsample = nn.ModuleList()
    self.up = nn.ModuleList()
    for level in reversed(range(depth)):
      self.upsample.append(
        nn.ConvTranspose2d(
          widths[level + 1], widths[level], 3, stride=2, padding=1, output_padding=1, bias=True
        )
      )
      self.up.append(ConvBlock(2 * widths[level], widths[level], bn_momentum))
    self.head = nn.Conv2d(base, num_outputs, 1)
    self.pool = nn.MaxPool2d(2)
    self.drop = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """(B, in_channels, H, W) -> (B, num_outputs, H, W) logits; H, W divisible by 2**depth."""
    if x.ndim != 4 or x.shape[2] % 2**self.depth or x.shape[3] % 2**self.depth:
      raise ValueError(
        f"TorchUNet: input must be (B, C, H, W) with H and W divisible by "
        f"{2**self.depth}, got shape {tuple(x.shape)}"
      )
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = self.drop(self.pool(x))
    x = self.bottleneck(x)
    for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
      x = self.drop(torch.cat([upsample(x), skip], dim=1))
      x = block(x)
    return self.head(x)


def count_params(model: nn.Module) -> tuple[int, int]:
  """(trainable parameters, BatchNorm running mean + var entries) of a model.

  The first equals `tvunet_jax.models.count_params(variables['params'])` of the same network, the
  second `count_params(variables['batch_stats'])`; `num_batches_tracked` counters are not counted.
  """
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  stats = sum(
    m.running_mean.numel() + m.running_var.numel()
    for m in model.modules()
    if isinstance(m, nn.BatchNorm2d)
  )
  return trainable, stats


def anisotropic_tv(probs: torch.Tensor) -> torch.Tensor:
  """mean |P[i+1, j] - P[i, j]| + mean |P[i, j+1] - P[i, j]| of (B, C, H, W) maps; a scalar.

  Each difference map is averaged over its own elements, as `tvunet_jax.losses.anisotropic_tv`
  with reduction='mean' (the authors' Keras form). PyTorch's |x| has gradient 0 at 0, as ours.
  """
  dh = (probs[:, :, 1:, :] - probs[:, :, :-1, :]).abs().mean()
  dw = (probs[:, :, :, 1:] - probs[:, :, :, :-1]).abs().mean()
  return dh + dw


def tv_bce_loss(logits: torch.Tensor, labels: torch.Tensor, tv_weight: float) -> torch.Tensor:
  """Mean BCE of (B, K, H, W) logits against labels + tv_weight * TV(sigmoid(logits)); float32."""
  logits = logits.float()  # the Flax model also returns float32 logits under bf16 compute
  bce = F.binary_cross_entropy_with_logits(logits, labels)
  return bce + tv_weight * anisotropic_tv(torch.sigmoid(logits))


def make_optimizer(model: nn.Module, learning_rate: float = 1e-3) -> torch.optim.Optimizer:
  return torch.optim.Adam(model.parameters(), lr=learning_rate)


def train_step(
  model: nn.Module,
  optimizer: torch.optim.Optimizer,
  images: torch.Tensor,
  labels: torch.Tensor,
  *,
  tv_weight: float,
  autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
  """One Adam step on a batch; returns the detached loss (reading it synchronises nothing on CPU).

  Args:
    images: (B, 1, H, W) float32, channels_last like the model.
    labels: (B, K, H, W) float32 in {0, 1}.
    autocast_dtype: e.g. torch.bfloat16 to run the network under CPU autocast; the loss is always
      computed in float32.
  """
  model.train()
  optimizer.zero_grad(set_to_none=True)
  with torch.autocast(
    "cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
  ):
    logits = model(images)
  loss = tv_bce_loss(logits, labels, tv_weight)
  loss.backward()
  optimizer.step()
  return loss.detach()
