"""The benchmark package and its PyTorch peer, without timing anything that matters.

Pinned here: the round-robin schedule (order alternates, every slot present, rounds counted) on a
fake runner; the statistics over rounds (median / min / max, per-round ratios, the "not a win"
rule, best-peer selection with a failed variant) on hand-made timings; the machine-record
parsers on fixed /proc text and oneDNN verbose lines; the children's environment; that the
parent imports no framework; the layer list and FLOP count against the Flax model and a PyTorch
hook count; and the PyTorch peer's parity with the Flax model (parameters, TV, loss, frozen
graph).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmark import cli, layers, machine, report, schedule, steps
from tvunet_jax import losses, models
from tvunet_jax.kernels import conv, library

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- schedule


def _plan(**kw):
  base = dict(models=["paper"], batches=[8], dtypes=["float32", "bfloat16"], rounds=3)
  return schedule.make_plan(False, native_bf16=True, **{**base, **kw})


def _fake_run(plan, fail=()):
  """Runs the plan's schedule on a runner that records the order and fails the ids in `fail`."""
  calls = []

  def runner(spec):
    calls.append(spec["id"])
    if spec["id"] in fail:
      return {"error": "boom"}
    return {"img_s": 1.0, "first_call_s": 1.0}

  return schedule.run_schedule(schedule.schedule(plan), runner), calls


def test_rounds_alternate_and_every_slot_runs():
  plan = _plan()
  done, calls = _fake_run(plan)
  assert len(calls) == len(set(calls)) == len(done)
  measured = [d["spec"] for d in done if d["spec"]["kind"] in ("train", "inference")]
  groups = {s["group"] for s in measured}
  assert groups == {
    f"paper-{d}-b8-{k}" for d in ("float32", "bfloat16") for k in ("train", "inference")
  }
  for g in groups:
    for r in range(3):
      slot = [s for s in measured if s["group"] == g and s["round"] == r]
      sides = [s["side"] for s in slot]
      # one block per side, JAX's first in even rounds, PyTorch's first in odd ones
      first = "jax" if r % 2 == 0 else "peer"
      assert sides[0] == first and sides == sorted(sides, key=lambda x: x != first)
      kind = slot[0]["kind"]
      peers = {"train": {"eager", "compile"}, "inference": {"eager", "compile", "frozen"}}[kind]
      assert {s["variant"] for s in slot if s["side"] == "peer"} == peers
      assert [s["variant"] for s in slot if s["side"] == "jax"] == ["default"]
      assert [s["variant"] for s in slot if s["side"] == "onnxruntime"] == (
        ["ort"] if kind == "inference" and "float32" in g else []
      )
  assert sorted({s["round"] for s in measured}) == [0, 1, 2]
  # the export runs once, before the first ONNX Runtime child that needs it; float32 only
  eid = "export-paper-float32-b8"
  assert calls.count(eid) == 1
  ort = [i for i, c in enumerate(calls) if c.endswith("onnxruntime-ort") and "-float32-" in c]
  assert calls.index(eid) < min(ort)
  assert not [c for c in calls if "bfloat16" in c and ("onnxruntime" in c or "export" in c)]
  # the Winograd table is measured before anything is timed, then the probes
  assert calls[:3] == ["tune-jax", "probe-jax", "probe-torch"]
  tune_spec = next(d["spec"] for d in done if d["spec"]["id"] == "tune-jax")
  assert tune_spec["models"] == ["paper"] and tune_spec["batches"] == [8]
  assert {"matmul-jax", "matmul-torch", "layers-jax", "layers-torch"} <= set(calls)


def test_quick_plan_and_options():
  quick = schedule.make_plan(True)
  assert (quick.models, quick.batches, quick.dtypes, quick.rounds) == (
    ["demo"],
    [4],
    ["float32"],
    1,
  )
  assert not quick.layers and not quick.tune  # a smoke run leaves the table alone
  assert "tune-jax" not in [s["id"] for s in schedule.schedule(quick)]
  full = schedule.make_plan(False, native_bf16=False)
  assert full.dtypes == ["float32"] and full.rounds == 3 and full.bf16_matmul_n == 1024
  assert schedule.make_plan(False, native_bf16=True).dtypes == ["float32", "bfloat16"]
  plan = schedule.make_plan(
    True,
    torch=False,
    ort=False,
    variants=["default", "xla"],
    peers=["compile_max_autotune"],
    rounds=2,
  )
  specs = schedule.schedule(plan)
  assert not [s for s in specs if s["framework"] != "jax"]
  assert [s["id"] for s in specs if s["kind"] == "train"] == [
    "r0-demo-float32-b4-train-jax-default",
    "r0-demo-float32-b4-train-jax-xla",
    "r1-demo-float32-b4-train-jax-default",
    "r1-demo-float32-b4-train-jax-xla",
  ]
  assert schedule.peer_variants("train", ["compile_max_autotune", "frozen"]) == [
    "compile_max_autotune"
  ]
  assert schedule.peer_variants("inference", None) == ["eager", "compile", "frozen"]
  with pytest.raises(ValueError, match=r"unknown models \['resnet'\]"):
    schedule.make_plan(True, models=["resnet"])
  with pytest.raises(ValueError, match="must be >= 1"):
    schedule.make_plan(True, rounds=0)


