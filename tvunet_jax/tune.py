"""Measures, on this CPU, which passes of a model's 3x3 convs run faster by Winograd.

  python -m tvunet_jax.tune --config experiments/configs/default.py [--batch 8] [--force]

Traces the config's U-Net once (shapes only) to list its 3x3 float32 convolutions as the oneDNN
backend calls them (per device: the config's train and eval batches split over the devices, or
`--batch`), then times oneDNN's direct kernel and the Winograd kernel for each pass (forward,
input gradient, weight gradient), alternating the two over `--reps` repetitions, and merges the
medians into this machine's section of the Winograd table (`kernels.winograd.tuning_path()`,
beside the kernel library). From the next model built on, `conv.choose` runs each pass on the
kernel that measured faster; shapes the table lacks keep the ISA rule. Shapes already in the
table are not measured again unless `--force`. Run it on an otherwise idle machine: what it
measures decides what training runs.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvunet_jax import atomic, console, models
from tvunet_jax.kernels import conv, custom_calls, library, winograd

Shape = tuple[tuple[int, ...], tuple[int, ...], int]  # (x shape, w shape, local batch)


def model_shapes(model_cfg: Any, local_batches: Sequence[int], image_hw: Sequence[int]) -> list:
  """The distinct 3x3 float32 convs of the config's U-Net on oneDNN, per device, in model order.

  Args:
    model_cfg: a config's `model` block (or a contract's dict).
    local_batches: rows per device the model runs at (e.g. the train and the eval batch).
    image_hw: (H, W) of its input.

  Returns:
    [(x_shape (n, H, W, Ci), w_shape (3, 3, Ci, Co), n), ...] without repeats; [] for a bfloat16
    model (Winograd runs float32 only).
  """
  ops = conv.ConvOps("onednn", None, "all")  # 'all': every qualifying conv is asked about
  model = models.build({**dict(model_cfg), "conv_backend": ops})
  seen: list[Shape] = []
  for n in dict.fromkeys(int(b) for b in local_batches):
    x = jax.ShapeDtypeStruct((n, *image_hw, 1), jnp.float32)
    with winograd.recording() as shapes:
      jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
    for s in shapes:
      if winograd.shape_key(*s) not in {winograd.shape_key(*t) for t in seen}:
        seen.append(s)
  return seen


def _times_ms(fn: Callable[[], Any], reps: int) -> list[float]:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - t0))
  return times


def measure(shape: Shape, reps: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
  """{pass: {'direct_ms', 'winograd_ms'}} for one conv: medians of `reps` timed calls each,
  the two kernels alternating, after one untimed call each (the compile)."""
  x_shape, w_shape, n = shape
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, *x_shape[1:]), np.float32))
  w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
  dy = jnp.asarray(rng.standard_normal((n, *x_shape[1:3], w_shape[3]), np.float32))
  kernels = {
    "direct": custom_calls.onednn_ops(x, w, dy, (1, 1, 1, 1)),
    "winograd": custom_calls.winograd_ops(x, w, dy),
  }
  out: dict[str, dict[str, float]] = {}
  for p in winograd.PASSES:
    calls = {k: functools.partial(jax.jit(ops[p][0]), *ops[p][1]) for k, ops in kernels.items()}
    for call in calls.values():
      jax.block_until_ready(call())
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):  # alternate, so that drift (clocks, other load) hits both alike
      for k, call in calls.items():
        times[k] += _times_ms(call, 1)
    out[p] = {f"{k}_ms": round(statistics.median(v), 4) for k, v in times.items()}
  return out


def tune(
  shapes: Sequence[Shape],
  *,
  path: str | None = None,
  reps: int = 5,
  force: bool = False,
  log: Callable[[str], None] = print,
) -> dict[str, dict[str, dict[str, float]]]:
  """Measures the shapes this machine's table lacks (all with `force`), merges them into the
  table at `path` (default `winograd.tuning_path()`, written atomically: other machines'
  sections and other shapes are kept) and returns this machine's section."""
  path = path or winograd.tuning_path()
  tables = winograd.read_tables(path)  # an unreadable table stops here, before any timing
  key = conv.machine_key()
  section = dict(tables.get(key, {}))
  todo = [s for s in shapes if force or winograd.shape_key(*s) not in section]
  log(f"tune: {len(todo)} of {len(shapes)} conv shapes to measure on {key}")
  for i, s in enumerate(todo, 1):
    k = winograd.shape_key(*s)
    section[k] = measure(s, reps)
    row = "  ".join(
      f"{p} {v['direct_ms']:.2f}/{v['winograd_ms']:.2f}" for p, v in section[k].items()
    )
    log(f"  [{i}/{len(todo)}] {k:>22}  direct/winograd ms: {row}")
  if todo:
    atomic.write_json(path, {**tables, key: section})
    log(f"tune: wrote {path}")
  return section


def summary(section: dict, shapes: Sequence[Shape]) -> str:
  """A short table: per shape, the pass each kernel wins and the step time saved (ms)."""
  lines = [f"{'N,H,W,Ci,Co':>22}  fwd  dgrad  wgrad  saved ms"]
  decided = dict(winograd.decisions(section))
  for s in shapes:
    k = winograd.shape_key(*s)
    choice = decided.get(k, winograd.NONE)
    saved = sum(max(0.0, v["direct_ms"] - v["winograd_ms"]) for v in section.get(k, {}).values())
    flags = "  ".join(f"{'W' if c else 'd':>4}" for c in choice)
    lines.append(f"{k:>22}  {flags}  {saved:8.2f}")
  lines.append("W: Winograd, d: oneDNN direct")
  return "\n".join(lines)


def _local_batches(config: Any, devices: int) -> list[int]:
  """Rows per device of the train step (micro-batch) and of evaluation."""
  t = config.train
  micro = t.per_device_batch_size
  if micro <= 0:
    micro = t.global_batch_size // (devices * t.get("grad_accum_steps", 1))
  return [max(1, micro), max(1, config.eval.batch_size // devices)]


def main(argv: Sequence[str]) -> None:
  del argv
  console.quiet_libraries()
  config = _CONFIG.value
  if conv.choose(config.model.get("conv_backend", "auto")).backend != "onednn":
    raise SystemExit(f"tune: nothing to measure: the convolutions run on XLA. {library.why()}")
  batches = [_BATCH.value] if _BATCH.value else _local_batches(config, jax.device_count())
  shapes = model_shapes(config.model, batches, (_SIZE.value, _SIZE.value))
  if not shapes:
    raise SystemExit(f"tune: nothing to measure: the model computes in {config.model.dtype}")
  try:
    section = tune(shapes, reps=_REPS.value, force=_FORCE.value)
  except ValueError as e:  # an unreadable table: named, left as it is
    raise SystemExit(f"tune: {e}") from None
  print(summary(section, shapes))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.")
  _BATCH = flags.DEFINE_integer("batch", 0, "rows per device (0: the config's train and eval)")
  _SIZE = flags.DEFINE_integer("image_size", 128, "input H = W (the paper_128 builder's 128)")
  _REPS = flags.DEFINE_integer("reps", 5, "timed calls per kernel and pass")
  _FORCE = flags.DEFINE_bool("force", False, "measure shapes already in the table again")
  flags.mark_flags_as_required(["config"])
  app.run(main)
