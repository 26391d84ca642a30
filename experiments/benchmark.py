r"""Speed of TV-UNet on this machine: train step vs PyTorch, FLOP utilisation, data and inference.

  python -m experiments.benchmark [--quick] [--out experiments/results/benchmark.json]

One command writes one JSON file (and a markdown table beside it, same name with `.md`) holding the
environment (commit, library versions, CPU model, ISA flags, cores, device kind, load average) and,
each as the median of repeated timed runs after warm-up, every run synchronised
(`jax.block_until_ready`; PyTorch on CPU is synchronous):

  * train-step throughput (images/s) and compile time of `tvunet_jax.train.train_step`, jitted
    exactly as `train.py` does it (one device, state donated), on random data, for the paper model
    (experiments/configs/paper_split1.py: base 64) and the demo model (configs/default.py) at two
    batch sizes, 128x128, float32;
  * the same network, loss (BCE + TV) and optimizer in PyTorch (`experiments/torch_unet.py`,
    channels_last, all cores; the optional `bench` extra), and the ratio JAX / PyTorch. The two
    frameworks' steps are timed alternately (JAX, PyTorch, JAX, ...) in the same process, so both
    see the same background load;
  * achieved FLOP/s over the measured peak of this machine (a 4096x4096 float32 matmul, in JAX and
    in PyTorch; the largest is the peak): model FLOP utilisation. The FLOP count of a step is XLA's
    `compiled.cost_analysis()`; the analytic count of the network's convolutions (3 x forward,
    `unet_forward_flops`) is recorded beside it and used for PyTorch;
  * the TV term's share of the step time (its forward + backward run alone on logits of the
    step's shape), the input pipeline's slices/s on one core (`num_threads=1`, pinned to one CPU),
    inference slices/s on a 512x512 phantom volume (`predict.segment_volume`, end to end and
    network only) and the peak resident memory of each process;
  * in full mode, every number under five variants: XLA's convolutions with XLA's default flags
    (`default`) and with `--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce`
    (`ynn`, see STACK.md), and the kernels of `tvunet_jax/kernels` under both (`onednn`,
    `onednn_ynn`: oneDNN's direct convolutions plus the Winograd F(4x4, 3x3) kernels where
    `conv.use_winograd` picks them; they fall back to XLA, and say so in `conv_backend`, where the
    library is not built), and `onednn_direct`, oneDNN's direct convolutions alone
    (TVUNET_WINOGRAD=off: the before of the Winograd kernels). XLA reads its flags once, when the
    backend starts, so each variant runs in a child process of this command (which itself only
    writes the phantom data and times the input pipeline);
  * the per-layer table of the paper model's convolutions (forward, input gradient, weight
    gradient at batch 8) for the variant's backend (on oneDNN: its direct kernels, not the
    Winograd ones) and for PyTorch, with oneDNN's kernel names;
    and inference of the PyTorch peer's network on as many random 128x128 slices, in the same
    batches, timed alternately with JAX's network (`network_reps` pairs; the ratio is the median
    of the pairs' ratios; JAX's network time includes its host-device copies).

`--quick` (CI smoke test, about 1 minute on 2 idle cores): demo model, batch 4, 1 warm-up + 3
timed steps, default XLA flags (plus the oneDNN kernels where built), a 128x128x4 volume. The full
run (paper + demo, batch 8 and 16, 1 warm-up + 5 timed steps, five variants, a 512x512x100 volume)
takes over an hour on 2 cores; `--batches 8 --variants default,onednn_direct,onednn` about 25
minutes; the JSON records the duration. On a machine shared with other work, check `uptime` first:
under load PyTorch's OpenMP threads slow down far more than XLA's (10x was seen), which flatters
JAX.

Loss in both frameworks: mean BCE + tv_weight * anisotropic TV ('mean' reduction) of the sigmoid,
tv_weight from the model's config, no Dice term (the PyTorch peer has none). Timings mean nothing
across machines; a ratio measured in one run on one machine, with the CPU recorded, does.
"""

from __future__ import annotations

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.configs import default as default_config
from experiments.configs import paper_split1 as paper_config
from tvunet_jax import losses
from tvunet_jax import models
from tvunet_jax import nifti_io
from tvunet_jax import phantom
from tvunet_jax import predict
from tvunet_jax import sharding
from tvunet_jax import train
from tvunet_jax.kernels import conv

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("experiments", "results", "benchmark.json")
DEFAULT_QUICK_OUT = os.path.join("experiments", "results", "benchmark_quick.json")
SCHEMA_VERSION = 1

MODEL_CONFIGS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "paper": paper_config.get_config,
    "demo": default_config.get_config,
}
# XLA_FLAGS per variant; see STACK.md, "Speed of a U-Net train step".
YNN_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce"
XLA_VARIANTS = {
    "default": "",
    "ynn": YNN_FLAGS,
    "onednn": "",
    "onednn_ynn": YNN_FLAGS,
    "onednn_direct": "",
}
# Who computes the convolutions in each variant (TVUNET_CONV_BACKEND of the child process); a
# variant asking for oneDNN where the library is not built records what actually ran ('xla').
CONV_BACKENDS = {"default": "xla", "ynn": "xla", "onednn": "onednn", "onednn_ynn": "onednn",
                 "onednn_direct": "onednn"}
# TVUNET_WINOGRAD of the child where a variant sets it (others inherit the caller's, default
# 'auto'): 'onednn_direct' is the oneDNN backend before the Winograd kernels, for A/B runs.
VARIANT_WINOGRAD = {"onednn_direct": "off"}
# The per-layer conv table is measured where each backend is at its best (it takes minutes).
CONV_OPS_VARIANTS = ("ynn", "onednn")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8")
DTYPES = ("float32", "bfloat16")
# Fields every record has; tests/test_benchmark.py holds the format to them.
RECORD_FIELDS = ("model", "dtype", "batch", "conv_backend", "xla_variant", "xla_flags",
                 "jax_img_s", "torch_img_s", "ratio", "cpu_model", "isa_flags")
IMAGE_SIZE = 128
MODEL_FLOPS_NOTE = "3 x forward FLOPs of every convolution (bias, BN, ReLU, pool, loss excluded)"


# ============================================================================ the plan


@dataclasses.dataclass
class Plan:
  """What one run measures; written to JSON for the child processes."""
  mode: str  # "quick" or "full"
  models: list[str]
  batches: list[int]
  dtypes: list[str]
  variants: list[str]
  warmup: int  # untimed train steps after compilation
  steps: int  # timed train steps
  torch: bool
  matmul_n: int = 4096
  # bf16 matmul size on a CPU without bf16 arithmetic, where PyTorch's bf16 matmul runs near
  # 1 GFLOP/s (a 4096 one would take minutes per repetition); None: matmul_n
  bf16_matmul_n: int | None = None
  matmul_reps: int = 3
  volume_size: int = 512
  volume_slices: int = 100
  infer_batch: int = 8
  infer_reps: int = 2  # timed end-to-end volume runs
  # timed network-only runs of the 100 slices, JAX and PyTorch alternating (after one untimed
  # each): the JAX / PyTorch ratio is the median of the pairs' ratios
  network_reps: int = 5
  conv_ops: bool = True  # the per-layer convolution table (forward, input grad, weight grad)
  pipeline_tr_slices: int = 64
  pipeline_batch: int = 8
  pipeline_batches: int = 25
  volume_path: str = ""  # filled in by the parent before the children start


