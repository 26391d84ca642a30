"""What one benchmark run measures and in which order: the plan, the variants, the rounds.

Pure Python (no framework), so the parent plans without starting JAX or PyTorch. A run is a list
of child specs (JSON-able dicts), each measured in a fresh process of its own:

  * 'probe' per framework: the machine record as that framework's process sees it;
  * per round r and per group (model, dtype, batch, kind in {train, inference}): the JAX side
    (every JAX variant, and ONNX Runtime for inference when enabled) and the PyTorch side
    (every peer variant), JAX first in even rounds and PyTorch first in odd ones, so neither
    framework always runs on a cooler (or hotter) machine;
  * 'matmul' per framework (the peak the MFU divides by) and 'layers' per framework (the
    per-layer conv table).

`run_schedule(specs, runner)` runs them in order through any runner (a subprocess in `cli`, a
fake in the tests), skipping a spec whose `needs` failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

MODELS = ("paper", "demo")
DTYPES = ("float32", "bfloat16")
KINDS = ("train", "inference")
FRAMEWORKS = ("jax", "torch", "onnxruntime")
YNN_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce"
# JAX variants: the child's environment. 'default' is the library's own choice (oneDNN kernels
# where built, Winograd where `conv.choose` picks it), set explicitly so that a caller's
# shell variables cannot change what 'default' means; XLA_FLAGS are appended to the inherited.
VARIANTS: dict[str, dict[str, str]] = {
  "default": {"TVUNET_CONV_BACKEND": "auto", "TVUNET_WINOGRAD": "auto"},
  "onednn_direct": {"TVUNET_CONV_BACKEND": "auto", "TVUNET_WINOGRAD": "off"},
  "winograd_all": {"TVUNET_CONV_BACKEND": "auto", "TVUNET_WINOGRAD": "all"},
  "xla": {"TVUNET_CONV_BACKEND": "xla"},
  "xla_ynn": {"TVUNET_CONV_BACKEND": "xla", "XLA_FLAGS": YNN_FLAGS},
}
# PyTorch peer variants per kind (`peers.py` builds them); the optional ones run only if asked.
PEERS = {
  "train": ("eager", "compile", "compile_max_autotune"),
  "inference": ("eager", "compile", "frozen"),
}
DEFAULT_PEERS = {"train": ("eager", "compile"), "inference": ("eager", "compile", "frozen")}


@dataclasses.dataclass
class Plan:
  """One run's choices; `schedule(plan)` turns it into child specs."""

  mode: str  # "quick" or "full"
  models: list[str]
  batches: list[int]
  dtypes: list[str]
  kinds: list[str]
  rounds: int
  variants: list[str]  # JAX variants; the first is the JAX side of the ratio
  peers: list[str] | None  # PyTorch variants to run (None: DEFAULT_PEERS of each kind)
  torch: bool
  ort: bool  # ONNX Runtime inference of the exported network, beside JAX's
  warmup: int  # untimed calls after the first (compiling) one
  steps: int  # timed train steps
  infer_batches: int = 4  # batches of `batch` slices per timed inference call
  infer_reps: int = 3  # timed inference calls
  matmul: bool = True
  matmul_n: int = 4096
  # bf16 matmul size on a CPU without bf16 arithmetic, where PyTorch's bf16 matmul is emulated
  # and slow (minutes per 4096 product); None: matmul_n
  bf16_matmul_n: int | None = None
  matmul_reps: int = 3
  layers: bool = True  # the per-layer convolution table
  # First child: `python -m tvunet_jax.tune`'s measurement of the float32 models' 3x3 convs at the
  # plan's batches, so that the JAX default path runs the kernels this CPU measured faster.
  tune: bool = True
  layer_batch: int = 8