def test_run_schedule_skips_what_needs_a_failure_and_survives_a_runner_bug():
  plan = _plan(dtypes=["float32"], kinds=["inference"], rounds=2, torch=False)

  def runner(spec):
    if spec["kind"] == "export":
      return {"error": "jax2onnx broke"}
    if spec["kind"] == "matmul":
      raise KeyError("bug")
    return {"img_s": 2.0, "first_call_s": 3.0}

  done = schedule.run_schedule(schedule.schedule(plan), runner)
  by_id = {d["spec"]["id"]: d["result"] for d in done}
  assert by_id["r1-paper-float32-b8-inference-onnxruntime-ort"]["error"] == (
    "not run: export-paper-float32-b8 failed (jax2onnx broke)"
  )
  assert by_id["matmul-jax"]["error"] == "KeyError: 'bug'"
  assert by_id["r1-paper-float32-b8-inference-jax-default"]["img_s"] == 2.0


# ----------------------------------------------------------------------------- statistics


def _done(jax_rates, peer_rates, kind="train", group="paper-float32-b8-train"):
  """run_schedule-like entries: per round, JAX default and each peer variant (None = failed)."""
  out = []
  for r, jx in enumerate(jax_rates):
    entries = [("jax", "default", jx)] + [("peer", v, rates[r]) for v, rates in peer_rates.items()]
    if r % 2:
      entries = entries[1:] + entries[:1]
    for side, variant, x in entries:
      spec = {
        "id": f"r{r}-{variant}",
        "kind": kind,
        "group": group,
        "model": "paper",
        "dtype": "float32",
        "batch": 8,
        "round": r,
        "side": side,
        "variant": variant,
        "framework": "jax" if side == "jax" else "torch",
      }
      result = (
        {"error": f"compile failed in round {r}"}
        if x is None
        else {"img_s": x, "first_call_s": 10.0 + r}
      )
      out.append({"spec": spec, "result": result})
  return out