def make_plan(quick: bool, *, models: Sequence[str] | None = None,
              batches: Sequence[int] | None = None, dtypes: Sequence[str] | None = None,
              variants: Sequence[str] | None = None, steps: int | None = None,
              warmup: int | None = None, torch: bool = True) -> Plan:
  """The quick (CI) or full plan, with optional overrides; raises ValueError on unknown names."""
  if quick:
    plan = Plan(mode="quick", models=["demo"], batches=[4], dtypes=["float32"],
                variants=["default"], warmup=1, steps=3, torch=torch, matmul_reps=2,
                volume_size=128, volume_slices=4, infer_batch=4, infer_reps=1, network_reps=1,
                conv_ops=False,
                pipeline_tr_slices=16, pipeline_batch=4, pipeline_batches=5)
  else:
    plan = Plan(mode="full", models=["paper", "demo"], batches=[8, 16], dtypes=["float32"],
                variants=list(XLA_VARIANTS), warmup=1, steps=5, torch=torch)
  if quick and conv.available():  # the smoke run exercises the kernels where they are built
    plan.variants = ["default", "onednn"]
  for name, value in (("models", models), ("batches", batches), ("dtypes", dtypes),
                      ("variants", variants)):
    if value:
      setattr(plan, name, list(value))
  plan.steps = plan.steps if steps is None else steps
  plan.warmup = plan.warmup if warmup is None else warmup
  _check_plan(plan)
  return plan


def _check_plan(plan: Plan) -> None:
  for name, allowed in (("models", MODEL_CONFIGS), ("dtypes", DTYPES), ("variants", XLA_VARIANTS)):
    bad = [v for v in getattr(plan, name) if v not in allowed]
    if bad:
      raise ValueError(f"benchmark: unknown {name} {bad}; choose from {sorted(allowed)}")
  if any(b < 1 for b in plan.batches) or plan.steps < 1 or plan.warmup < 0:
    raise ValueError(f"benchmark: batches and steps must be >= 1 and warmup >= 0, got "
                     f"batches={plan.batches}, steps={plan.steps}, warmup={plan.warmup}")


# ============================================================================ environment


def cpu_info(cpuinfo_text: str | None = None) -> dict[str, Any]:
  """CPU model, core count and ISA flags of this machine (from /proc/cpuinfo on Linux).

  Returns:
    {"cpu_model": str, "cores": int (usable by this process), "isa_flags": {flag: bool}} for the
    flags in `ISA_FLAGS`.
  """
  if cpuinfo_text is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo_text = f.read()
    except OSError:
      cpuinfo_text = ""
  model, flags = "", set()
  for line in cpuinfo_text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and not model:
      model = value.strip()
    elif key == "flags" and not flags:
      flags = set(value.split())
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu_model": model or platform.processor() or "unknown", "cores": cores,
          "isa_flags": {f: f in flags for f in ISA_FLAGS}}


def _git(*args: str) -> str:
  try:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def environment() -> dict[str, Any]:
  """Commit, versions, CPU and load of this machine (no JAX backend is started here)."""
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "grain", "tensorflow-datasets",
              "torch"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = None
  return {
      "commit": _git("rev-parse", "HEAD") or "unknown",
      # Tracked files with uncommitted changes: the numbers may not belong to `commit` alone.
      "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "versions": versions,
      **cpu_info(),
      "load_avg_start": list(os.getloadavg()),
  }


def busy_cpu_seconds(proc_stat_text: str, ticks_per_s: float) -> float:
  """CPU-seconds all CPUs spent busy since boot, from /proc/stat's first ('cpu ') line.

  Busy = user + nice + system + irq + softirq + steal (time a hypervisor gave to other guests
  counts: it is contention too); idle and iowait are not.
  """
  fields = proc_stat_text.splitlines()[0].split()
  if fields[0] != "cpu":
    raise ValueError(f"/proc/stat: first line is not the 'cpu' total: {fields[:3]}")
  user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
  return (user + nice + system + irq + softirq + steal) / ticks_per_s


class ForeignLoad:
  """Share of the machine's CPU time used by *other* processes while a block runs (Linux).

  The load average counts this benchmark's own threads and says nothing about one interval;
  this compares the machine's busy time with this process's own CPU time over the block:
  (busy - own) / (wall x cores). 0 means the measurement had the machine to itself.
  """

  def __enter__(self) -> "ForeignLoad":
    self.share = None
    self._start = self._read()
    return self

  def __exit__(self, *exc) -> None:
    end = self._read()
    if self._start and end:
      busy, own, wall = (e - s for e, s in zip(end, self._start))
      self.share = max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else None

  @staticmethod
  def _read() -> tuple[float, float, float] | None:
    try:
      with open("/proc/stat") as f:
        busy = busy_cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
      return None
    t = os.times()
    return busy, t.user + t.system, time.monotonic()


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _log(msg: str) -> None:
  print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def _timed(fn: Callable[[], Any], warmup: int, reps: int) -> list[float]:
  """Seconds of `reps` calls of `fn` (which must synchronise) after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


# ============================================================================ FLOPs


def unet_forward_flops(params: Mapping[str, Any], image_hw: tuple[int, int], depth: int) -> int:
  """FLOPs (2 per multiply-add) of the convolutions of one image's forward pass through a UNet.

  Derived from the parameter tree of `tvunet_jax.models.UNet` (names `down_l`, `bottleneck`,
  `upsample_l`, `up_l`, `head`, each holding 'kernel' leaves (kh, kw, Cin, Cout)) and the level
  each module works at: a conv at resolution (h, w) costs 2 h w kh kw Cin Cout; the stride-2
  transposed conv `upsample_l` costs the same per *input* pixel (each input pixel meets all 9
  taps once), its input being at level l + 1. Border effects of 'SAME' padding are ignored, as
  usual for model FLOPs; the sub-pixel implementation's zero taps are not counted.

  Args:
    params: the 'params' tree (arrays or `jax.ShapeDtypeStruct`s).
    image_hw: input (H, W).
    depth: the model's number of down-samplings.

  Returns:
    Forward FLOPs per image (int). A train step costs about 3x this per image (forward, input
    gradient, weight gradient).
  """
  h, w = image_hw
  total = 0
  for name, module in params.items():
    if name.startswith("down_") or name.startswith("up_"):
      level = int(name.split("_")[1])
    elif name.startswith("upsample_"):
      level = int(name.split("_")[1]) + 1
    elif name == "bottleneck":
      level = depth
    elif name == "head":
      level = 0
    else:
      raise ValueError(f"unet_forward_flops: unknown module {name!r} in the parameter tree")
    pixels = (h // 2**level) * (w // 2**level)
    for path, leaf in jax.tree_util.tree_flatten_with_path(module)[0]:
      if getattr(path[-1], "key", None) == "kernel":
        kh, kw, cin, cout = leaf.shape
        total += 2 * pixels * kh * kw * cin * cout
  return total


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", math.nan))


# ============================================================================ the two steps


def model_config(name: str, dtype: str = "float32") -> ml_collections.ConfigDict:
  """The experiment config of `name` ('paper' or 'demo') with the model's compute dtype set."""
  config = MODEL_CONFIGS[name]()
  config.unlock()
  config.model.dtype = dtype
  return config


def bench_loss_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """BCE + tv_weight * anisotropic mean-TV: the loss the PyTorch peer also computes."""
  return ml_collections.ConfigDict({"tv_weight": float(config.loss.tv_weight),
                                    "tv_reduction": "mean", "tv_kind": "anisotropic",
                                    "dice_weight": 0.0})


