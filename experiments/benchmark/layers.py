"""The per-layer convolution table and the network's FLOP count, from the U-Net's layer shapes.

`conv_layers(...)` lists the U-Net's distinct convolutions (as `tvunet_jax.models.UNet` builds
them: two 3x3 'SAME' convs per block, 3x3 stride-2 transposed convs up-sampling, a 1x1 head) in
pure Python, so the parent process and a PyTorch child can use it without JAX;
`forward_flops(...)` counts them. The table itself is measured in two children, each importing
one framework:

  * `jax_table(batch)` in a JAX child: forward, input gradient and weight gradient of every layer
    on the child's conv backend (TVUNET_CONV_BACKEND): on oneDNN its direct kernels, with the
    Winograd F(4x4, 3x3) kernels timed beside them on every 3x3 conv, oneDNN's kernel names, and
    the passes the library's own choice (`conv.choose`: the measured table, else the ISA rule)
    runs by Winograd there; on XLA
    `lax.conv_general_dilated` and its linear transposes;
  * `torch_table(batch)` in a PyTorch child: the same three ops of PyTorch's channels_last convs;

and `merge_tables` joins the rows by layer for the report.
"""

from __future__ import annotations

import functools
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# oneDNN's (top, bottom, left, right) pads of the 3x3 stride-2 'SAME' transposed conv:
# `kernels.conv.onednn_transpose_pads('SAME', (3, 3), 2)` (tests/test_benchmark.py checks it).
TRANSPOSE_PADS = (0, 1, 0, 1)
OPS = ("forward", "input_grad", "weight_grad")


def _layer_list(base: int, depth: int, num_outputs: int) -> list[tuple[str, int, tuple, bool]]:
  """(name, level of its input, (kh, kw, ci, co), transposed) in network order."""
  width = lambda level: base * 2**level
  out = []
  cin = 1
  for level in range(depth):
    out += [
      (f"down_{level}.conv_0", level, (3, 3, cin, width(level)), False),
      (f"down_{level}.conv_1", level, (3, 3, width(level), width(level)), False),
    ]
    cin = width(level)
  out += [
    ("bottleneck.conv_0", depth, (3, 3, width(depth - 1), width(depth)), False),
    ("bottleneck.conv_1", depth, (3, 3, width(depth), width(depth)), False),
  ]
  for level in reversed(range(depth)):
    # the up-sampling's input is the level below (half the resolution)
    out += [
      (f"upsample_{level}", level + 1, (3, 3, width(level + 1), width(level)), True),
      (f"up_{level}.conv_0", level, (3, 3, 2 * width(level), width(level)), False),
      (f"up_{level}.conv_1", level, (3, 3, width(level), width(level)), False),
    ]
  out.append(("head", 0, (1, 1, base, num_outputs), False))
  return out


def conv_layers(
  batch: int = 8, base: int = 64, depth: int = 4, size: int = 128, num_outputs: int = 2
) -> list[dict[str, Any]]:
  """The U-Net's distinct convolutions: names, x (N, H, W, Ci), w (KH, KW, Ci, Co), pads.

  The up-sampling layers are what they are, 3x3 stride-2 'SAME' transposed convs
  (`"transposed": True`, x their input, `pads` in oneDNN's convention); layers of equal shape
  are listed once, with all their names, in network order.
  """
  out: dict[tuple, list[str]] = {}
  for name, level, w, transposed in _layer_list(base, depth, num_outputs):
    r = size >> level
    pads = TRANSPOSE_PADS if transposed else (w[0] // 2,) * 2 + (w[1] // 2,) * 2
    out.setdefault(((batch, r, r, w[2]), w, pads, transposed), []).append(name)
  return [
    {"layers": names, "x": list(x), "w": list(w), "pads": list(p), "transposed": t}
    for (x, w, p, t), names in out.items()
  ]


def forward_flops(base: int, depth: int, num_outputs: int, size: int) -> int:
  """FLOPs (2 per multiply-add) of one image's forward convolutions through the U-Net.

  A conv at resolution (h, w) costs 2 h w kh kw Ci Co; the stride-2 transposed conv the same per
  *input* pixel (each meets all 9 taps once). Border effects of 'SAME' padding are ignored, as
  usual for model FLOPs, and the sub-pixel form's zero taps are not counted. A train step costs
  about 3x this (forward, input gradient, weight gradient).
  """
  total = 0
  for _, level, (kh, kw, ci, co), _ in _layer_list(base, depth, num_outputs):
    total += 2 * (size >> level) ** 2 * kh * kw * ci * co
  return total


def _timed_ms(fn: Callable[[], Any], warmup: int = 1, reps: int = 3) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _jax_ops_ms(ops: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]]) -> dict[str, float]:
  """Median ms of each jitted (function, arguments) of `ops`; every array is an argument, never
  a closed-over constant XLA could fold."""
  import jax

  def run(fn, args):
    return jax.block_until_ready(fn(*args))

  return {k: _timed_ms(functools.partial(run, jax.jit(fn), args)) for k, (fn, args) in ops.items()}


def _transposed(x, w, *, stride, pads):
  from tvunet_jax.kernels import custom_calls

  return custom_calls.onednn_conv_transpose(x, w, stride, pads)


