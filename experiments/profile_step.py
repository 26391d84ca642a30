r"""Where the time of one train step (or one inference batch) goes, op by op, on this machine.

  python -m experiments.profile_step                      # paper model, batch 8, train step
  python -m experiments.profile_step --mode infer         # the eval-mode forward instead
  python -m experiments.profile_step --model demo --batch 16 --top 30
  python -m experiments.profile_step --dtype bfloat16     # where a bf16 step's time goes

Runs the jitted step a few times under `jax.profiler`, reads the trace XLA:CPU writes and sums
the executed thunks by name and by kind: the oneDNN custom calls (per target: conv forward, input
gradient, weight gradient, transposed conv), XLA fusions, copies/transposes, the rest. The
percentages are of the summed thunk time; on a 2-core machine XLA runs at most a couple of thunks
at once, so the sum is close to the wall time printed beside it. This is the measurement behind
the "where the time goes" paragraphs of `experiments/README.md`; it is a diagnostic, not a
benchmark (use `python -m experiments.benchmark` for speed claims). The train step is the
benchmark's own (`experiments.benchmark.steps.JaxTrainStep`: `tvunet_jax.steps.make_train_fn`);
only that module of the benchmark is imported.
"""

from __future__ import annotations

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark import steps
from tvunet_jax import models, sharding
from tvunet_jax.kernels import library

# XLA:CPU names a thunk's trace event after its HLO instruction ('ffi_call.113',
# 'add_maximum_fusion', 'concatenate.7'); runtime bookkeeping and Python frames ('ThunkExecutor::
# Execute', 'ParseArguments', '$api.py:...', 'end: ffi_call.1') do not look like that.
_THUNK = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)*$")


def _kind(name: str, targets: dict[str, str]) -> str:
  if name in targets:
    return targets[name]
  if name.startswith("ffi_call") or name.startswith("custom-call"):
    return "custom call (other)"
  if "fusion" in name:
    return "XLA fusion"
  if name.startswith(("copy", "transpose")):
    return "copy / transpose"
  if name.startswith(("concatenate", "pad", "slice", "dynamic")):
    return "concatenate / pad / slice"
  if name.startswith(("rng", "RngBitGenerator")):
    return "random numbers"
  return "other"


_OP_NAMES = (
  "conv forward",
  "conv input grad",
  "conv weight grad",
  "transposed conv forward",
  "transposed conv input grad",
  "transposed conv weight grad",
)  # library.TARGETS' ops


def _custom_call_targets(hlo: str) -> dict[str, str]:
  """Thunk name -> 'oneDNN <op>' / 'Winograd <op>' for every custom call in optimized HLO text."""
  names = {target: f"oneDNN {_OP_NAMES[op]}" for op, target in library.TARGETS.items()}
  # One Winograd target serves the forward pass and the input gradient (its `transposed` flag).
  names.update(
    zip(
      library.WINOGRAD_TARGETS, ("Winograd conv forward / input grad", "Winograd conv weight grad")
    )
  )
  out = {}
  for m in re.finditer(r'%?([\w.\-]+) = [^\n]*custom_call_target="(\w+)"', hlo):
    out[m.group(1)] = names.get(m.group(2), f"custom call {m.group(2)}")
  return out


def profile(call: Callable[[], Any], reps: int) -> tuple[collections.Counter, float]:
  """Summed thunk microseconds per name per call over `reps` synchronised calls of `call`
  (after one untimed call), and the wall seconds per call."""
  call()
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    for _ in range(reps):
      call()
    wall = (time.perf_counter() - t0) / reps
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  per_name = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and _THUNK.match(e["name"]):
      per_name[e["name"]] += e["dur"] / reps
  return per_name, wall


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="paper", choices=("paper", "demo"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--mode", default="train", choices=("train", "infer"))
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="the model's compute dtype (parameters stay float32)",
  )
  p.add_argument("--reps", type=int, default=3, help="profiled calls (after one untimed)")
  p.add_argument("--top", type=int, default=25, help="thunks listed by name")
  args = p.parse_args(argv)

  if args.mode == "train":
    # exactly the benchmark's step: tvunet_jax.steps.make_train_fn (shardings, donation, the
    # mesh), the benchmark's loss, a fixed random batch
    step = steps.JaxTrainStep(args.model, args.batch, args.dtype)
    hlo, call = step.compiled_text(), step
  else:
    model = models.build(
      steps.model_config(args.model, args.dtype).model, axis_name=sharding.DATA_AXIS
    )
    size = steps.IMAGE_SIZE
    image = jnp.asarray(
      np.random.default_rng(0).normal(size=(args.batch, size, size, 1)), jnp.float32
    )
    variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl="rbg"), image[:1]
    )
    compiled = (
      jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image).compile()
    )
    hlo, call = compiled.as_text(), lambda: jax.block_until_ready(compiled(variables, image))
  targets = _custom_call_targets(hlo)
  per_name, wall = profile(call, args.reps)

  total = sum(per_name.values())
  per_kind = collections.Counter()
  for name, us in per_name.items():
    per_kind[_kind(name, targets)] += us
  print(
    f"{args.model} model, batch {args.batch}, {args.mode}: {wall * 1e3:.0f} ms wall per call, "
    f"{total / 1e3:.0f} ms summed thunk time; {jax.devices()[0].device_kind}, "
    f"{len(os.sched_getaffinity(0))} usable CPUs\n"
  )
  print("| kind | ms | share |\n|---|---:|---:|")
  for kind, us in per_kind.most_common():
    print(f"| {kind} | {us / 1e3:.1f} | {us / total:.1%} |")
  print(f"\n| thunk (top {args.top}) | kind | ms |\n|---|---|---:|")
  for name, us in per_name.most_common(args.top):
    print(f"| {name} | {_kind(name, targets)} | {us / 1e3:.1f} |")


if __name__ == "__main__":
  main()