def make_plan(quick: bool, *, native_bf16: bool = False, **overrides: Any) -> Plan:
  """The quick (CI smoke) or full plan; `overrides` replace fields where not None/empty.

  Full: the paper model, batch 8, train and inference, 3 rounds, float32 (and bfloat16 where
  the CPU has native bf16: elsewhere PyTorch's bf16 is emulated and a paper step takes minutes),
  the JAX default path against every default peer. Quick: the demo model, batch 4, float32,
  1 round, no per-layer table.

  Raises:
    ValueError: an unknown name or a non-positive count (one line).
  """
  if quick:
    plan = Plan(
      mode="quick",
      models=["demo"],
      batches=[4],
      dtypes=["float32"],
      kinds=list(KINDS),
      rounds=1,
      variants=["default"],
      peers=None,
      torch=True,
      ort=True,
      warmup=1,
      steps=3,
      infer_batches=2,
      infer_reps=2,
      matmul_n=1024,
      matmul_reps=2,
      layers=False,
      layer_batch=1,
      tune=False,  # a smoke run leaves the machine's Winograd table as it is
    )
  else:
    plan = Plan(
      mode="full",
      models=["paper"],
      batches=[8],
      dtypes=["float32", "bfloat16"] if native_bf16 else ["float32"],
      kinds=list(KINDS),
      rounds=3,
      variants=["default"],
      peers=None,
      torch=True,
      ort=True,
      warmup=1,
      steps=5,
    )
  if not native_bf16:
    plan.bf16_matmul_n = 1024
  for name, value in overrides.items():
    if not hasattr(plan, name):
      raise TypeError(f"make_plan: no plan field {name!r}")
    if value is not None and value != [] and value != "":
      setattr(plan, name, list(value) if isinstance(value, tuple) else value)
  check_plan(plan)
  return plan


def check_plan(plan: Plan) -> None:
  """Raises ValueError (one line) on unknown names or counts out of range."""
  peers = sorted({p for names in PEERS.values() for p in names})
  for name, allowed in (
    ("models", MODELS),
    ("dtypes", DTYPES),
    ("kinds", KINDS),
    ("variants", VARIANTS),
    ("peers", peers),
  ):
    bad = [v for v in getattr(plan, name) or [] if v not in allowed]
    if bad:
      raise ValueError(f"benchmark: unknown {name} {bad}; choose from {sorted(allowed)}")
  counts = {
    "batches": min(plan.batches, default=0),
    "rounds": plan.rounds,
    "steps": plan.steps,
    "infer_batches": plan.infer_batches,
    "infer_reps": plan.infer_reps,
  }
  bad = {k: v for k, v in counts.items() if v < 1}
  if bad or plan.warmup < 0 or not plan.variants:
    raise ValueError(
      f"benchmark: batches, rounds, steps and infer counts must be >= 1, warmup "
      f">= 0 and at least one variant; got {bad or ''} warmup={plan.warmup} "
      f"variants={plan.variants}"
    )


def peer_variants(kind: str, chosen: Sequence[str] | None) -> list[str]:
  """The PyTorch variants of `kind`: the defaults, or those of `chosen` that apply to it."""
  if not chosen:
    return list(DEFAULT_PEERS[kind])
  return [v for v in chosen if v in PEERS[kind]]


def groups(plan: Plan) -> list[tuple[str, str, int, str]]:
  """(model, dtype, batch, kind) of every compared measurement, in plan order."""
  return [
    (m, d, b, k) for m in plan.models for d in plan.dtypes for b in plan.batches for k in plan.kinds
  ]


def group_id(model: str, dtype: str, batch: int, kind: str) -> str:
  return f"{model}-{dtype}-b{batch}-{kind}"


def _measure_spec(
  plan: Plan, group: tuple, r: int, framework: str, variant: str, needs: str | None = None
) -> dict[str, Any]:
  model, dtype, batch, kind = group
  side = "peer" if framework == "torch" else framework
  spec = {
    "id": f"r{r}-{group_id(*group)}-{framework}-{variant}",
    "kind": kind,
    "framework": framework,
    "variant": variant,
    "side": side,
    "round": r,
    "group": group_id(*group),
    "model": model,
    "dtype": dtype,
    "batch": batch,
    "warmup": plan.warmup,
  }
  if kind == "train":
    spec["steps"] = plan.steps
  else:
    spec.update(slices=plan.infer_batches * batch, reps=plan.infer_reps)
  if needs:
    spec["needs"] = needs
  return spec