def _random_batch(batch: int, num_outputs: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  image = rng.random((batch, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
  label = (rng.random((batch, IMAGE_SIZE, IMAGE_SIZE, num_outputs)) < 0.1).astype(np.float32)
  return {"image": image, "label": label}


def _seconds(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


class JaxStep:
  """The project's train step, jitted as `train.train_and_evaluate` does it, on one device.

  Construction traces and compiles (timed); each call runs one synchronised step on a fixed
  random batch, the state donated and replaced.
  """

  def __init__(self, model_name: str, batch: int, dtype: str):
    config = model_config(model_name, dtype)
    self.model_name, self.batch, self.dtype, self.config = model_name, batch, dtype, config
    self.model = models.build(config.model)
    tx = train.make_optimizer(config.train.learning_rate)
    mesh = sharding.make_mesh(1)
    init_fn = functools.partial(train.create_state, model=self.model, tx=tx,
                                image_shape=(IMAGE_SIZE, IMAGE_SIZE, 1))
    rng = jax.random.PRNGKey(0)
    self.abstract = jax.eval_shape(init_fn, rng)
    state_sh = sharding.state_shardings(mesh, self.abstract)
    batch_sh = sharding.batch_sharding(mesh)
    self.state = jax.jit(init_fn, out_shardings=state_sh)(rng)
    step_fn = jax.jit(
        functools.partial(train.train_step, model=self.model, tx=tx,
                          loss_cfg=bench_loss_config(config), accum=1, n_devices=1),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0)
    self.data = jax.device_put(_random_batch(batch, config.model.num_outputs), batch_sh)
    t0 = time.perf_counter()
    lowered = step_fn.lower(self.state, self.data)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    self.trace_s, self.compile_s = t1 - t0, time.perf_counter() - t1
    self.flops = _xla_flops(self.compiled)
    self.metrics = None

  def __call__(self) -> None:
    self.state, self.metrics = self.compiled(self.state, self.data)
    jax.block_until_ready((self.state, self.metrics))

  def variables(self) -> dict[str, Any]:
    return {"params": self.state.params, "batch_stats": self.state.batch_stats}

  def tv_seconds(self) -> float:
    """Median time of the TV term's value and gradient alone, on logits of the step's shape."""
    f = jax.jit(jax.value_and_grad(lambda lg: losses.anisotropic_tv(jax.nn.sigmoid(lg), "mean")))
    logits = jax.random.normal(jax.random.PRNGKey(1), (self.batch, IMAGE_SIZE, IMAGE_SIZE,
                                                       self.config.model.num_outputs))
    return _median(_timed(lambda: jax.block_until_ready(f(logits)), 2, 10))

  def summary(self, times: Sequence[float]) -> dict[str, Any]:
    m = self.config.model
    step_s = _median(times)
    params = self.abstract.params
    model_flops = 3 * unet_forward_flops(params, (IMAGE_SIZE, IMAGE_SIZE), m.depth)
    tv_s = self.tv_seconds()
    return {
        "model": self.model_name, "dtype": self.dtype, "batch": self.batch,
        "base": m.base, "depth": m.depth, "num_outputs": m.num_outputs,
        "params": _count(params), "batch_stats": _count(self.abstract.batch_stats),
        "jax_trace_s": self.trace_s, "jax_compile_s": self.compile_s,
        "jax_step_s": list(times), "jax_step_s_median": step_s, "jax_img_s": self.batch / step_s,
        "xla_gflop_per_step": self.flops / 1e9, "xla_gflop_per_img": self.flops / self.batch / 1e9,
        "model_gflop_per_img": model_flops / 1e9, "jax_gflops": self.flops / step_s / 1e9,
        "jax_tv_s": tv_s, "jax_tv_share": tv_s / step_s,
        "jax_loss_finite": bool(np.isfinite(float(self.metrics["loss"]))),
    }


class TorchStep:
  """The PyTorch peer's train step (channels_last; bf16 autocast for 'bfloat16') on one batch."""

  def __init__(self, model_name: str, batch: int, dtype: str):
    import torch  # pylint: disable=g-import-not-at-top
    from experiments import torch_unet  # pylint: disable=g-import-not-at-top
    self.torch, self.lib = torch, torch_unet
    config = model_config(model_name)
    m = config.model
    self.batch, self.num_outputs = batch, m.num_outputs
    net = torch_unet.TorchUNet(m.base, m.depth, m.dropout, m.num_outputs,
                               bn_momentum=1.0 - m.get("bn_momentum", 0.99))
    self.net = net.to(memory_format=torch.channels_last)
    self.opt = torch_unet.make_optimizer(self.net, config.train.learning_rate)
    data = _random_batch(batch, m.num_outputs)
    # (B, H, W, C) -> (B, C, H, W) logical shape, channels_last in memory.
    to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    self.x, self.y = to_torch(data["image"]), to_torch(data["label"])
    self.autocast = torch.bfloat16 if dtype == "bfloat16" else None
    self.tv_weight = float(config.loss.tv_weight)
    self.loss = math.nan

  def __call__(self) -> None:
    loss = self.lib.train_step(self.net, self.opt, self.x, self.y, tv_weight=self.tv_weight,
                               autocast_dtype=self.autocast)
    self.loss = float(loss)

  def tv_seconds(self) -> float:
    torch = self.torch
    logits = torch.randn(self.batch, self.num_outputs, IMAGE_SIZE, IMAGE_SIZE).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)

    def tv():
      logits.grad = None
      self.lib.anisotropic_tv(torch.sigmoid(logits)).backward()

    return _median(_timed(tv, 2, 10))

  def summary(self, times: Sequence[float]) -> dict[str, Any]:
    step_s = _median(times)
    tv_s = self.tv_seconds()
    params, stats = self.lib.count_params(self.net)
    return {"torch_params": params, "torch_batch_stats": stats, "torch_step_s": list(times),
            "torch_step_s_median": step_s, "torch_img_s": self.batch / step_s,
            "torch_tv_s": tv_s, "torch_tv_share": tv_s / step_s,
            "torch_loss_finite": bool(np.isfinite(self.loss))}


def _count(tree: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def measure_train(model_name: str, batch: int, dtype: str, plan: Plan, with_torch: bool
                  ) -> tuple[dict[str, Any], JaxStep]:
  """JAX and PyTorch train steps of one (model, dtype, batch), timed alternately.

  Steps alternate (JAX, PyTorch, JAX, ...) so that both frameworks see the same background load
  on a shared machine; each list of step times gives its median.
  """
  jx = JaxStep(model_name, batch, dtype)
  tr = TorchStep(model_name, batch, dtype) if with_torch else None
  for _ in range(plan.warmup):
    jx()
    if tr:
      tr()
  jax_times, torch_times = [], []
  with ForeignLoad() as foreign:
    for _ in range(plan.steps):
      jax_times.append(_seconds(jx))
      if tr:
        torch_times.append(_seconds(tr))
  record = jx.summary(jax_times)
  record.update(tr.summary(torch_times) if tr else {"torch_img_s": None})
  record["foreign_cpu_share"] = foreign.share
  record["load_avg"] = list(os.getloadavg())
  record["rss_mb_after"] = peak_rss_mb()
  return record, jx


def matmul_gflops(n: int, dtype: str, reps: int, with_torch: bool) -> dict[str, float]:
  """GFLOP/s of an (n, n) @ (n, n) product in JAX (float32 accumulation, XLA's fast form for
  bf16) and PyTorch, timed alternately; {"jax": ..., "torch": ...}."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  calls = {"jax": lambda: jax.block_until_ready(f(a, b))}
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    # np.array copies: a view of a jax.Array is read-only, which torch.from_numpy warns about.
    ta, tb = (torch.from_numpy(np.array(m, np.float32)).to(getattr(torch, dtype)) for m in (a, b))
    calls["torch"] = lambda: torch.mm(ta, tb)
  times: dict[str, list[float]] = {k: [] for k in calls}
  with ForeignLoad() as foreign:
    for i in range(1 + reps):  # the first round warms up
      for k, fn in calls.items():
        dt = _seconds(fn)
        if i:
          times[k].append(dt)
  return {**{k: 2.0 * n**3 / _median(v) / 1e9 for k, v in times.items()},
          "foreign_cpu_share": foreign.share}


def jax_inference(model_name: str, model: Any, variables: Any, plan: Plan,
                  with_torch: bool) -> dict[str, Any]:
  """Slices/s of `predict.segment_volume` on the plan's phantom volume, and of the network alone
  beside the PyTorch peer's (when `with_torch`), the two timed alternately."""
  config = model_config(model_name, "float32")
  contract = train.model_contract(config, (IMAGE_SIZE, IMAGE_SIZE))
  predictor = predict.SlicePredictor(model, variables, mesh=sharding.make_mesh(1),
                                     batch_size=plan.infer_batch)

  def run():
    return predict.segment_volume(plan.volume_path, model, variables, contract,
                                  predictor=predictor)

  t0 = time.perf_counter()
  seg = run()  # compiles
  first_s = time.perf_counter() - t0
  x = predict.network_inputs(np.moveaxis(seg.display_hu, 2, 0), contract)  # (Z, 128, 128)
  z = x.shape[0]
  peer = torch_network(model_name, z, plan) if with_torch else None
  with ForeignLoad() as foreign:
    volume_s = _timed(run, 0, plan.infer_reps)
    network_s, torch_s = _alternating(lambda: predictor(x), peer, plan.network_reps)
  out = {"model": model_name, "volume_shape": list(seg.file_shape),
         "batch_size": predictor.batch_size, "first_call_s": first_s,
         "volume_s": volume_s, "slices_s_volume": z / _median(volume_s),
         "network_s": network_s, "slices_s_network": z / _median(network_s),
         "foreign_cpu_share": foreign.share, "rss_mb_after": peak_rss_mb()}
  if peer:
    out.update({"torch_network_s": torch_s, "torch_slices_s_network": z / _median(torch_s),
                # per pair: both sides saw the same minute of the machine
                "ratio_network": _median([t / j for j, t in zip(network_s, torch_s)])})
  return out


def _alternating(a: Callable[[], Any], b: Callable[[], Any] | None, reps: int
                 ) -> tuple[list[float], list[float]]:
  """Seconds of `reps` calls each of `a` and `b` (None: `a` alone), after one untimed call each,
  in the order a b, b a, a b, ... so that neither side always runs first."""
  fns = [a] if b is None else [a, b]
  for fn in fns:
    fn()
  times: list[list[float]] = [[] for _ in fns]
  for i in range(reps):
    order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
    for k in order:
      times[k].append(_seconds(fns[k]))
  return times[0], (times[1] if b is not None else [])


def torch_network(model_name: str, slices: int, plan: Plan) -> Callable[[], None]:
  """A call running the PyTorch peer's network alone (eval mode, inference_mode, channels_last) on
  `slices` random 128x128 inputs in batches of `plan.infer_batch`: the peer of JAX's
  network-only rate."""
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  m = model_config(model_name).model
  net = torch_unet.TorchUNet(m.base, m.depth, m.dropout, m.num_outputs).to(
      memory_format=torch.channels_last).eval()
  x = torch.rand(slices, 1, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)

  def run():
    with torch.inference_mode():
      for i in range(0, slices, plan.infer_batch):
        torch.sigmoid(net(x[i:i + plan.infer_batch])[:, 0])

  return run


def conv_layers(batch: int = 8, base: int = 64, depth: int = 4, size: int = IMAGE_SIZE
                ) -> list[dict[str, Any]]:
  """The paper model's distinct convolutions: names, x (N, H, W, Ci), w (KH, KW, Ci, Co), pads.

  Mirrors `models.UNet` (blocks of two 3x3 'SAME' convs, a 1x1 head) from `models.UNet`'s
  parameter shapes; the up-sampling layers are listed as what they are, 3x3 stride-2 'SAME'
  transposed convs (`"transposed": True`, `pads` in oneDNN's convention, (0, 1, 0, 1)), which
  `conv_op_table` times in the form each backend runs. Layers of equal shape are listed once.
  """
  model = models.UNet(base=base, depth=depth, num_outputs=2, conv_backend="xla")
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))["params"]
  out: dict[tuple, list[str]] = {}
  for block, params in shapes.items():
    kernels = ({f"{block}.{k}": v["kernel"].shape for k, v in params.items() if "kernel" in v}
               if "kernel" not in params else {block: params["kernel"].shape})
    for name, (kh, kw, ci, co) in kernels.items():
      if block.startswith("upsample_"):
        r = size >> (int(block.split("_")[1]) + 1)
        # the up-sampling: SAME, stride 2, with the pads in oneDNN's convention (what it gets)
        pads = conv.onednn_transpose_pads("SAME", (kh, kw), 2)
        key = ((batch, r, r, ci), (kh, kw, ci, co), pads, True)
      else:
        level = depth if block == "bottleneck" else (0 if block == "head" else
                                                     int(block.split("_")[1]))
        r = size >> level
        pad = (kh // 2, kh // 2, kw // 2, kw // 2)
        key = ((batch, r, r, ci), (kh, kw, ci, co), pad, False)
      out.setdefault(key, []).append(name)
  return [{"layers": names, "x": list(x), "w": list(w), "pads": list(p), "transposed": t}
          for (x, w, p, t), names in out.items()]


def _torch_conv_ops(x_shape, w_shape, pads, transposed: bool) -> dict[str, float]:
  """Median ms of PyTorch's forward, input grad and weight grad for one layer (channels_last).

  For the up-sampling (`transposed`) the peer's own layer is timed: ConvTranspose2d(3, stride 2,
  padding 1, output_padding 1) from Ci to Co channels.
  """
  import torch  # pylint: disable=g-import-not-at-top
  n, h, w_, ci = x_shape
  kh, kw, _, co = w_shape
  cl = torch.channels_last
  x = torch.randn(n, ci, h, w_).contiguous(memory_format=cl)
  if transposed:
    weight = torch.randn(ci, co, 3, 3).contiguous(memory_format=cl)
    kwargs = dict(stride=[2, 2], padding=[1, 1], dilation=[1, 1], transposed=True,
                  output_padding=[1, 1], groups=1)
    y = torch.nn.functional.conv_transpose2d(x, weight, stride=2, padding=1, output_padding=1)
  else:
    weight = torch.randn(co, ci, kh, kw).contiguous(memory_format=cl)
    kwargs = dict(stride=[1, 1], padding=[pads[0], pads[2]], dilation=[1, 1], transposed=False,
                  output_padding=[0, 0], groups=1)
    y = torch.nn.functional.conv2d(x, weight, padding=(pads[0], pads[2]))
  dy = torch.randn_like(y).contiguous(memory_format=cl)
  conv_bwd = torch.ops.aten.convolution_backward
  ops = {
      "forward": lambda: torch.ops.aten.convolution(x, weight, None, **kwargs),
      "input_grad": lambda: conv_bwd(dy, x, weight, None, output_mask=[True, False, False],
                                     **kwargs),
      "weight_grad": lambda: conv_bwd(dy, x, weight, None, output_mask=[False, True, False],
                                      **kwargs),
  }
  with torch.no_grad():
    return {k: 1e3 * _median(_timed(f, 1, 3)) for k, f in ops.items()}


def _ops_ms(ops: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]]) -> dict[str, float]:
  """Median ms of each jitted (function, arguments) of `ops` (1 warm-up, 3 timed calls)."""
  calls = {k: (lambda fn=jax.jit(fn), args=args: jax.block_until_ready(fn(*args)))
           for k, (fn, args) in ops.items()}
  return {k: 1e3 * _median(_timed(c, 1, 3)) for k, c in calls.items()}


def conv_op_table(backend: str, with_torch: bool, batch: int = 8) -> list[dict[str, Any]]:
  """Per layer shape of the paper model: ms of forward, input grad and weight grad on `backend`
  ('onednn': the kernels alone; 'xla': `lax.conv_general_dilated` and its linear transposes,
  so no forward is recomputed), with PyTorch's at the same shapes when `with_torch`.

  Each layer is timed in the form the backend runs in the model: the up-sampling as oneDNN's
  transposed conv on 'onednn', as the sub-pixel 2x2 conv (to 4x the channels, before the
  depth-to-space) on 'xla'; `form` says which.
  """
  rows = []
  rng = np.random.default_rng(0)
  for layer in conv_layers(batch):
    pads, x_shape, w_shape = tuple(layer["pads"]), layer["x"], layer["w"]
    transposed, stride = layer["transposed"], None
    form = "conv"
    if backend == "onednn" and all(re.fullmatch(r"up_\d+\.conv_0", n) for n in layer["layers"]):
      # models.ConcatInputConv: on oneDNN the model runs this wide conv as two half-width ones
      # (the shape of the level's conv_1 row); the row keeps the wide conv for the comparison.
      form = "wide conv (the model runs 2 x its conv_1 shape instead)"
    if transposed and backend == "onednn":
      form, stride = "transposed conv, stride 2", 2
    elif transposed:  # XLA runs the sub-pixel form: a 2x2 conv to 4x the width
      form, pads = "sub-pixel 2x2 conv", (1, 0, 1, 0)
      w_shape = [2, 2, w_shape[2], 4 * w_shape[3]]
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
    pad_pairs = ((pads[0], pads[1]), (pads[2], pads[3]))
    f = lambda x, w: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
        x, w, (1, 1), pad_pairs, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # Every array is an argument of the jitted function, never a closed-over constant that XLA
    # could fold into the program.
    forward = f
    if stride:
      forward = lambda a, b: conv.onednn_conv_transpose(a, b, stride, pads)
    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(forward, x, w).shape, np.float32))
    if backend == "onednn":
      ops = conv.onednn_ops(x, w, dy, pads, stride)
    else:
      ops = {"forward": (f, (x, w)),
             "input_grad": (lambda dy, w: jax.linear_transpose(lambda a: f(a, w), x)(dy)[0],
                            (dy, w)),
             "weight_grad": (lambda x, dy: jax.linear_transpose(lambda b: f(x, b), w)(dy)[0],
                             (x, dy))}
    row = {**layer, "backend": backend, "form": form, "jax_ms": _ops_ms(ops)}
    if (backend == "onednn" and not stride and tuple(w_shape[:2]) == (3, 3)
        and pads == (1, 1, 1, 1)):
      # The Winograd kernels at the same shape, and whether the model runs them there (one
      # device): the measurement behind `conv.use_winograd`'s rule.
      row["winograd_ms"] = _ops_ms(conv.winograd_ops(x, w, dy))
      # A wide up-block row is not run as such (the model runs two of its conv_1 shape).
      row["winograd_in_model"] = form == "conv" and conv.use_winograd(x_shape, w_shape,
                                                                       jnp.float32, pads)
    if backend == "onednn":
      first = 3 if stride else 0
      row["onednn_impl"] = {
          k: conv.impl_info(first + i, jnp.float32, x_shape, w_shape, pads, stride or 1)
          for i, k in enumerate(("forward", "input_grad", "weight_grad"))}
    if with_torch:
      row["torch_ms"] = _torch_conv_ops(layer["x"], layer["w"], tuple(layer["pads"]), transposed)
    rows.append(row)
    _log(f"  {'+'.join(layer['layers'])}: " + ", ".join(
        f"{k} {v:.1f}" for k, v in row["jax_ms"].items()) + " ms" + (
            "; torch " + ", ".join(f"{v:.1f}" for v in row["torch_ms"].values())
            if with_torch else ""))
  return rows