def test_stats_and_verdict_hand_values():
  assert report.stats([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
  assert report.stats([4.0, 1.0])["median"] == 2.5
  assert report.stats([None]) is None
  assert report.verdict({"median": 1.3, "min": 1.1, "max": 1.5}) == "win"
  assert report.verdict({"median": 0.9, "min": 0.8, "max": 0.95}) == "loss"
  assert report.verdict({"median": 1.1, "min": 0.97, "max": 1.2}) == "not a win"
  assert report.verdict({"median": 0.98, "min": 0.9, "max": 1.04}) == "not a loss"
  assert report.verdict({"median": 1.0, "min": 1.0, "max": 1.0}) == "not a win"
  assert report.best_peer({"eager": 1.0, "compile": None, "frozen": 1.4}) == ("frozen", 1.4)
  assert report.best_peer({"eager": None}) == (None, None)


def test_summary_takes_the_fastest_peer_that_ran_per_round():
  done = _done([2.0, 2.4, 2.2], {"eager": [1.0, 1.2, 1.1], "compile": [1.5, None, 1.3]})
  (g,) = report.summarize(done, "default")
  assert [r["best_peer"] for r in g["rounds"]] == ["compile", "eager", "compile"]
  assert [r["first"] for r in g["rounds"]] == ["jax", "peer", "jax"]
  # per-round ratios 2.0 / 1.5, 2.4 / 1.2, 2.2 / 1.3
  ratios = [4 / 3, 2.0, 2.2 / 1.3]
  assert [r["ratio"] for r in g["rounds"]] == pytest.approx(ratios)
  assert g["ratio"]["median"] == pytest.approx(2.2 / 1.3)
  assert (g["ratio"]["min"], g["ratio"]["max"]) == pytest.approx((4 / 3, 2.0))
  assert g["ratio"]["verdict"] == "win"
  jax_side = g["sides"]["jax"]["default"]
  assert jax_side["img_s"] == {"median": 2.2, "min": 2.0, "max": 2.4, "n": 3}
  assert jax_side["first_call_s"] == {"median": 11.0, "min": 10.0, "max": 12.0, "n": 3}
  compile_ = g["sides"]["peer"]["compile"]
  assert compile_["img_s"]["n"] == 2
  assert compile_["failures"] == ["round 1: compile failed in round 1"]
  assert g["best_peer"]["img_s"] == {"median": 1.3, "min": 1.2, "max": 1.5, "n": 3}


def test_ratio_range_across_one_is_not_a_win_in_the_markdown():
  done = _done([2.1, 1.9, 2.3], {"eager": [2.0, 2.0, 2.0]})
  groups = report.summarize(done, "default")
  report.add_targets_and_mfu(
    groups, native_bf16=False, gflop_per_img={"paper": 10.0}, peaks={"float32": 100.0}
  )
  (g,) = groups
  assert g["ratio"]["median"] == pytest.approx(1.05) and g["ratio"]["verdict"] == "not a win"
  assert g["target"] == 1.5 and g["target_met"] is False
  assert g["gflop_per_img"] == 30.0  # a train step: 3 x forward
  assert g["mfu"]["jax"] == pytest.approx(2.1 * 30.0 / 100.0)
  assert g["mfu"]["peer"] == pytest.approx(2.0 * 30.0 / 100.0)
  results = _results(groups)
  md = report.to_markdown(results)
  assert (
    "| paper | train | float32 | 8 | 2.10 (1.90-2.30) | 11.0 (10.0-12.0) | 2.00 (2.00-2.00)" in md
  )
  assert "| 1.05 (0.95-1.15) | not a win | >= 1.5x missed |" in md
  assert "Fake CPU" in md and "(partial" not in md
  json.dumps(results)


def test_no_target_for_bf16_without_native_bf16():
  groups = report.summarize(
    _done([1.0], {"eager": [1.0]}, group="paper-bfloat16-b8-train"), "default"
  )
  groups[0]["dtype"] = "bfloat16"
  report.add_targets_and_mfu(groups, native_bf16=False, gflop_per_img={}, peaks={})
  assert groups[0]["target"] is None and groups[0]["mfu"] == {}
  report.add_targets_and_mfu(groups, native_bf16=True, gflop_per_img={}, peaks={})
  assert groups[0]["target"] == 1.0


def _results(groups):
  env = {
    "cpu_model": "Fake CPU",
    "isa_flags": {"avx2": True, "avx512f": False},
    "native_bf16": False,
    "usable_cpus": 2,
    "cpu_count": 4,
    "commit": "abc123",
    "dirty": False,
    "versions": {"jax": "0.10.2"},
    "load_avg_start": [0.1, 0.2, 0.3],
  }
  probe = {
    "conv_backend": "onednn",
    "winograd": "auto",
    "openmp_runtimes": ["/x/libgomp.so.1"],
    "onednn": {
      "version": "3.2.0",
      "isa": "Intel AVX2",
      "runtime": "OpenMP, nthr:2",
      "kernels": [{"primitive": "convolution", "impl": "brgconv:avx2", "src_dtype": "f32"}],
    },
  }
  return {
    "command": "python -m experiments.benchmark",
    "mode": "full",
    "partial": False,
    "started_utc": "2026-01-01T00:00:00+00:00",
    "duration_s": 60.0,
    "environment": env,
    "load_avg_end": [0.4, 0.4, 0.4],
    "plan": {"rounds": 3, "steps": 5, "warmup": 1, "infer_batches": 4, "infer_reps": 3},
    "probes": {"jax": probe},
    "groups": groups,
    "matmul": {"jax": {"matmul": {"float32": {"n": 4096, "gflops": 100.0}}}},
    "layers": [],
    "errors": [],
    "notes": ["a note"],
  }


def test_markdown_shows_the_machine_and_failures():
  done = _done([2.0, 2.4], {"eager": [1.0, 1.2], "compile": [None, 1.3]})
  groups = report.summarize(done, "default")
  report.add_targets_and_mfu(groups, native_bf16=False, gflop_per_img={}, peaks={})
  md = report.to_markdown(_results(groups))
  assert "oneDNN 3.2.0 detected ISA Intel AVX2" in md and "brgconv:avx2 (f32)" in md
  assert "usable by the benchmark (affinity mask): 2 of 4" in md
  assert "round 0: compile failed in round 0" in md
  assert "| 0 | JAX | default 2.00 | eager 1.00, compile - | 2.00 |" in md
  assert "| 1 | PyTorch | default 2.40 | eager 1.20, compile 1.30 | 1.85 |" in md
  assert "| float32 | 4096 | 100.0 |" in md and "- a note" in md


def test_assemble_sorts_failures_into_errors_and_notes():
  """A failed JAX measurement is an error of the run; a failed PyTorch variant or ONNX Runtime
  slot is a note (and the table's failure column); contention is flagged."""
  plan = schedule.make_plan(True)
  fail = {
    "r0-demo-float32-b4-train-torch-compile": "inductor broke",
    "r0-demo-float32-b4-inference-jax-default": "oneDNN broke",
    "r0-demo-float32-b4-inference-onnxruntime-ort": "no bf16 kernel",
  }

  def runner(spec):
    if spec["id"] in fail:
      return {"error": fail[spec["id"]]}
    if spec["kind"] == "matmul":
      return {"matmul": {"float32": {"n": 1024, "gflops": 50.0}}}
    busy = 0.3 if spec["framework"] == "torch" else 0.0
    return {
      "img_s": 4.0,
      "first_call_s": 2.0,
      "foreign_cpu_share": busy,
      "openmp_runtimes": [f"/lib/{spec['framework']}/libgomp.so.1"],
    }

  done = schedule.run_schedule(schedule.schedule(plan), runner)
  env = _results([])["environment"]
  results = cli.assemble(done, plan, env, command="x", started=0.0, notes=["given"], partial=False)
  assert results["errors"] == ["r0-demo-float32-b4-inference-jax-default: oneDNN broke"]
  assert "r0-demo-float32-b4-train-torch-compile: inductor broke" in results["notes"]
  assert "r0-demo-float32-b4-inference-onnxruntime-ort: no bf16 kernel" in results["notes"]
  assert results["notes"][0] == "given" and "4 measurement(s) ran while" in results["notes"][-1]
  assert results["openmp_by_framework"] == {
    "jax": ["/lib/jax/libgomp.so.1"],
    "torch": ["/lib/torch/libgomp.so.1"],
  }
  train = next(g for g in results["groups"] if g["kind"] == "train")
  assert train["ratio"]["median"] == 1.0 and train["best_peer"]["variants"] == ["eager"]
  assert train["peak_gflops"] == 50.0
  md = report.to_markdown(json.loads(json.dumps(results)))
  assert "| not a win (1 round: no range) |" in md
  assert "| peer | eager | 4.00 | 2.0 | - | " in md and "| 30.0% | - |" in md
  assert "## Errors" in md


# ----------------------------------------------------------------------------- machine record

_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile amx_bf16
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""

_VENV = "/work/.venv/lib/python3.11/site-packages"
_MAPS = "\n".join(
  [
    f"7f00-7f01 r-xp 00000000 08:01 1 {_VENV}/torch/lib/libgomp.so.1",
    f"7f01-7f02 r--p 00001000 08:01 1 {_VENV}/torch/lib/libgomp.so.1",
    "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0",
    "7f03-7f04 r-xp 00000000 08:01 3 /opt/intel/lib/libiomp5.so",
    "7f04-7f05 r-xp 00000000 08:01 4 /usr/lib/llvm/lib/libomp.so.5",
    "7f05-7f06 r-xp 00000000 08:01 5 /work/.venv/lib/libdnnl.so.3",
    "7f06-7f07 r-xp 00000000 08:01 6 /usr/lib/libgompfoo.so",
    "7f07-7f08 rw-p 00000000 00:00 0",
    "7f08-7f09 rw-p 00000000 00:00 0 [heap]",
  ]
)

# Lines as oneDNN 3.2 (the JAX kernels' build) and 3.12 (PyTorch 2.13's) print them.
_CONV_3_2 = (
  "onednn_verbose,exec,cpu,convolution,brgconv:avx2,forward_training,"
  "src_f32::blocked:acdb::f0 wei_f32:a:blocked:Acdb16a::f0 bia_undef::undef::: "
  "dst_f32::blocked:acdb::f0,attr-scratchpad:user ,alg:convolution_direct,"
  "mb1_ic16oc16_ih8oh8kh3sh1dh0ph1_iw8ow8kw3sw1dw0pw1,0.039"
)
_VERBOSE_3_2 = "\n".join(
  [
    "onednn_verbose,info,oneDNN v3.2.0 (commit 40112196287e8866a7259df35f817229454d0c96)",
    "onednn_verbose,info,cpu,runtime:OpenMP,nthr:2",
    "onednn_verbose,info,cpu,isa:Intel AVX2",
    "onednn_verbose,info,gpu,runtime:none",
    "onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_f32::blocked:cdba::f0 "
    "dst_f32::blocked:Acdb16a::f0,attr-scratchpad:user ,,16x16x3x3,1.58",
    _CONV_3_2,
    _CONV_3_2,
    "some other line",
  ]
)
_VERBOSE_3_12 = "\n".join(
  [
    "onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71049cd69a3df32adcccb623b12cd7baa22)",
    "onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2",
    "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost and bfloat16 support",
    "onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation",
    "onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core_bf16,"
    "forward_inference,src:bf16::blocked:acdb::f0 wei:bf16:ap:blocked:AcdB16b16a2b::f0 "
    "dst:bf16::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,mb2_ic64oc64,0.2",
    "onednn_verbose,v1,primitive,exec,cpu,convolution,gemm:jit,forward_inference,"
    "src:f32::blocked:abcd::f0 wei:f32::blocked:abcd::f0 dst:f32::blocked:abcd::f0,"
    "attr-scratchpad:user,alg:convolution_direct,mb2_ic64oc64,0.3",
  ]
)


def test_cpu_info_reads_model_and_isa_flags():
  info = machine.cpu_info(_CPUINFO)
  assert info["cpu_model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
  isa = info["isa_flags"]
  assert isa["avx512f"] and isa["avx512_bf16"] and isa["amx_tile"] and isa["avx2"]
  assert not isa["avx512_vnni"] and not isa["amx_int8"] and set(isa) == set(machine.ISA_FLAGS)
  assert machine.native_bf16(isa)
  assert not machine.native_bf16(machine.cpu_info("flags : avx2 fma avx512f")["isa_flags"])
  assert machine.cpu_info("")["isa_flags"]["avx2"] is False


def test_openmp_runtimes_from_maps():
  assert machine.openmp_runtimes(_MAPS) == [
    "/opt/intel/lib/libiomp5.so",
    "/usr/lib/llvm/lib/libomp.so.5",
    "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0",
    "/work/.venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1",
  ]
  # this test process has a maps file with at least its own libraries; reading it works
  assert isinstance(machine.openmp_runtimes(machine.read_text("/proc/self/maps")), list)


def test_parse_onednn_verbose_both_layouts():
  old = machine.parse_onednn_verbose(_VERBOSE_3_2)
  assert old == {
    "version": "3.2.0",
    "isa": "Intel AVX2",
    "runtime": "OpenMP, nthr:2",
    "kernels": [{"primitive": "convolution", "impl": "brgconv:avx2", "src_dtype": "f32"}],
  }
  new = machine.parse_onednn_verbose(_VERBOSE_3_12)
  assert new["version"] == "3.12.0" and new["isa"].startswith("Intel AVX-512 with")
  assert [(k["impl"], k["src_dtype"]) for k in new["kernels"]] == [
    ("brg_conv_fwd:avx512_core_bf16", "bf16"),
    ("gemm:jit", "f32"),
  ]
  assert machine.parse_onednn_verbose("") == {
    "version": None,
    "isa": None,
    "runtime": None,
    "kernels": [],
  }


def test_bf16_meaning_names_the_dispatched_kernels():
  probes = {
    "jax": {"onednn": machine.parse_onednn_verbose(_VERBOSE_3_2)},
    "torch": {"onednn": machine.parse_onednn_verbose(_VERBOSE_3_12)},
  }
  text = cli.bf16_meaning(False, probes)
  assert text.startswith("no native bf16")
  assert "jax: no bf16 oneDNN convolution ran" in text
  assert "torch: brg_conv_fwd:avx512_core_bf16" in text


def test_busy_cpu_seconds_and_foreign_load():
  # user nice system idle iowait irq softirq steal guest guest_nice, in ticks of 1/100 s.
  stat = "cpu  100 20 30 1000 50 5 5 40 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
  assert machine.busy_cpu_seconds(stat, 100) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="not the 'cpu' total"):
    machine.busy_cpu_seconds("intr 1 2 3 4 5 6 7 8 9\n", 100)
  with machine.ForeignLoad() as foreign:
    sum(i * i for i in range(100_000))
  assert foreign.share is None or 0.0 <= foreign.share <= 1.0


# ----------------------------------------------------------------------------- children


def test_child_env(tmp_path):
  base = {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/x",
    "ONEDNN_VERBOSE": "1",
    "TVUNET_CONV_BACKEND": "xla",
    "PATH": "/bin",
  }
  jax_spec = {"id": "r0-a-jax-xla_ynn", "kind": "train", "framework": "jax", "variant": "xla_ynn"}
  env = cli.child_env(jax_spec, str(tmp_path), base)
  assert env["XLA_FLAGS"] == f"--xla_dump_to=/x {schedule.YNN_FLAGS}"
  assert env["TVUNET_CONV_BACKEND"] == "xla" and "ONEDNN_VERBOSE" not in env
  assert env["JAX_PLATFORMS"] == "cpu" and env["PYTHONPATH"].split(os.pathsep)[0] == REPO
  assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor-r0-a-jax-xla_ynn")
  default = cli.child_env({**jax_spec, "variant": "default"}, str(tmp_path), base)
  assert default["TVUNET_CONV_BACKEND"] == "auto" and default["TVUNET_WINOGRAD"] == "auto"
  probe = cli.child_env(
    {"id": "probe-torch", "kind": "probe", "framework": "torch"}, str(tmp_path), base
  )
  assert probe["ONEDNN_VERBOSE"] == "1" and probe["TVUNET_CONV_BACKEND"] == "xla"


def test_error_line_and_frameworks_loaded():
  err = "Traceback...\n  File x\nValueError: deep\nbenchmark child error: ValueError: deep\n"
  assert cli.error_line(err, 1) == "ValueError: deep"
  assert cli.error_line("Killed\n\n", -9) == "Killed (exit code -9)"
  assert cli.error_line("", 1) == "no output (exit code 1)"
  assert cli.frameworks_loaded({"numpy": 1, "jaxlib": 1}) == ["jax"]
  assert cli.frameworks_loaded({"torch": 1, "onnxruntime": 1}) == ["torch", "onnxruntime"]


def test_the_parent_imports_no_framework():
  """Planning (a dry run through `main`) leaves jax, flax and torch unimported."""
  code = (
    "import sys; from experiments.benchmark import cli; "
    "rc = cli.main(['--dry_run', '--quick']); "
    "print([m for m in ('jax', 'jaxlib', 'flax', 'torch', 'onnxruntime') "
    "if m in sys.modules], rc)"
  )
  out = (
    subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
    )
    .stdout.strip()
    .splitlines()
  )
  assert out[-1] == "[] 0"
  assert "probe-jax" in out


# ----------------------------------------------------------------------------- layers, FLOPs


def _flax_params(base, depth, num_outputs, size=32):
  model = models.UNet(base=base, depth=depth, num_outputs=num_outputs, conv_backend="xla")
  return jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32),
  )["params"]


