"""Statistics over the rounds and the markdown report; pure Python, fed the children's results.

Per group (model, dtype, batch, kind) and per side: the median, min and max images/s over the
rounds and of the first call's seconds (compilation and warm-up). A round's peer is the fastest
PyTorch variant that ran in it; the ratio JAX / peer is computed per round (both measured
minutes apart, in alternating order) and reported as the median of those ratios with their min
and max. A ratio whose [min, max] holds 1.0 is no result either way: it is labelled "not a win"
(median >= 1) or "not a loss" (median < 1), never "win"/"loss".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

# Ratio targets of issue 17 (JAX / best peer, median of rounds), by (model, kind, dtype); the
# bf16 train target applies only where the CPU has native bf16.
TARGETS = {
  ("paper", "train", "float32"): 1.5,
  ("paper", "train", "bfloat16"): 1.0,
  ("paper", "inference", "float32"): 1.2,
}


def stats(xs: Sequence[float]) -> dict[str, float] | None:
  """{"median", "min", "max", "n"} of the values, or None for none."""
  xs = [float(x) for x in xs if x is not None]
  if not xs:
    return None
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def verdict(ratio: Mapping[str, float] | None) -> str | None:
  """'win' (min > 1), 'loss' (max < 1), else 'not a win' (median >= 1) or 'not a loss'."""
  if ratio is None:
    return None
  if ratio["min"] > 1.0:
    return "win"
  if ratio["max"] < 1.0:
    return "loss"
  return "not a win" if ratio["median"] >= 1.0 else "not a loss"


def best_peer(peers: Mapping[str, float | None]) -> tuple[str | None, float | None]:
  """(variant, images/s) of the fastest peer variant that ran (None where none did)."""
  ran = {v: x for v, x in peers.items() if x is not None}
  if not ran:
    return None, None
  name = max(ran, key=ran.get)
  return name, ran[name]


def _rate(result: Mapping[str, Any]) -> float | None:
  return None if "error" in result else result.get("img_s")


def summarize(done: Sequence[Mapping[str, Any]], primary: str) -> list[dict[str, Any]]:
  """Per group, the rounds and their statistics.

  Args:
    done: `schedule.run_schedule` output; entries of kind train/inference are used.
    primary: the JAX variant that is the JAX side of the ratio (the plan's first).

  Returns:
    One dict per group, in order of first appearance: model, dtype, batch, kind, "rounds" (per
    round: which side ran first, every variant's images/s or None, the best peer, the ratio),
    "sides" ({"jax"|"peer"|"onnxruntime": {variant: {img_s, first_call_s, foreign_cpu_share
    stats, failures}}}),
    "best_peer" (images/s stats and the variant per round), "ratio" (stats of the per-round
    ratios + verdict), "other_ratios" (the other JAX variants and ONNX Runtime against the same
    per-round peer).
  """
  groups: dict[str, dict[str, Any]] = {}
  for entry in done:
    spec, result = entry["spec"], entry["result"]
    if spec.get("kind") not in ("train", "inference"):
      continue
    g = groups.setdefault(
      spec["group"],
      {
        "group": spec["group"],
        "model": spec["model"],
        "dtype": spec["dtype"],
        "batch": spec["batch"],
        "kind": spec["kind"],
        "primary": primary,
        "rounds": {},
        "sides": {"jax": {}, "peer": {}, "onnxruntime": {}},
      },
    )
    rnd = g["rounds"].setdefault(
      spec["round"],
      {"round": spec["round"], "first": spec["side"], "jax": {}, "peer": {}, "onnxruntime": {}},
    )
    rnd[spec["side"]][spec["variant"]] = _rate(result)
    side = g["sides"][spec["side"]].setdefault(
      spec["variant"], {"img_s": [], "first_call_s": [], "foreign": [], "failures": []}
    )
    if "error" in result:
      side["failures"].append(f"round {spec['round']}: {result['error']}")
    else:
      side["img_s"].append(result["img_s"])
      side["first_call_s"].append(result["first_call_s"])
      side["foreign"].append(result.get("foreign_cpu_share"))
  out = []
  for g in groups.values():
    rounds = [g["rounds"][r] for r in sorted(g["rounds"])]
    others: dict[str, list[float]] = {}
    for rnd in rounds:
      rnd["best_peer"], rnd["best_peer_img_s"] = best_peer(rnd["peer"])
      jax_rate = rnd["jax"].get(primary)
      rnd["ratio"] = (
        jax_rate / rnd["best_peer_img_s"]
        if jax_rate is not None and rnd["best_peer_img_s"]
        else None
      )
      for side in ("jax", "onnxruntime"):
        for v, x in rnd[side].items():
          if (side, v) != ("jax", primary) and x is not None and rnd["best_peer_img_s"]:
            others.setdefault(v, []).append(x / rnd["best_peer_img_s"])
    for side in g["sides"].values():
      for v, d in side.items():
        side[v] = {
          "img_s": stats(d["img_s"]),
          "first_call_s": stats(d["first_call_s"]),
          "foreign_cpu_share": stats(d["foreign"]),
          "failures": d["failures"],
        }
    ratio = stats([r["ratio"] for r in rounds])
    g.update(
      rounds=rounds,
      ratio={**ratio, "verdict": verdict(ratio)} if ratio else None,
      best_peer={
        "img_s": stats([r["best_peer_img_s"] for r in rounds]),
        "variants": [r["best_peer"] for r in rounds],
      },
      other_ratios={
        v: {**s, "verdict": verdict(s)} for v, xs in others.items() if (s := stats(xs))
      },
    )
    out.append(g)
  return out


def add_targets_and_mfu(
  groups: Sequence[dict[str, Any]],
  *,
  native_bf16: bool,
  gflop_per_img: Mapping[str, float],
  peaks: Mapping[str, float],
) -> None:
  """Adds "target" (ratio target or None), "target_met", "gflop_per_img", "peak_gflops" and
  "mfu" ({"jax": JAX side, "peer": best peer}: median images/s x model FLOPs / peak) in place.

  Args:
    gflop_per_img: model name -> forward GFLOP per image (a train step counts 3x).
    peaks: dtype -> the largest matmul GFLOP/s measured in the run.
  """
  for g in groups:
    target = TARGETS.get((g["model"], g["kind"], g["dtype"]))
    if g["dtype"] == "bfloat16" and not native_bf16:
      target = None  # no native bf16: the issue sets no target there
    g["target"] = target
    g["target_met"] = (g["ratio"]["median"] >= target) if target and g["ratio"] else None
    gflop = gflop_per_img.get(g["model"])
    peak = peaks.get(g["dtype"])
    g["gflop_per_img"] = gflop * (3 if g["kind"] == "train" else 1) if gflop else None
    g["peak_gflops"] = peak
    mfu = {}
    if g["gflop_per_img"] and peak:
      jax = g["sides"]["jax"].get(g["primary"], {}).get("img_s")
      for side, s in (("jax", jax), ("peer", g["best_peer"]["img_s"])):
        if s:
          mfu[side] = s["median"] * g["gflop_per_img"] / peak
    g["mfu"] = mfu


def matmul_peaks(matmul: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """dtype -> the largest GFLOP/s over the frameworks' matmul children."""
  peaks: dict[str, float] = {}
  for result in matmul.values():
    for dtype, r in (result.get("matmul") or {}).items():
      peaks[dtype] = max(peaks.get(dtype, 0.0), r["gflops"])
  return peaks


# ----------------------------------------------------------------------------- markdown


def _f(x: Any, digits: int = 2) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _range(s: Mapping[str, float] | None, digits: int = 2) -> str:
  """'2.31 (2.22-2.51)', or '2.31' for a single value, or '-'."""
  if not s:
    return "-"
  if s["n"] == 1:
    return _f(s["median"], digits)
  return f"{_f(s['median'], digits)} ({_f(s['min'], digits)}-{_f(s['max'], digits)})"


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _ms(d: Mapping[str, float] | None) -> str:
  return " / ".join(_f(d.get(k), 1) for k in ("forward", "input_grad", "weight_grad")) if d else "-"


def _verdict_cell(ratio: Mapping[str, Any] | None) -> str:
  if not ratio:
    return "-"
  return ratio["verdict"] + (" (1 round: no range)" if ratio["n"] == 1 else "")


def _machine_lines(results: Mapping[str, Any]) -> list[str]:
  env = results["environment"]
  isa = ", ".join(f for f, on in env["isa_flags"].items() if on) or "none of the listed"
  lines = [
    "## Machine",
    "",
    f"- CPU: {env['cpu_model']}; ISA: {isa}; native bf16 (avx512_bf16 or amx_bf16): "
    f"{'yes' if env['native_bf16'] else 'no'}",
    f"- CPUs usable by the benchmark (affinity mask): {env['usable_cpus']} of "
    f"{env['cpu_count']}; load average at start "
    f"{' / '.join(f'{v:.2f}' for v in env['load_avg_start'])}, at end "
    f"{' / '.join(f'{v:.2f}' for v in results.get('load_avg_end') or [])}",
  ]
  for fw, p in (results.get("probes") or {}).items():
    if "error" in p:
      lines.append(f"- {fw} probe failed: {p['error']}")
      continue
    dnn = p.get("onednn") or {}
    kernels = (
      ", ".join(
        f"{k['impl']} ({k['src_dtype']})"
        for k in dnn.get("kernels", [])
        if k["primitive"] == "convolution"
      )
      or "none seen"
    )
    setup = (
      f"conv backend {p.get('conv_backend')}, Winograd {p.get('winograd') or '-'}"
      if fw == "jax"
      else f"{p.get('threads')} threads, ATen CPU capability {p.get('cpu_capability')}"
    )
    lines.append(
      f"- {fw}: oneDNN {dnn.get('version') or '-'} detected ISA "
      f"{dnn.get('isa') or '-'}, runtime {dnn.get('runtime') or '-'}; 3x3 conv "
      f"kernels dispatched: {kernels}; {setup}; OpenMP runtimes loaded: "
      f"{', '.join(p.get('openmp_runtimes') or []) or 'none'}; malloc "
      f"{p.get('malloc', '-')}"
    )
  omp = results.get("openmp_by_framework") or {}
  if omp:
    lines.append(
      "- OpenMP runtimes mapped by the measuring children: "
      + "; ".join(f"{fw}: {', '.join(libs) or 'none'}" for fw, libs in omp.items())
    )
  if results.get("bf16_meaning"):
    lines.append(f"- bf16 here: {results['bf16_meaning']}")
  tuning = results.get("winograd_tuning")
  if tuning and "error" not in tuning:
    lines.append(f"- Winograd: {winograd_line(tuning)}")
  elif tuning:
    lines.append(f"- Winograd tuning failed ({tuning['error']}): the ISA rule decided")
  return lines


def to_markdown(results: Mapping[str, Any]) -> str:
  """The report of a results dict (as `cli` writes it to JSON)."""
  env, plan = results["environment"], results["plan"]
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
  lines = [
    "# TV-UNet benchmark"
    + (" (partial: run still going or stopped)" if results.get("partial") else ""),
    "",
    f"`{results['command']}`: {results['mode']} run, {results['started_utc']}, "
    f"{results['duration_s']:.0f} s wall clock; commit `{env['commit'][:12]}`"
    f"{' (uncommitted changes)' if env['dirty'] else ''}; {versions}.",
    "",
    f"Each measurement ran in a fresh process that imported one framework (checked in "
    f"the child); {plan['rounds']} "
    f"round(s), JAX first in even rounds and PyTorch first in odd ones. Train: "
    f"{plan['steps']} timed steps after the first call and {plan['warmup']} warm-up, "
    f"128x128, random data, BCE + TV, Adam. Inference: the network alone, "
    f"{plan['infer_batches']} batches per call, {plan['infer_reps']} timed calls. "
    "Values: median (min-max) over rounds; ratio: median (min-max) of the per-round "
    "ratios JAX / the round's fastest PyTorch variant.",
    "",
  ]
  lines += _machine_lines(results)
  groups = results.get("groups") or []
  lines += [
    "",
    "## JAX against PyTorch at its best",
    "",
    "| model | kind | dtype | batch | JAX img/s | JAX first call s | PyTorch img/s "
    "| peer per round | JAX / PyTorch | verdict | target |",
    "|---|---|---|---:|---:|---:|---:|---|---:|---|---|",
  ]
  for g in groups:
    jax = g["sides"]["jax"].get(g["primary"], {})
    target = g.get("target")
    met = {True: "met", False: "missed", None: ""}[g.get("target_met")]
    lines.append(
      f"| {g['model']} | {g['kind']} | {g['dtype']} | {g['batch']} | "
      f"{_range(jax.get('img_s'))} | {_range(jax.get('first_call_s'), 1)} | "
      f"{_range(g['best_peer']['img_s'])} | "
      f"{', '.join(v or '-' for v in g['best_peer']['variants'])} | "
      f"{_range(g['ratio'])} | {_verdict_cell(g['ratio'])} | "
      f"{f'>= {target}x {met}' if target else '-'} |"
    )
  lines += [
    "",
    "## Every variant",
    "",
    "| model | kind | dtype | batch | side | variant | img/s | first call s "
    "| / round's best PyTorch | MFU | other processes' CPU (max) | failures |",
    "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
  ]
  for g in groups:
    for side, variants in g["sides"].items():
      for v, s in variants.items():
        primary = (side, v) == ("jax", g["primary"])
        ratio = g["ratio"] if primary else g["other_ratios"].get(v)
        mfu = (
          s["img_s"]["median"] * g["gflop_per_img"] / g["peak_gflops"]
          if s["img_s"] and g.get("gflop_per_img") and g.get("peak_gflops")
          else None
        )
        lines.append(
          f"| {g['model']} | {g['kind']} | {g['dtype']} | {g['batch']} | {side} | {v} | "
          f"{_range(s['img_s'])} | {_range(s['first_call_s'], 1)} | "
          f"{_range(ratio) if side != 'peer' else '-'} | {_pct(mfu)} | "
          f"{_pct((s.get('foreign_cpu_share') or {}).get('max'))} | "
          f"{'; '.join(s['failures']) or '-'} |"
        )
  lines += [
    "",
    "## Rounds",
    "",
    "| model | kind | dtype | batch | round | first | JAX img/s "
    "| PyTorch img/s per variant | ratio |",
    "|---|---|---|---:|---:|---|---:|---|---:|",
  ]
  for g in groups:
    for r in g["rounds"]:
      jax = " / ".join(f"{v} {_f(x)}" for v, x in {**r["jax"], **r["onnxruntime"]}.items())
      peer = ", ".join(f"{v} {_f(x)}" for v, x in r["peer"].items()) or "-"
      lines.append(
        f"| {g['model']} | {g['kind']} | {g['dtype']} | {g['batch']} | {r['round']} "
        f"| {'JAX' if r['first'] != 'peer' else 'PyTorch'} | {jax} | {peer} "
        f"| {_f(r['ratio'])} |"
      )
  lines += _matmul_lines(results) + _layer_lines(results.get("layers") or [])
  for title, key in (("Notes", "notes"), ("Errors", "errors")):
    if results.get(key):
      lines += ["", f"## {title}", ""] + [f"- {e}" for e in results[key]]
  return "\n".join(lines) + "\n"


def _matmul_lines(results: Mapping[str, Any]) -> list[str]:
  matmul = results.get("matmul") or {}
  if not matmul:
    return []
  lines = [
    "",
    "## Matmul peak (GFLOP/s; MFU divides model FLOPs by the largest)",
    "",
    "| dtype | n | " + " | ".join(matmul) + " |",
    "|---|---:|" + "---:|" * len(matmul),
  ]
  dtypes = dict.fromkeys(d for r in matmul.values() for d in (r.get("matmul") or {}))
  for d in dtypes:
    row = [(r.get("matmul") or {}).get(d) for r in matmul.values()]
    n = next((x["n"] for x in row if x), "-")
    lines.append(
      f"| {d} | {n} | " + " | ".join(_f(x["gflops"], 1) if x else "-" for x in row) + " |"
    )
  return lines


def _layer_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  if not rows:
    return []
  lines = [
    "",
    "## Convolutions of the paper model (ms: forward / input grad / weight grad)",
    "",
    "| layers | x | w | JAX backend | form (JAX) | JAX | oneDNN kernels "
    "| Winograd F(4x4, 3x3) | PyTorch |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    passes = [o for o, c in zip(("fwd", "dgrad", "wgrad"), r.get("winograd_in_model") or []) if c]
    wino = _ms(r.get("winograd_ms")) + (f" (model: {', '.join(passes)})" if passes else "")
    lines.append(
      f"| {', '.join(r['layers'])} | {'x'.join(map(str, r['x']))} "
      f"| {'x'.join(map(str, r['w']))} | {r.get('backend', '-')} | {r.get('form', '-')} "
      f"| {_ms(r.get('jax_ms'))} | {' / '.join((r.get('onednn_impl') or {}).values()) or '-'} "
      f"| {wino if r.get('winograd_ms') else '-'} | {_ms(r.get('torch_ms'))} |"
    )
  return lines


def winograd_line(tuning: Mapping[str, Any]) -> str:
  """Which passes of the tuned shapes run Winograd, e.g. '3 of 11 conv shapes (fwd 2, dgrad 0,
  wgrad 3) by this CPU's table (11 shapes, 11 measured in this run)'."""
  decisions = tuning.get("decisions") or {}
  counts = {
    short: sum(bool(d.get(p)) for d in decisions.values())
    for short, p in zip(("fwd", "dgrad", "wgrad"), ("forward", "input_grad", "weight_grad"))
  }
  any_pass = sum(any(d.values()) for d in decisions.values())
  per_pass = ", ".join(f"{k} {v}" for k, v in counts.items())
  return (
    f"{any_pass} of {len(decisions)} conv shapes use it ({per_pass}), by this CPU's measured "
    f"table ({tuning.get('measured', 0)} of {tuning.get('shapes', 0)} shapes measured in this run;"
    f" `python -m tvunet_jax.tune`)"
  )