def _torch_status(plan: Plan) -> dict[str, Any]:
  """{"version", "threads", "memory_format"} after setting the threads, or {"error": why not}."""
  if not plan.torch:
    return {"error": "skipped (--no_torch)"}
  if importlib.util.find_spec("torch") is None:
    return {"error": "torch not installed (pip install -e '.[bench]')"}
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return {"version": torch.__version__, "threads": torch_unet.set_threads(),
          "memory_format": "channels_last"}


def run_variant(name: str, plan: Plan) -> dict[str, Any]:
  """Every JAX and PyTorch measurement of the plan under this process's XLA flags (a child)."""
  # Compile times must be real compilations, not persistent-cache reads.
  jax.config.update("jax_enable_compilation_cache", False)
  torch_info = _torch_status(plan)
  with_torch = "error" not in torch_info
  out: dict[str, Any] = {
      "variant": name, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "malloc": host_memory.status(),
      "conv_backend": conv.resolve("auto"), "onednn_version": conv.onednn_version(),
      "winograd": conv.winograd_mode() if conv.resolve("auto") == "onednn" else None,
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "torch": torch_info, "matmul_gflops": {}, "train": [],
      "inference": [],
  }
  for dtype in plan.dtypes:
    n = plan.bf16_matmul_n if dtype == "bfloat16" and plan.bf16_matmul_n else plan.matmul_n
    out.setdefault("matmul_n", {})[dtype] = n
    gflops = matmul_gflops(n, dtype, plan.matmul_reps, with_torch)
    out.setdefault("matmul_foreign_cpu_share", {})[dtype] = gflops.pop("foreign_cpu_share")
    out["matmul_gflops"][dtype] = gflops
    _log(f"{name}: matmul {dtype} GFLOP/s " + ", ".join(f"{k} {v:.1f}" for k, v in gflops.items())
         + f"; other processes used {_pct(out['matmul_foreign_cpu_share'][dtype])} of the CPU")
  for model_name in plan.models:
    kept = None
    for dtype in plan.dtypes:
      for batch in plan.batches:
        rec, jx = measure_train(model_name, batch, dtype, plan, with_torch)
        out["train"].append(rec)
        if kept is None:
          kept = (jx.model, jx.variables())
        _log(f"{name}: {model_name} {dtype} b{batch}: JAX {rec['jax_img_s']:.2f} img/s (compile "
             f"{rec['jax_compile_s']:.1f} s), PyTorch {_fmt(rec['torch_img_s'])} img/s; other "
             f"processes used {_pct(rec['foreign_cpu_share'])} of the CPU")
        del jx
    if plan.volume_path:
      inf = jax_inference(model_name, *kept, plan, with_torch)
      inf["dtype"] = plan.dtypes[0]
      out["inference"].append(inf)
      _log(f"{name}: inference {model_name}: {inf['slices_s_volume']:.2f} slices/s end to end")
  if plan.conv_ops and name in CONV_OPS_VARIANTS:
    _log(f"{name}: per-layer convolutions")
    out["conv_ops"] = conv_op_table(out["conv_backend"], with_torch)
  out["peak_rss_mb"] = peak_rss_mb()
  return out