def test_conv_layers_are_the_flax_models_kernels():
  params = _flax_params(64, 4, 2, size=128)
  kernels = {}
  for block, p in params.items():
    if "kernel" in p:
      kernels[block] = p["kernel"].shape
    else:
      kernels.update({f"{block}.{k}": v["kernel"].shape for k, v in p.items() if "kernel" in v})
  rows = layers.conv_layers(batch=8)
  by_name = {n: r for r in rows for n in r["layers"]}
  assert set(by_name) == set(kernels) and len(by_name) == 23
  assert all(tuple(by_name[n]["w"]) == shape for n, shape in kernels.items())
  assert by_name["bottleneck.conv_1"]["x"] == [8, 8, 8, 1024]
  assert by_name["up_3.conv_0"]["x"] == [8, 16, 16, 1024]
  assert by_name["upsample_0"] == {
    "layers": ["upsample_0"],
    "x": [8, 64, 64, 128],
    "w": [3, 3, 128, 64],
    "pads": [0, 1, 0, 1],
    "transposed": True,
  }
  assert by_name["head"]["pads"] == [0, 0, 0, 0]
  assert by_name["down_0.conv_1"] is by_name["up_0.conv_1"]  # same shape: listed once
  assert layers.TRANSPOSE_PADS == conv.onednn_transpose_pads("SAME", (3, 3), 2)