def export_id(model: str, dtype: str, batch: int) -> str:
  return f"export-{model}-{dtype}-b{batch}"


def schedule(plan: Plan) -> list[dict[str, Any]]:
  """Every child spec of the run, in the order they run (see the module docstring)."""
  specs: list[dict[str, Any]] = []
  if plan.tune and "float32" in plan.dtypes:
    specs.append(
      {
        "id": "tune-jax",
        "kind": "tune",
        "framework": "jax",
        "variant": plan.variants[0],
        "models": plan.models,
        "batches": sorted({*plan.batches, *([plan.layer_batch] if plan.layers else [])}),
      }
    )
  specs.append(
    {"id": "probe-jax", "kind": "probe", "framework": "jax", "variant": plan.variants[0]}
  )
  if plan.torch:
    specs.append({"id": "probe-torch", "kind": "probe", "framework": "torch"})
  exports = set()
  for r in range(plan.rounds):
    for group in groups(plan):
      model, dtype, batch, kind = group
      jax_side = [_measure_spec(plan, group, r, "jax", v) for v in plan.variants]
      # ONNX's Conv takes no bfloat16 (an export's ONNX graph computes in float32): float32 only.
      if kind == "inference" and plan.ort and dtype == "float32":
        eid = export_id(model, dtype, batch)
        if eid not in exports:  # once, before the first ONNX Runtime measurement needing it
          exports.add(eid)
          specs.append(
            {
              "id": eid,
              "kind": "export",
              "framework": "jax",
              "variant": plan.variants[0],
              "model": model,
              "dtype": dtype,
              "batch": batch,
            }
          )
        jax_side.append(_measure_spec(plan, group, r, "onnxruntime", "ort", needs=eid))
      torch_side = (
        [_measure_spec(plan, group, r, "torch", p) for p in peer_variants(kind, plan.peers)]
        if plan.torch
        else []
      )
      first, second = (jax_side, torch_side) if r % 2 == 0 else (torch_side, jax_side)
      specs += first + second
  frameworks = ["jax", "torch"] if plan.torch else ["jax"]
  if plan.matmul:
    n = {
      d: plan.bf16_matmul_n if d == "bfloat16" and plan.bf16_matmul_n else plan.matmul_n
      for d in plan.dtypes
    }
    specs += [
      {
        "id": f"matmul-{f}",
        "kind": "matmul",
        "framework": f,
        "variant": "default",
        "n": n,
        "reps": plan.matmul_reps,
      }
      for f in frameworks
    ]
  if plan.layers:
    specs += [
      {
        "id": f"layers-{f}",
        "kind": "layers",
        "framework": f,
        "variant": plan.variants[0],
        "batch": plan.layer_batch,
      }
      for f in frameworks
    ]
  return specs


Runner = Callable[[dict[str, Any]], dict[str, Any]]


def run_schedule(
  specs: Sequence[dict[str, Any]],
  runner: Runner,
  on_done: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
  """Runs every spec through `runner` in order; a spec whose `needs` failed is not run.

  Returns:
    [{"spec": spec, "result": runner's dict (with "error": one line on failure)}], in order.
    `on_done(done_so_far)` is called after each spec (the CLI writes partial results).
  """
  done: list[dict[str, Any]] = []
  failed: dict[str, str] = {}
  for spec in specs:
    need = spec.get("needs")
    if need in failed:
      result = {"error": f"not run: {need} failed ({failed[need]})"}
    else:
      try:
        result = runner(spec)
      except Exception as e:  # a runner bug must not lose the measurements so far
        result = {"error": f"{type(e).__name__}: {e}"}
    if "error" in result:
      failed[spec["id"]] = result["error"]
    done.append({"spec": spec, "result": result})
    if on_done:
      on_done(done)
  return done
