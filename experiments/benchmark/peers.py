"""The PyTorch peer variants: PyTorch at its best on a CPU, every way that may be fastest.

Each variant of the peer network (`experiments/torch_unet.py`, channels_last) runs in a PyTorch
child of its own; the fastest one that ran in a round is that round's peer.

  train:      'eager'    channels_last, Adam, bf16 via `torch.autocast("cpu")`;
              'compile'  the network under `torch.compile` (Inductor, default mode), the
                         optimizer eager;
              'compile_max_autotune'  (optional) the same with mode 'max-autotune-no-cudagraphs',
                         which times alternative GEMM/conv templates while compiling (slow).
  inference:  'eager'    eval mode under `torch.inference_mode`;
              'compile'  `torch.compile` with Inductor's freezing (weights folded as constants,
                         BatchNorm folded into the convolutions, oneDNN weight pre-packing: the
                         CPU inference setting PyTorch documents);
              'frozen'   TorchScript: the eval model traced, `torch.jit.freeze` (BatchNorm folded
                         into the convolutions) and `torch.jit.optimize_for_inference`; under
                         bf16 the trace is taken inside autocast, so the casts are folded too.

Only this module and `experiments/torch_unet.py` import torch; they are imported only in
PyTorch children. The variant names live in `schedule.PEERS` (the parent plans without torch).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from experiments import torch_unet
from experiments.benchmark import schedule


def build_net(model_cfg: Any) -> torch.nn.Module:
  """The peer network of a config's `model` block, channels_last, PyTorch's default init."""
  net = torch_unet.TorchUNet(
    model_cfg.base,
    model_cfg.depth,
    model_cfg.dropout,
    model_cfg.num_outputs,
    bn_momentum=1.0 - model_cfg.get("bn_momentum", 0.99),
  )
  return net.to(memory_format=torch.channels_last)


def train_network(variant: str, net: torch.nn.Module) -> torch.nn.Module:
  """What the train step calls: `net` itself or its compiled wrapper (same parameters)."""
  if variant == "eager":
    return net
  if variant == "compile":
    return torch.compile(net)
  if variant == "compile_max_autotune":
    return torch.compile(net, mode="max-autotune-no-cudagraphs")
  raise ValueError(
    f"peers: unknown train variant {variant!r}; choose from {schedule.PEERS['train']}"
  )


def inference_network(
  variant: str, net: torch.nn.Module, example: torch.Tensor, autocast_dtype: torch.dtype | None
) -> Any:
  """A callable (B, 1, H, W) -> (B, K, H, W) logits of the eval-mode `net` for `variant`.

  Call it inside `call_context(variant, autocast_dtype)`. `example` is one input batch, for
  tracing.
  """
  net = net.eval()
  if variant == "eager":
    return net
  if variant == "compile":
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(net)
  if variant == "frozen":
    with warnings.catch_warnings():
      # TorchScript is deprecated in favour of torch.compile (which is the 'compile' variant);
      # the tracer also warns about the input-shape check in TorchUNet.forward.
      warnings.simplefilter("ignore")
      with (
        torch.no_grad(),
        torch.autocast(
          "cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ),
      ):
        traced = torch.jit.trace(net, example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
  raise ValueError(
    f"peers: unknown inference variant {variant!r}; choose from {schedule.PEERS['inference']}"
  )


def call_context(variant: str, autocast_dtype: torch.dtype | None) -> contextlib.ExitStack:
  """The context inference calls of `variant` run in: no autograd bookkeeping
  (`torch.inference_mode`) and, except for the frozen graph (whose casts were traced in and
  folded), bf16 autocast when `autocast_dtype` is set."""
  stack = contextlib.ExitStack()
  stack.enter_context(torch.inference_mode())
  if autocast_dtype is not None and variant != "frozen":
    stack.enter_context(torch.autocast("cpu", dtype=autocast_dtype))
  return stack