def test_forward_flops_hand_count():
  # 4x4 input; 2 FLOPs per multiply-add; kernel (kh, kw, Cin, Cout) at the module's resolution.
  hand = (
    2 * 16 * 9 * 1 * 2
    + 2 * 16 * 9 * 2 * 2  # down_0 at 4x4
    + 2 * 4 * 9 * 2 * 4
    + 2 * 4 * 9 * 4 * 4  # bottleneck at 2x2
    + 2 * 4 * 9 * 4 * 2  # upsample_0: 9 taps per input pixel of the 2x2 level
    + 2 * 16 * 9 * 4 * 2
    + 2 * 16 * 9 * 2 * 2  # up_0 at 4x4 (input: 2 + 2 channels)
    + 2 * 16 * 1 * 2 * 1
  )  # head
  assert hand == 7552
  assert layers.forward_flops(base=2, depth=1, num_outputs=1, size=4) == hand


def test_merge_tables():
  jax_rows = [{"layers": ["a"], "x": [1], "jax_ms": {"forward": 1.0}}]
  torch_rows = [
    {"layers": ["a"], "x": [1], "torch_ms": {"forward": 2.0}},
    {"layers": ["b"], "x": [2], "torch_ms": {"forward": 3.0}},
  ]
  merged = layers.merge_tables(jax_rows, torch_rows)
  assert merged == [
    {"layers": ["a"], "x": [1], "jax_ms": {"forward": 1.0}, "torch_ms": {"forward": 2.0}},
    {"layers": ["b"], "x": [2], "torch_ms": {"forward": 3.0}},
  ]
  assert layers.merge_tables(None, None) == []


