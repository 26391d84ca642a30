"""The command line: plan the run, run every measurement in a child process, write the record.

  python -m experiments.benchmark [--quick] [--out FILE.json] [--rounds 3] [--no_torch] ...

The parent imports no framework (it must not start JAX's CPU backend or PyTorch's thread pool
while children measure); it plans (`schedule`), runs each spec as

  python -m experiments.benchmark --child '<spec json>'

with the spec's environment (the JAX variant's TVUNET_* and XLA_FLAGS, a fresh Inductor cache,
ONEDNN_VERBOSE=1 for the probes only), reads the JSON the child writes, and after every child
rewrites the results JSON and markdown (marked partial until the end). A child imports only its
own framework and fails if another one is in `sys.modules` after its measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.benchmark import layers, machine, report, schedule, steps
from tvunet_jax import atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join("experiments", "results", "benchmark.json")
DEFAULT_QUICK_OUT = os.path.join("experiments", "results", "benchmark_quick.json")
SCHEMA_VERSION = 2
CHILD_ERROR = "benchmark child error: "
FOREIGN_LOAD_NOTE = 0.1  # other processes' CPU share above which a measurement is flagged
# Modules whose presence in sys.modules means a framework was imported.
FRAMEWORK_MODULES = {
  "jax": ("jax", "jaxlib", "flax"),
  "torch": ("torch",),
  "onnxruntime": ("onnxruntime",),
}


def _log(msg: str) -> None:
  print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the child


def frameworks_loaded(modules: Mapping[str, Any] | None = None) -> list[str]:
  """The frameworks of FRAMEWORK_MODULES imported in this process (or in `modules`)."""
  modules = sys.modules if modules is None else modules
  return [fw for fw, names in FRAMEWORK_MODULES.items() if any(n in modules for n in names)]


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
  kind, fw = spec["kind"], spec["framework"]
  if kind == "train":
    return steps.jax_train(spec) if fw == "jax" else steps.torch_train(spec)
  if kind == "inference":
    if fw == "onnxruntime":
      return steps.ort_inference(spec, spec["onnx_path"], spec["input_name"])
    return steps.jax_inference(spec) if fw == "jax" else steps.torch_inference(spec)
  if kind == "export":
    return steps.ort_export(spec, spec["dir"])
  if kind == "matmul":
    return steps.jax_matmul(spec) if fw == "jax" else steps.torch_matmul(spec)
  if kind == "layers":
    table = layers.jax_table if fw == "jax" else layers.torch_table
    return {"rows": table(spec["batch"])}
  if kind == "probe":
    return steps.jax_probe(spec) if fw == "jax" else steps.torch_probe(spec)
  if kind == "tune":
    return steps.jax_tune(spec, log=_log)
  raise ValueError(f"unknown child kind {kind!r}")


def run_child(spec: dict[str, Any]) -> int:
  """Measures one spec in this (fresh) process and writes its JSON to spec["out"]."""
  try:
    result = _measure(spec)
    loaded = frameworks_loaded()
    foreign = [f for f in loaded if f != spec["framework"]]
    # The export child converts a JAX function and may load ONNX tooling; it times nothing.
    if foreign and spec["kind"] != "export":
      raise RuntimeError(
        f"a {spec['framework']} child imported {', '.join(foreign)}, whose "
        "threads would share the cores with the measured framework"
      )
    result.update(machine.process_record(), frameworks_loaded=loaded)
    atomic.write_json(spec["out"], result)
    return 0
  except Exception as e:  # reported to the parent as one line
    traceback.print_exc()
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    print(f"{CHILD_ERROR}{type(e).__name__}: {msg}", file=sys.stderr, flush=True)
    return 1


# ----------------------------------------------------------------------------- the parent


def child_env(
  spec: Mapping[str, Any], workdir: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
  """The environment of the child measuring `spec`."""
  env = dict(os.environ if base is None else base)
  for k in ("ONEDNN_VERBOSE", "DNNL_VERBOSE", "JAX_COMPILATION_CACHE_DIR"):
    env.pop(k, None)
  # A forced fake-device count (the test suite's) would only split the same cores.
  xla = [
    f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
  ]
  if spec["framework"] == "jax":
    for k, v in schedule.VARIANTS[spec.get("variant", "default")].items():
      if k == "XLA_FLAGS":
        xla += v.split()
      else:
        env[k] = v
  env["XLA_FLAGS"] = " ".join(xla)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  # A fresh Inductor cache per child: its compile time is a real compilation, as JAX's is.
  env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(workdir, f"inductor-{spec['id']}")
  if spec["kind"] == "probe":
    env["ONEDNN_VERBOSE"] = "1"
  return env


def error_line(stderr: str, returncode: int) -> str:
  """The one-line reason of a failed child: its CHILD_ERROR line, else its last line."""
  lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
  for ln in reversed(lines):
    if ln.startswith(CHILD_ERROR):
      return ln[len(CHILD_ERROR) :]
  return (lines[-1][:300] if lines else "no output") + f" (exit code {returncode})"


class ChildRunner:
  """Runs a spec in `python -m experiments.benchmark --child` and returns its result dict."""

  def __init__(self, workdir: str, timeout_s: float, total: int):
    self.workdir, self.timeout_s, self.total = workdir, timeout_s, total
    self.results: dict[str, dict[str, Any]] = {}

  def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
    spec = {**spec, "out": os.path.join(self.workdir, f"{spec['id']}.json")}
    if spec["kind"] == "export":
      spec["dir"] = os.path.join(self.workdir, spec["id"])
    if spec.get("needs"):
      needed = self.results[spec["needs"]]
      spec.update(onnx_path=needed["onnx_path"], input_name=needed["input_name"])
    cmd = [sys.executable, "-m", "experiments.benchmark", "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=child_env(spec, self.workdir),
        capture_output=True,
        text=True,
        timeout=self.timeout_s,
        check=False,
      )
    except subprocess.TimeoutExpired:
      result = {"error": f"timed out after {self.timeout_s:.0f} s"}
    else:
      if proc.returncode == 0 and os.path.exists(spec["out"]):
        with open(spec["out"]) as f:
          result = json.load(f)
        if spec["kind"] == "probe":
          result["onednn"] = machine.parse_onednn_verbose(proc.stdout)
      else:
        # the one line for the report, the end of the child's log for whoever debugs it
        tail = proc.stderr.strip().splitlines()[-20:]
        result = {"error": error_line(proc.stderr, proc.returncode), "stderr_tail": tail}
    result["wall_s"] = time.perf_counter() - t0
    self.results[spec["id"]] = result
    _log(
      f"{len(self.results)}/{self.total} {spec['id']}: "
      + (
        f"FAILED {result['error']}"
        if "error" in result
        else f"{result['img_s']:.2f} img/s, first call {result['first_call_s']:.1f} s"
        if "img_s" in result
        else f"{result['measured']} of {result['shapes']} conv shapes measured"
        if spec["kind"] == "tune"
        else "ok"
      )
      + f" ({result['wall_s']:.0f} s)"
    )
    return result


def _availability(plan: schedule.Plan, notes: list[str]) -> None:
  """Turns off the PyTorch peer / ONNX Runtime slot where not installed, with a note."""
  if plan.torch and importlib.util.find_spec("torch") is None:
    plan.torch = False
    notes.append("PyTorch peer not measured: torch not installed (pip install -e '.[bench]')")
  if plan.ort:
    missing = [
      m
      for m in ("tvunet_jax.export", "onnxruntime", "jax2onnx")
      if importlib.util.find_spec(m) is None
    ]
    if missing:
      plan.ort = False
      notes.append(
        f"ONNX Runtime slot skipped: {', '.join(missing)} missing (pip install -e '.[export]')"
      )


def bf16_meaning(native: bool, probes: Mapping[str, Mapping[str, Any]]) -> str:
  """What bfloat16 means on this CPU, from the ISA and the kernels oneDNN dispatched."""
  seen = []
  for fw, p in probes.items():
    ks = [
      k["impl"]
      for k in (p.get("onednn") or {}).get("kernels", [])
      if k["primitive"] == "convolution" and k["src_dtype"] == "bf16"
    ]
    seen.append(f"{fw}: {', '.join(ks) if ks else 'no bf16 oneDNN convolution ran'}")
  head = (
    "native bf16 arithmetic (avx512_bf16 / amx_bf16)"
    if native
    else "no native bf16: bf16 storage, arithmetic converted to float32 or emulated"
  )
  return f"{head}; a bf16 3x3 conv dispatched {'; '.join(seen) or 'nothing seen'}"


def assemble(
  done: Sequence[Mapping[str, Any]],
  plan: schedule.Plan,
  env: dict[str, Any],
  *,
  command: str,
  started: float,
  notes: list[str],
  partial: bool,
) -> dict[str, Any]:
  """The results dict (JSON-able) of the children run so far."""
  by_kind: dict[str, dict[str, Any]] = {}
  for e in done:
    by_kind.setdefault(e["spec"]["kind"], {})[e["spec"]["framework"]] = e["result"]
  probes = by_kind.get("probe", {})
  matmul = {fw: r for fw, r in by_kind.get("matmul", {}).items() if "error" not in r}
  layer_children = by_kind.get("layers", {})
  layer_rows = layers.merge_tables(
    *((layer_children.get(fw) or {}).get("rows") for fw in ("jax", "torch"))
  )
  groups = report.summarize(done, plan.variants[0])
  gflop = {}
  for m in plan.models:
    c = steps.model_config(m).model
    gflop[m] = layers.forward_flops(c.base, c.depth, c.num_outputs, steps.IMAGE_SIZE) / 1e9
  report.add_targets_and_mfu(
    groups, native_bf16=env["native_bf16"], gflop_per_img=gflop, peaks=report.matmul_peaks(matmul)
  )
  openmp: dict[str, set[str]] = {}
  errors, notes = [], list(notes)
  for e in done:
    spec, result = e["spec"], e["result"]
    if "error" not in result:
      if spec["kind"] in ("train", "inference"):
        openmp.setdefault(spec["framework"], set()).update(result.get("openmp_runtimes", []))
      continue
    line = f"{spec['id']}: {result['error']}"
    # A failed PyTorch variant or ONNX Runtime slot is part of the record (the table's failure
    # column); a failed JAX measurement, probe, matmul or table is an error of the run.
    (notes if spec["framework"] != "jax" or spec["kind"] == "export" else errors).append(line)
  busy = [
    e["spec"]["id"]
    for e in done
    if e["spec"]["kind"] in ("train", "inference")
    and (e["result"].get("foreign_cpu_share") or 0.0) > FOREIGN_LOAD_NOTE
  ]
  if busy:
    notes.append(
      f"{len(busy)} measurement(s) ran while other processes used over "
      f"{FOREIGN_LOAD_NOTE:.0%} of the machine's CPU (column 'other processes' CPU'); under "
      "contention the frameworks slow down unevenly (PyTorch's OpenMP threads more), so those "
      "ratios are not this machine's: rerun on an idle machine"
    )
  if plan.torch and not partial:
    errors += [
      f"{g['group']}: no PyTorch variant ran in any round"
      for g in groups
      if g["best_peer"]["img_s"] is None
    ]
  plan_dict = dataclasses.asdict(plan)
  return {
    "schema": SCHEMA_VERSION,
    "command": command,
    "mode": plan.mode,
    "partial": partial,
    "started_utc": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(
      timespec="seconds"
    ),
    "duration_s": time.time() - started,
    "environment": env,
    "load_avg_end": list(os.getloadavg()),
    "plan": plan_dict,
    "variants_env": {v: schedule.VARIANTS[v] for v in plan.variants},
    "probes": probes,
    "winograd_tuning": by_kind.get("tune", {}).get("jax"),
    "bf16_meaning": bf16_meaning(env["native_bf16"], probes),
    "openmp_by_framework": {fw: sorted(s) for fw, s in openmp.items()},
    "groups": groups,
    "matmul": matmul,
    "layers": layer_rows,
    "model_gflop_per_img_forward": gflop,
    "children": [dict(e) for e in done],
    "errors": errors,
    "notes": notes,
  }


def _md_path(json_path: str) -> str:
  root, ext = os.path.splitext(json_path)
  return (root if ext == ".json" else json_path) + ".md"


def _split(s: str, cast=str) -> list:
  return [cast(v.strip()) for v in s.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  doc = sys.modules["experiments.benchmark"].__doc__ or ""
  p = argparse.ArgumentParser(
    prog="python -m experiments.benchmark",
    description=doc.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--quick", action="store_true", help="CI smoke run: demo model, 1 round")
  p.add_argument(
    "--out",
    default=None,
    help="results JSON (markdown beside it, .md); default "
    f"{DEFAULT_OUT} ({DEFAULT_QUICK_OUT} with --quick)",
  )
  p.add_argument("--models", default="", help="comma-separated subset of: paper,demo")
  p.add_argument("--batches", default="", help="comma-separated batch sizes")
  p.add_argument("--dtypes", default="", help="comma-separated: float32,bfloat16")
  p.add_argument("--kinds", default="", help="comma-separated: train,inference")
  p.add_argument("--rounds", type=int, default=None, help="rounds per group (full: 3)")
  p.add_argument(
    "--variants",
    default="",
    help="JAX variants, the first is the JAX side: " + ",".join(schedule.VARIANTS),
  )
  p.add_argument(
    "--peers",
    default="",
    help="PyTorch variants: "
    + ",".join(dict.fromkeys(v for vs in schedule.PEERS.values() for v in vs)),
  )
  p.add_argument("--steps", type=int, default=None, help="timed train steps per child")
  p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  p.add_argument("--no_ort", action="store_true", help="skip the ONNX Runtime slot")
  p.add_argument("--no_conv_ops", action="store_true", help="skip the per-layer conv table")
  p.add_argument("--no_matmul", action="store_true", help="skip the matmul peaks (and MFU)")
  p.add_argument(
    "--no_tune", action="store_true", help="keep the Winograd table as it is (no tune child)"
  )
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
  p.add_argument("--dry_run", action="store_true", help="print the children and exit")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.child:
    return run_child(json.loads(args.child))
  started = time.time()
  env = machine.environment(REPO_ROOT)
  try:
    plan = schedule.make_plan(
      args.quick,
      native_bf16=env["native_bf16"],
      models=_split(args.models),
      batches=_split(args.batches, int),
      dtypes=_split(args.dtypes),
      kinds=_split(args.kinds),
      rounds=args.rounds,
      variants=_split(args.variants),
      peers=_split(args.peers) or None,
      steps=args.steps,
      warmup=args.warmup,
    )
  except ValueError as e:
    print(str(e), file=sys.stderr)
    return 2
  plan.torch = plan.torch and not args.no_torch
  plan.ort = plan.ort and not args.no_ort
  plan.layers = plan.layers and not args.no_conv_ops
  plan.matmul = plan.matmul and not args.no_matmul
  plan.tune = plan.tune and not args.no_tune
  notes: list[str] = []
  _availability(plan, notes)
  if not env["native_bf16"] and "bfloat16" not in plan.dtypes and not args.quick:
    notes.append(
      "bfloat16 not measured: this CPU has no native bf16 (avx512_bf16 / amx_bf16); "
      "--dtypes float32,bfloat16 forces it (PyTorch's bf16 is emulated there)"
    )
  if plan.ort and "bfloat16" in plan.dtypes:
    notes.append(
      "ONNX Runtime: float32 rows only (ONNX's Conv takes no bfloat16; an export's ONNX graph "
      "computes in float32)"
    )
  specs = schedule.schedule(plan)
  if args.dry_run:
    for s in specs:
      print(s["id"])
    print(f"{len(specs)} children", file=sys.stderr)
    return 0
  out_path = args.out or os.path.join(REPO_ROOT, DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
  command = " ".join(["python -m experiments.benchmark", *(sys.argv[1:] if argv is None else argv)])
  if env["load_avg_start"][0] > 0.5 * env["usable_cpus"]:
    _log(
      f"warning: load average {env['load_avg_start'][0]:.2f} on {env['usable_cpus']} CPUs; "
      "other work slows the frameworks unevenly"
    )
  for n in notes:
    _log(n)
  _log(f"{len(specs)} child processes; results in {out_path}")

  def write(done, partial):
    results = assemble(
      done, plan, env, command=command, started=started, notes=notes, partial=partial
    )
    atomic.write_json(out_path, results)
    atomic.write_text(_md_path(out_path), report.to_markdown(results))
    return results

  with tempfile.TemporaryDirectory(prefix="tvunet_benchmark_") as workdir:
    runner = ChildRunner(workdir, args.timeout, len(specs))
    done = schedule.run_schedule(specs, runner, on_done=lambda d: write(d, partial=True))
  results = write(done, partial=False)
  _log(f"wrote {out_path} and {_md_path(out_path)} in {results['duration_s']:.0f} s")
  print(report.to_markdown(results))
  return 1 if results["errors"] else 0