def _child_xla_flags(variant: str) -> str:
  # A forced fake-device count (the test suite's) would only split the same cores.
  inherited = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if "xla_force_host_platform_device_count" not in f]
  return " ".join(inherited + XLA_VARIANTS[variant].split())


def spawn_variant(name: str, plan: Plan, workdir: str, timeout_s: float = 4 * 3600) -> dict:
  """Runs `run_variant(name)` in a child process with that variant's XLA_FLAGS."""
  plan_path = os.path.join(workdir, "plan.json")
  out_path = os.path.join(workdir, f"variant-{name}.json")
  with open(plan_path, "w") as f:
    json.dump(dataclasses.asdict(plan), f)
  env = dict(os.environ)
  env["XLA_FLAGS"] = _child_xla_flags(name)
  env[conv.ENV_BACKEND] = CONV_BACKENDS[name]
  if name in VARIANT_WINOGRAD:
    env[conv.ENV_WINOGRAD] = VARIANT_WINOGRAD[name]
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "experiments.benchmark", "--variant", name, "--plan", plan_path,
         "--variant_out", out_path]
  _log(f"variant {name}: XLA_FLAGS={env['XLA_FLAGS']!r}, "
       f"{conv.ENV_BACKEND}={env[conv.ENV_BACKEND]}")
  try:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"variant": name, "error": f"timed out after {timeout_s:.0f} s"}
  if proc.returncode != 0 or not os.path.exists(out_path):
    return {"variant": name, "xla_flags": env["XLA_FLAGS"],
            "error": f"child process exited with code {proc.returncode} (see stderr above)"}
  with open(out_path) as f:
    return json.load(f)