@pytest.mark.parametrize("backend", ["xla", "onednn"])
def test_jax_table_times_each_layer_in_its_backend_form(backend, monkeypatch):
  """The per-layer table runs (batch 1, a 3x3 conv and an up-sampling) in the form the backend
  runs it in the model: oneDNN's transposed conv (with kernel names) or the sub-pixel conv."""
  if backend == "onednn" and not library.available():
    pytest.skip("oneDNN kernel library not built")
  monkeypatch.setenv(conv.ENV_BACKEND, backend)
  rows = layers.jax_table(
    1, [r for r in layers.conv_layers(batch=1) if r["layers"][0] in ("down_3.conv_0", "upsample_3")]
  )
  forms = {r["layers"][0]: r["form"] for r in rows}
  assert forms == {
    "down_3.conv_0": "conv",
    "upsample_3": ("transposed conv, stride 2" if backend == "onednn" else "sub-pixel 2x2 conv"),
  }
  for r in rows:
    assert set(r["jax_ms"]) == set(layers.OPS) and all(ms > 0 for ms in r["jax_ms"].values())
    assert ("onednn_impl" in r) == (backend == "onednn")
    # Winograd is timed beside oneDNN on the 3x3 conv; at batch 1 a 16x16 image has 16 tiles,
    # too few for the model to use it.
    wino = backend == "onednn" and r["layers"][0] == "down_3.conv_0"
    assert ("winograd_ms" in r) == wino
    if wino:
      assert r["winograd_in_model"] == [False, False, False]