def jax_table(batch: int = 8, layers: Sequence[dict] | None = None) -> list[dict[str, Any]]:
  """Per layer of `conv_layers(batch)`: ms of forward, input grad and weight grad on the conv
  backend this process resolves ('onednn' or 'xla'), each in the form the model runs it.

  On 'onednn' the up-sampling is oneDNN's transposed conv and each 3x3 conv also gets
  `winograd_ms` and `winograd_in_model`; on 'xla' the up-sampling is the sub-pixel 2x2 conv to
  4x the channels (before the depth-to-space). `form` says which.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tvunet_jax.kernels import conv, custom_calls, library, winograd

  backend = conv.choose("auto").backend
  rows = []
  rng = np.random.default_rng(0)
  for layer in conv_layers(batch) if layers is None else layers:
    pads, x_shape, w_shape = tuple(layer["pads"]), layer["x"], layer["w"]
    transposed, stride, form = layer["transposed"], None, "conv"
    if backend == "onednn" and all(re.fullmatch(r"up_\d+\.conv_0", n) for n in layer["layers"]):
      # models.ConcatInputConv: on oneDNN the model runs this wide conv as two half-width ones
      # (the shape of the level's conv_1 row); the row keeps the wide conv for the comparison.
      form = "wide conv (the model runs 2 x its conv_1 shape instead)"
    if transposed and backend == "onednn":
      form, stride = "transposed conv, stride 2", 2
    elif transposed:
      form, pads = "sub-pixel 2x2 conv", (1, 0, 1, 0)
      w_shape = [2, 2, w_shape[2], 4 * w_shape[3]]
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
    pad_pairs = ((pads[0], pads[1]), (pads[2], pads[3]))
    f = lambda x, w, pad_pairs=pad_pairs: jax.lax.conv_general_dilated(
      x, w, (1, 1), pad_pairs, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    forward = f
    if stride:
      forward = functools.partial(_transposed, stride=stride, pads=pads)
    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(forward, x, w).shape, np.float32))
    if backend == "onednn":
      ops = custom_calls.onednn_ops(x, w, dy, pads, stride)
    else:
      ops = {
        "forward": (f, (x, w)),
        "input_grad": (
          lambda dy, w, f=f, x=x: jax.linear_transpose(lambda a: f(a, w), x)(dy)[0],
          (dy, w),
        ),
        "weight_grad": (
          lambda x, dy, f=f, w=w: jax.linear_transpose(lambda b: f(x, b), w)(dy)[0],
          (x, dy),
        ),
      }
    row = {**layer, "backend": backend, "form": form, "jax_ms": _jax_ops_ms(ops)}
    if backend == "onednn" and not stride and tuple(w_shape[:2]) == (3, 3) and pads == (1, 1, 1, 1):
      row["winograd_ms"] = _jax_ops_ms(custom_calls.winograd_ops(x, w, dy))
      # A wide up-block row is not run as such (the model runs two of its conv_1 shape).
      chosen = conv.choose("auto")
      choice = winograd.choose(
        x_shape,
        w_shape,
        "float32",
        pads,
        mode=chosen.winograd,
        table=chosen.winograd_table,
        isa=chosen.isa,
      )
      row["winograd_in_model"] = [form == "conv" and c for c in choice]  # per pass (OPS)
    if backend == "onednn":
      first = 3 if stride else 0
      row["onednn_impl"] = {
        k: library.impl_info(first + i, jnp.float32, x_shape, w_shape, pads, stride or 1)
        for i, k in enumerate(OPS)
      }
    rows.append(row)
  return rows


def torch_table(batch: int = 8, layers: Sequence[dict] | None = None) -> list[dict[str, Any]]:
  """Per layer of `conv_layers(batch)`: ms of PyTorch's forward, input grad and weight grad
  (channels_last); the up-sampling as the peer's own ConvTranspose2d(3, stride 2, padding 1,
  output_padding 1)."""
  from experiments import torch_unet

  torch_unet.set_threads()
  return [
    {**layer, "torch_ms": _torch_layer_ms(layer)}
    for layer in (conv_layers(batch) if layers is None else layers)
  ]


def _torch_layer_ms(layer: Mapping[str, Any]) -> dict[str, float]:
  import torch

  (n, h, w_, ci), (kh, kw, _, co), pads = layer["x"], layer["w"], layer["pads"]
  cl = torch.channels_last
  x = torch.randn(n, ci, h, w_).contiguous(memory_format=cl)
  if layer["transposed"]:
    weight = torch.randn(ci, co, 3, 3).contiguous(memory_format=cl)
    kwargs = dict(
      stride=[2, 2],
      padding=[1, 1],
      dilation=[1, 1],
      transposed=True,
      output_padding=[1, 1],
      groups=1,
    )
  else:
    weight = torch.randn(co, ci, kh, kw).contiguous(memory_format=cl)
    kwargs = dict(
      stride=[1, 1],
      padding=[pads[0], pads[2]],
      dilation=[1, 1],
      transposed=False,
      output_padding=[0, 0],
      groups=1,
    )
  with torch.no_grad():
    dy = torch.randn_like(torch.ops.aten.convolution(x, weight, None, **kwargs))
    dy = dy.contiguous(memory_format=cl)
    bwd = torch.ops.aten.convolution_backward
    ops = {
      "forward": lambda: torch.ops.aten.convolution(x, weight, None, **kwargs),
      "input_grad": lambda: bwd(dy, x, weight, None, output_mask=[True, False, False], **kwargs),
      "weight_grad": lambda: bwd(dy, x, weight, None, output_mask=[False, True, False], **kwargs),
    }
    return {k: _timed_ms(f) for k, f in ops.items()}


def merge_tables(
  jax_rows: Sequence[Mapping] | None, torch_rows: Sequence[Mapping] | None
) -> list[dict[str, Any]]:
  """JAX rows with the PyTorch row of the same layers added as `torch_ms` (either may be
  missing: a failed child); rows keyed by their layer names."""
  by_key = {tuple(r["layers"]): dict(r) for r in (jax_rows or [])}
  for r in torch_rows or []:
    by_key.setdefault(tuple(r["layers"]), {k: v for k, v in r.items() if k != "torch_ms"})
    by_key[tuple(r["layers"])]["torch_ms"] = r["torch_ms"]
  return list(by_key.values())