# ============================================================================ data (parent)


def pipeline_part(plan: Plan, workdir: str) -> dict[str, Any]:
  """Training-input slices/s with one worker thread, pinned to one CPU, on a phantom dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tvunet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  manual_dir = os.path.join(workdir, "medseg_phantom")
  data_dir = os.path.join(workdir, "tfds")
  t0 = time.perf_counter()
  input_pipeline.prepare_dataset(
      manual_dir, data_dir, "paper_128",
      phantom=dict(tr_slices=plan.pipeline_tr_slices, tr_size=128, rp_size=128,
                   rp_slices=(4, 6), seed=0))
  build_s = time.perf_counter() - t0
  src = input_pipeline.load_split(data_dir, "paper_128", "train")
  cfg = default_config.get_config()
  aug = cfg.data.augment
  variants = {"augmented (demo config)": input_pipeline.Augment(
      aug.flip, aug.rotate_deg, aug.shift_px, aug.hu_jitter),
              "no augmentation (paper)": input_pipeline.Augment()}
  out: dict[str, Any] = {"dataset_slices": len(src), "batch": plan.pipeline_batch,
                         "batches": plan.pipeline_batches, "num_threads": 1,
                         "phantom_and_build_s": build_s, "slices_s": {}}
  cpus = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
  if cpus:
    # Threads inherit the creating thread's affinity: the iterator's worker is born pinned too.
    os.sched_setaffinity(0, {min(cpus)})
    out["pinned_cpu"] = min(cpus)
  try:
    for label, augment in variants.items():
      it = input_pipeline.TrainIterator(
          src, local_batch_size=plan.pipeline_batch, seed=0, target=cfg.data.target,
          intensity=cfg.data.intensity, augment=augment, sharding=None, process_index=0,
          process_count=1, num_threads=1, prefetch=1)
      next(it)  # opens the array_record readers
      t0 = time.perf_counter()
      for _ in range(plan.pipeline_batches):
        next(it)
      out["slices_s"][label] = plan.pipeline_batches * plan.pipeline_batch / (
          time.perf_counter() - t0)
      it.close()
  finally:
    if cpus:
      os.sched_setaffinity(0, cpus)
  return out


def write_volume(plan: Plan, workdir: str) -> str:
  """A phantom CT volume (size x size x slices, int16 HU, MedSeg storage layout); its path."""
  hu, _, _ = phantom.generate_volume(np.random.default_rng(0), plan.volume_size,
                                     plan.volume_slices, lesion=True)
  path = os.path.join(workdir, f"volume_{plan.volume_size}x{plan.volume_slices}.nii.gz")
  nifti_io.save_volume(nifti_io.to_storage(np.round(hu).astype(np.int16)),
                       phantom.affine_for(plan.volume_size, 350.0, 5.0), path)
  return path


# ============================================================================ results


def peak_gflops(variants: Sequence[Mapping]) -> dict[str, dict[str, float]]:
  """Per dtype: every measured matmul GFLOP/s ('<framework>_<variant>') and their max, 'peak'."""
  out: dict[str, dict[str, float]] = {}
  for v in variants:
    for dtype, table in v.get("matmul_gflops", {}).items():
      for framework, value in table.items():
        out.setdefault(dtype, {})[f"{framework}_{v['variant']}"] = float(value)
  for table in out.values():
    table["peak"] = max(table.values())
  return out


def make_records(env: Mapping, variants: Sequence[Mapping]) -> list[dict]:
  """One record per (model, dtype, batch, XLA variant), JAX and PyTorch numbers side by side.

  Args:
    env: `environment()` output (cpu_model, isa_flags).
    variants: `run_variant` outputs (those with an "error" are skipped). Each holds its own
      PyTorch numbers, measured alternately with the JAX steps of the same record.

  Returns:
    Records holding at least `RECORD_FIELDS`; `ratio` = jax_img_s / torch_img_s (None without
    PyTorch); `peak_gflops` = the largest matmul GFLOP/s of the dtype over the whole run;
    `jax_mfu` = XLA-counted FLOP/s over that peak; `*_mfu_model` use the analytic network FLOPs
    for both frameworks.
  """
  ok = [v for v in variants if "error" not in v]
  peaks = peak_gflops(ok)
  records = []
  for v in ok:
    for tr in v["train"]:
      peak = peaks.get(tr["dtype"], {}).get("peak")
      jax_img_s, torch_img_s = tr["jax_img_s"], tr.get("torch_img_s")
      model_gflop = tr["model_gflop_per_img"]
      records.append({
          "model": tr["model"], "dtype": tr["dtype"], "batch": tr["batch"],
          "conv_backend": v.get("conv_backend", "xla"), "winograd": v.get("winograd"),
          "xla_variant": v["variant"],
          "xla_flags": v["xla_flags"],
          "jax_img_s": jax_img_s, "torch_img_s": torch_img_s,
          "ratio": jax_img_s / torch_img_s if torch_img_s else None,
          "peak_gflops": peak,
          # XLA's cost analysis does not see inside custom calls: no XLA count with oneDNN.
          "jax_mfu": (tr["jax_gflops"] / peak if peak and v.get("conv_backend", "xla") == "xla"
                      else None),
          "jax_mfu_model": jax_img_s * model_gflop / peak if peak else None,
          "torch_mfu_model": torch_img_s * model_gflop / peak if peak and torch_img_s else None,
          "params_match": (tr["torch_params"] == tr["params"]) if torch_img_s else None,
          **{k: val for k, val in tr.items() if k not in ("model", "dtype", "batch")},
          # XLA's cost analysis does not see inside the oneDNN custom calls.
          **({"jax_gflops": None, "xla_gflop_per_img": None}
             if v.get("conv_backend", "xla") != "xla" else {}),
          "device_kind": v.get("device_kind"),
          "cpu_model": env["cpu_model"], "isa_flags": dict(env["isa_flags"]),
      })
  return records


def _fmt(x: Any, digits: int = 2) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def _convs(record: Mapping[str, Any]) -> str:
  """'xla', 'onednn', or 'onednn + winograd auto' (the TVUNET_WINOGRAD mode, when not off)."""
  backend, mode = record.get("conv_backend", "xla"), record.get("winograd")
  return f"{backend} + winograd {mode}" if backend == "onednn" and mode not in (None, "off") else (
      backend)


def _winograd_cell(row: Mapping[str, Any]) -> str:
  """'fwd / input grad / weight grad ms' of the Winograd kernels, '(the model's)' where
  `conv.use_winograd` picks them; '-' where not timed."""
  d = row.get("winograd_ms")
  if not d:
    return "-"
  ms = " / ".join(_fmt(d.get(k), 1) for k in ("forward", "input_grad", "weight_grad"))
  return ms + (" (the model's)" if row.get("winograd_in_model") else "")


def to_markdown(results: Mapping[str, Any]) -> str:
  """The human-readable tables of a results dict (as written to results.json)."""
  env = results["environment"]
  plan = results["plan"]
  isa = ", ".join(f for f, on in env["isa_flags"].items() if on) or "none of " + ", ".join(
      env["isa_flags"])
  lines = [
      "# TV-UNet benchmark",
      "",
      f"`{results['command']}`: {results['mode']} run, {results['started_utc']}, "
      f"{results['duration_s']:.0f} s wall clock.",
      "",
      f"- commit `{env['commit'][:12]}`{' (uncommitted changes)' if env['dirty'] else ''}; "
      + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
      f"- CPU: {env['cpu_model']}, {env['cores']} cores; ISA: {isa}; device kind "
      f"{results.get('device_kind', '-')}",
      f"- load average (1, 5, 15 min) at start {_fmt_load(env['load_avg_start'])}, at end "
      f"{_fmt_load(results.get('load_avg_end'))}",
      f"- train steps: median of {plan['steps']} timed after {plan['warmup']} warm-up, 128x128, "
      "random data, BCE + TV, Adam; PyTorch: channels_last, "
      f"{results['torch'].get('threads', '-')} threads",
      "- host malloc policy (`tvunet_jax/host_memory.py`, JAX and PyTorch alike): " + (
          ", ".join(f"{v} {m}" for v, m in results.get("malloc", {}).items()) or "system"),
      "",
      "## Train step",
      "",
      "| model | dtype | batch | variant | convs | JAX img/s | trace + compile s | PyTorch img/s "
      "| JAX / PyTorch | GFLOP/img XLA / model | JAX GFLOP/s | MFU JAX (XLA count) "
      "| MFU JAX / PyTorch (model) | TV share JAX / PyTorch | other processes' CPU |",
      "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["records"]:
    lines.append(
        f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['xla_variant']} "
        f"| {_convs(r)} | {_fmt(r['jax_img_s'])} | {_fmt(_total_compile_s(r), 1)} "
        f"| {_fmt(r['torch_img_s'])} | {_fmt(r['ratio'])} "
        f"| {_fmt(r.get('xla_gflop_per_img'), 1)} / {_fmt(r.get('model_gflop_per_img'), 1)} "
        f"| {_fmt(r.get('jax_gflops'), 1)} | {_pct(r.get('jax_mfu'))} "
        f"| {_pct(r.get('jax_mfu_model'))} / {_pct(r.get('torch_mfu_model'))} "
        f"| {_pct(r.get('jax_tv_share'))} / {_pct(r.get('torch_tv_share'))} "
        f"| {_pct(r.get('foreign_cpu_share'))} |")
  if any("winograd" in _convs(r) for r in results["records"]):
    lines += ["", "MFU (model) counts the direct convolution's FLOPs for every framework; where "
              "the Winograd kernels run (convs 'onednn + winograd') they do fewer "
              "multiplications, so there it measures throughput, not the hardware's "
              "utilisation."]
  bf16_n = plan.get("bf16_matmul_n")
  size = f"{plan['matmul_n']}x{plan['matmul_n']}" + (
      f"; bfloat16 {bf16_n}x{bf16_n}" if bf16_n and "bfloat16" in results["matmul_gflops"] else "")
  lines += ["", f"Matmul peak ({size}, GFLOP/s):", "",
            "| dtype | " + " | ".join(_peak_columns(results)) + " |",
            "|---|" + "---:|" * len(_peak_columns(results))]
  for dtype, table in results["matmul_gflops"].items():
    lines.append(f"| {dtype} | " + " | ".join(
        _fmt(table.get(c), 1) for c in _peak_columns(results)) + " |")
  foreign = results.get("matmul_foreign_cpu_share") or {}
  if foreign:
    lines += ["", "Other processes' share of the CPU during the matmuls: " + ", ".join(
        f"{v} {dtype} {_pct(share)}" for v, table in foreign.items()
        for dtype, share in (table or {}).items()) + "."]
  if results["inference"]:
    lines += ["", "## Inference (`predict.segment_volume` on a phantom volume)", "",
              "| model | variant | volume | batch | slices/s end to end | slices/s network "
              "| PyTorch slices/s network | network JAX / PyTorch | first call s "
              "| other processes' CPU |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    reps = plan.get("network_reps")
    with_peer = any(r.get("ratio_network") is not None for r in results["inference"])
    note = (f"Network alone: {reps} runs of JAX and PyTorch each, alternating; medians, and the "
            "median of the per-pair ratios." if reps and with_peer else "")
    for r in results["inference"]:
      lines.append(
          f"| {r['model']} | {r['xla_variant']} | {'x'.join(map(str, r['volume_shape']))} "
          f"| {r['batch_size']} | {_fmt(r['slices_s_volume'])} | {_fmt(r['slices_s_network'])} "
          f"| {_fmt(r.get('torch_slices_s_network'))} | {_fmt(r.get('ratio_network'))} "
          f"| {_fmt(r['first_call_s'], 1)} | {_pct(r.get('foreign_cpu_share'))} |")
    if note:
      lines += ["", note]
  conv_rows = [(v, row) for v, rows in (results.get("conv_ops") or {}).items() for row in rows]
  if conv_rows:
    lines += ["", "## Convolutions of the paper model, batch 8 (ms: forward / input grad / "
              "weight grad)", "",
              "| layers | x | w | variant | form (JAX) | JAX | PyTorch | oneDNN kernels "
              "| Winograd F(4x4, 3x3) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v, row in conv_rows:
      ms = lambda d: " / ".join(_fmt(d.get(k), 1) for k in ("forward", "input_grad",
                                                            "weight_grad")) if d else "-"
      lines.append(
          f"| {', '.join(row['layers'])} | {'x'.join(map(str, row['x']))} "
          f"| {'x'.join(map(str, row['w']))} | {v} ({row['backend']}) "
          f"| {row.get('form', 'conv')} | {ms(row['jax_ms'])} "
          f"| {ms(row.get('torch_ms'))} "
          f"| {' / '.join((row.get('onednn_impl') or {}).values()) or '-'} "
          f"| {_winograd_cell(row)} |")
  pipe = results.get("input_pipeline", {})
  if pipe.get("slices_s"):
    lines += ["", f"## Input pipeline (one thread pinned to one CPU, batch {pipe['batch']}, "
              f"{pipe['dataset_slices']}-slice phantom train split)", "",
              "| augmentation | slices/s |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v, 0)} |" for k, v in pipe["slices_s"].items()]
  lines += ["", "## Peak resident memory (MiB)", "", "| process | MiB |", "|---|---:|"]
  lines += [f"| {k} | {_fmt(v, 0)} |" for k, v in results["peak_rss_mb"].items()]
  if results.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {e}" for e in results["notes"]]
  if results.get("errors"):
    lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
  return "\n".join(lines) + "\n"


def _total_compile_s(record: Mapping) -> float | None:
  parts = [record.get("jax_trace_s"), record.get("jax_compile_s")]
  return None if any(p is None for p in parts) else float(sum(parts))


def _peak_columns(results: Mapping) -> list[str]:
  cols: list[str] = []
  for table in results["matmul_gflops"].values():
    cols += [c for c in table if c not in cols and c != "peak"]
  return cols + ["peak"]


def _pct(x: float | None) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _fmt_load(load: Sequence[float] | None) -> str:
  return "-" if not load else " / ".join(f"{v:.2f}" for v in load)


def _md_path(json_path: str) -> str:
  root, ext = os.path.splitext(json_path)
  return (root if ext == ".json" else json_path) + ".md"


def _write_atomic(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# ============================================================================ entry point


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="CI smoke run, < 2 minutes")
  p.add_argument("--out", default=None, help="results JSON path (markdown beside it, .md); "
                 f"default {DEFAULT_OUT} ({DEFAULT_QUICK_OUT} with --quick)")
  p.add_argument("--models", default="", help="comma-separated subset of: paper,demo")
  p.add_argument("--batches", default="", help="comma-separated batch sizes")
  p.add_argument("--dtypes", default="", help="comma-separated: float32,bfloat16")
  p.add_argument("--variants", default="",
                 help="comma-separated variants: default,ynn,onednn,onednn_ynn,onednn_direct")
  p.add_argument("--no_conv_ops", action="store_true", help="skip the per-layer conv table")
  p.add_argument("--steps", type=int, default=None, help="timed train steps")
  p.add_argument("--warmup", type=int, default=None, help="untimed train steps")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  p.add_argument("--no_pipeline", action="store_true", help="skip the input-pipeline measurement")
  # Internal: a child process measuring one XLA variant.
  p.add_argument("--variant", default="", help=argparse.SUPPRESS)
  p.add_argument("--plan", default="", help=argparse.SUPPRESS)
  p.add_argument("--variant_out", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _split(s: str, cast=str) -> list:
  return [cast(v) for v in s.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  if args.variant:
    with open(args.plan) as f:
      plan = Plan(**json.load(f))
    result = run_variant(args.variant, plan)
    _write_atomic(args.variant_out, json.dumps(result, indent=1))
    return 0

  started = time.time()
  try:
    plan = make_plan(args.quick, models=_split(args.models), batches=_split(args.batches, int),
                     dtypes=_split(args.dtypes), variants=_split(args.variants),
                     steps=args.steps, warmup=args.warmup, torch=not args.no_torch)
    plan.conv_ops = plan.conv_ops and not args.no_conv_ops
  except ValueError as e:
    print(str(e), file=sys.stderr)
    return 2
  out_path = args.out or os.path.join(REPO_ROOT, DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
  env = environment()
  if env["load_avg_start"][0] > 1.3 and env["cores"] <= 2:
    _log(f"warning: load average {env['load_avg_start'][0]:.2f} on {env['cores']} cores; "
         "other work will slow both frameworks unevenly")
  errors: list[str] = []
  notes: list[str] = []
  isa = env["isa_flags"]
  if "bfloat16" in plan.dtypes and not (isa["avx512_bf16"] or isa["amx_bf16"]):
    notes.append("bfloat16 on a CPU without avx512_bf16/amx_bf16 is emulated: PyTorch's bf16 "
                 "matmul ran near 1 GFLOP/s on an AVX2 EPYC, so expect minutes per measurement; "
                 "its matmul peak is measured at 1024x1024")
    plan.bf16_matmul_n = 1024
    _log(notes[-1])
  with tempfile.TemporaryDirectory(prefix="tvunet_benchmark_") as workdir:
    plan.volume_path = write_volume(plan, workdir)
    pipeline: dict[str, Any] = {}
    if not args.no_pipeline:
      _log("input pipeline")
      pipeline = pipeline_part(plan, workdir)
    variants = [spawn_variant(v, plan, workdir) for v in plan.variants]
  errors += [f"variant {v['variant']}: {v['error']}" for v in variants if "error" in v]
  ok = [v for v in variants if "error" not in v]
  torch_info = ok[0]["torch"] if ok else {}
  if "error" in torch_info:
    notes.append(f"PyTorch peer not measured: {torch_info['error']}")
  records = make_records(env, variants)
  inference = [{**r, "xla_variant": v["variant"]} for v in ok for r in v["inference"]]
  plan_dict = dataclasses.asdict(plan)
  plan_dict.pop("volume_path")
  results = {
      "schema": SCHEMA_VERSION,
      "command": " ".join(["python -m experiments.benchmark",
                           *(sys.argv[1:] if argv is None else argv)]),
      "mode": plan.mode,
      "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "duration_s": time.time() - started,
      "environment": env,
      "load_avg_end": list(os.getloadavg()),
      "device_kind": ok[0]["device_kind"] if ok else None,
      "plan": plan_dict,
      "xla_variants": {v: XLA_VARIANTS[v] for v in plan.variants},
      "flop_count_model": MODEL_FLOPS_NOTE,
      "matmul_gflops": peak_gflops(ok),
      "matmul_foreign_cpu_share": {v["variant"]: v.get("matmul_foreign_cpu_share") for v in ok},
      "records": records,
      "inference": inference,
      "conv_ops": {v["variant"]: v["conv_ops"] for v in ok if v.get("conv_ops")},
      "conv_backends": {v["variant"]: v.get("conv_backend") for v in ok},
      "malloc": {v["variant"]: v.get("malloc", "system") for v in ok},
      "onednn_version": next((v.get("onednn_version") for v in ok if v.get("onednn_version")),
                             None),
      "input_pipeline": pipeline,
      "torch": torch_info,
      "peak_rss_mb": {"parent (input pipeline)": peak_rss_mb(),
                      **{f"child {v['variant']} (JAX + PyTorch)": v["peak_rss_mb"] for v in ok}},
      "errors": errors,
      "notes": notes,
  }
  _write_atomic(out_path, json.dumps(results, indent=1) + "\n")
  _write_atomic(_md_path(out_path), to_markdown(results))
  _log(f"wrote {out_path} and {_md_path(out_path)} in {results['duration_s']:.0f} s")
  print(to_markdown(results))
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