def test_steps_configs_and_loss():
  loss = steps.bench_loss_config(steps.model_config("paper"))
  assert loss.dice_weight == 0.0 and loss.tv_reduction == "mean"
  assert loss.tv_weight == pytest.approx(2.4e-7)
  assert steps.model_config("demo", "bfloat16").model.dtype == "bfloat16"
  b = steps.random_batch(2, 3)
  assert b["image"].shape == (2, 128, 128, 1) and b["label"].shape == (2, 128, 128, 3)
  assert set(np.unique(b["label"])) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- the PyTorch peer


@pytest.mark.parametrize("name", ["paper", "demo"])
def test_torch_peer_has_the_flax_parameter_count(name):
  torch = pytest.importorskip("torch")
  from experiments import torch_unet

  m = steps.model_config(name).model
  model = models.UNet(base=m.base, depth=m.depth, num_outputs=m.num_outputs)
  v = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False)
  )
  with torch.device("meta"):  # shapes only: the paper net's 31M weights are never allocated
    net = torch_unet.TorchUNet(m.base, m.depth, m.dropout, m.num_outputs)
  assert torch_unet.count_params(net) == (
    models.count_params(v["params"]),
    models.count_params(v["batch_stats"]),
  )


def test_torch_peer_matches_the_paper_preset():
  """The authors' 2-channel head gives Keras' 34,535,810 total variables (models.py docstring)."""
  torch = pytest.importorskip("torch")
  from experiments import torch_unet

  with torch.device("meta"):
    net = torch_unet.TorchUNet(base=64, depth=4, num_outputs=2)
  assert sum(torch_unet.count_params(net)) == 34_535_810


def test_torch_tv_and_loss_equal_the_jax_ones():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7, 2)).astype(np.float32)  # (B, H, W, C)
  labels = (rng.random((2, 5, 7, 2)) < 0.3).astype(np.float32)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  probs = 1 / (1 + np.exp(-logits))
  p_t = nchw(probs).requires_grad_(True)
  tv_t = torch_unet.anisotropic_tv(p_t)
  tv_t.backward()
  tv_j, g_j = jax.value_and_grad(lambda p: losses.anisotropic_tv(p, "mean"))(probs)
  np.testing.assert_allclose(float(tv_t.detach()), float(tv_j), rtol=1e-6)
  np.testing.assert_allclose(p_t.grad.numpy().transpose(0, 2, 3, 1), g_j, rtol=1e-5, atol=1e-8)
  loss_t = torch_unet.tv_bce_loss(nchw(logits), nchw(labels), tv_weight=0.7)
  loss_j, _ = losses.total_loss(logits, labels, tv_weight=0.7, tv_reduction="mean", dice_weight=0.0)
  np.testing.assert_allclose(float(loss_t), float(loss_j), rtol=1e-6)


def test_torch_tv_hand_value():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet

  p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])[None, None]
  # Vertical |differences|: rows 0->1: 0,1,0; rows 1->2: 1,1,1 -> mean 4/6.
  # Horizontal: row 0: 1,1; row 1: 0,0; row 2: 0,0 -> mean 2/6.
  assert float(torch_unet.anisotropic_tv(p)) == pytest.approx(1.0)


def test_torch_forward_shape_and_bad_input():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet

  net = torch_unet.TorchUNet(base=2, depth=2, num_outputs=3).to(memory_format=torch.channels_last)
  x = torch.zeros(2, 1, 16, 12).contiguous(memory_format=torch.channels_last)
  assert tuple(net(x).shape) == (2, 3, 16, 12)
  with pytest.raises(ValueError, match="divisible by 4"):
    net(torch.zeros(1, 1, 10, 12))


def test_forward_flops_equal_a_torch_hook_count():
  """Same count from the PyTorch peer's layers as they run (independent of the layer list)."""
  torch = pytest.importorskip("torch")
  from experiments import torch_unet

  net = torch_unet.TorchUNet(base=4, depth=3, num_outputs=1).eval()
  counted = []

  def hook(module, inputs, output):
    kh, kw = module.kernel_size
    # A conv costs per output pixel; a transposed conv per input pixel (all taps once).
    h, w = (output if isinstance(module, torch.nn.Conv2d) else inputs[0]).shape[2:]
    counted.append(2 * h * w * kh * kw * module.in_channels * module.out_channels)

  for mod in net.modules():
    if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
      mod.register_forward_hook(hook)
  with torch.no_grad():
    net(torch.zeros(1, 1, 32, 32))
  assert layers.forward_flops(base=4, depth=3, num_outputs=1, size=32) == sum(counted)


def test_torch_batchnorm_follows_keras_or_the_config():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet
  from experiments.benchmark import peers

  bns = lambda net: [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  keras = torch_unet.TorchUNet(base=2, depth=1)
  assert len(bns(keras)) == 6  # two per block: down_0, bottleneck, up_0
  assert all(m.eps == 1e-3 and m.momentum == pytest.approx(0.01) for m in bns(keras))
  demo = steps.model_config("demo").model
  net = peers.build_net(demo)
  assert all(m.momentum == pytest.approx(1.0 - demo.bn_momentum) for m in bns(net))


def test_set_threads_follows_the_affinity_mask(monkeypatch):
  torch = pytest.importorskip("torch")
  from experiments import torch_unet

  before = torch.get_num_threads()
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
  try:
    assert torch_unet.set_threads() == 1
  finally:
    torch.set_num_threads(before)


def test_frozen_peer_equals_the_eager_network():
  """The frozen TorchScript graph (BatchNorm folded into the convs) computes the eager eval
  network's logits; the context of its calls has no autograd."""
  torch = pytest.importorskip("torch")
  from experiments.benchmark import peers

  torch.manual_seed(0)
  cfg = steps.model_config("demo").model
  cfg.base, cfg.depth = 2, 2
  net = peers.build_net(cfg).eval()
  for m in net.modules():  # non-trivial running statistics, so folding them matters
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
  x = torch.rand(2, 1, 16, 16).contiguous(memory_format=torch.channels_last)
  with torch.no_grad():
    want = net(x)
  frozen = peers.inference_network("frozen", net, x, None)
  with peers.call_context("frozen", None):
    got = frozen(x)
    assert not got.requires_grad
  torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
  assert peers.inference_network("eager", net, x, None) is net
  with pytest.raises(ValueError, match="unknown train variant"):
    peers.train_network("jit", net)


def test_winograd_line_counts_the_tuned_passes():
  tuning = {
    "shapes": 3,
    "measured": 2,
    "decisions": {
      "8,16,16,512,512": {"forward": True, "input_grad": False, "weight_grad": True},
      "8,32,32,256,256": {"forward": False, "input_grad": False, "weight_grad": True},
      "8,128,128,1,64": {"forward": False, "input_grad": False, "weight_grad": False},
    },
  }
  line = report.winograd_line(tuning)
  assert line.startswith("2 of 3 conv shapes use it (fwd 1, dgrad 0, wgrad 2)")
  assert "2 of 3 shapes measured in this run" in line
  md = report.to_markdown({**_results([]), "winograd_tuning": tuning})
  assert "- Winograd: 2 of 3 conv shapes" in md
