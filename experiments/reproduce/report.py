"""The study's report: per-variant tables, paired differences with CIs and verdicts, the figure.

Input is the list of run records (`runs.evaluate_run`); output is `reproduce.json`,
`reproduce.md` and `reproduce_seeds.png`, each written atomically. Every function here works
on a partial study: tables cover the finished runs, and the header says "partial: k of n runs".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
import numpy as np  # noqa: E402

from experiments.reproduce import plan as plan_lib  # noqa: E402
from experiments.reproduce import stats  # noqa: E402
from tvunet_jax import (
  atomic,  # noqa: E402
  metrics,  # noqa: E402
  writers,  # noqa: E402
)

CONVERGED_DICE = 0.6  # the study's bar: the plain U-Net's test Dice at 0.5, every seed

# (key, per_volume, higher_is_better, label) of the compared metrics.
COMPARED = (
  ("dice", True, True, "Dice (3D, per volume)"),
  ("test_dice", False, True, "Dice (pooled slices)"),
  ("average_precision", False, True, "AP (pooled)"),
  ("lesion_fp", True, False, "isolated FP components (per volume)"),
  ("lesion_dice", True, True, "lesion-wise Dice"),
)
# (key, per_volume, how a seed's volumes combine, label, format) of the per-variant table.
TABLE = (
  ("test_dice", False, None, "Dice pooled", ".3f"),
  ("dice", True, "mean", "Dice 3D", ".3f"),
  ("average_precision", False, None, "AP", ".3f"),
  ("lesion_fp", True, "sum", "isolated FP comps", ".1f"),
  ("lesion_dice", True, "mean", "lesion Dice", ".3f"),
  ("lesion_hd95", True, "mean", "lesion HD95 mm", ".1f"),
  ("lesion_f1", True, "mean", "lesion F1", ".3f"),
  ("fp_volume_ml", True, "sum", "FP vol mL", ".2f"),
  ("fn_volume_ml", True, "sum", "FN vol mL", ".2f"),
)


def _num(x: Any) -> float:
  return math.nan if x is None else float(x)


def seed_values(
  records: Sequence[dict], variant: str, key: str, per_volume: bool
) -> dict[int, np.ndarray]:
  """seed -> (V,) values (volumes sorted by id) or a 0-d value, for one variant and metric."""
  out = {}
  for r in records:
    if r["variant"] != variant:
      continue
    if per_volume:
      vols = sorted(r["volumes"], key=lambda v: v["volume"])
      out[int(r["seed"])] = np.array([_num(v.get(key)) for v in vols], np.float64)
    else:
      out[int(r["seed"])] = np.asarray(_num(r.get(key)), np.float64)
  return out


def _combine(v: np.ndarray, how: str | None) -> float:
  if how is None:
    return float(v)
  finite = v[np.isfinite(v)]
  if finite.size == 0:
    return math.nan
  return float(finite.sum() if how == "sum" else finite.mean())


def variant_table(records: Sequence[dict], arms: Sequence[str]) -> dict[str, dict[str, Any]]:
  """variant -> {'seeds': [...], key: (mean, sd) over seeds of the per-seed value}."""
  out = {}
  for name in arms:
    row: dict[str, Any] = {"seeds": sorted(int(r["seed"]) for r in records if r["variant"] == name)}
    for key, per_volume, how, _, _ in TABLE:
      vals = seed_values(records, name, key, per_volume)
      row[key] = stats.mean_sd([_combine(v, how) for v in vals.values()])
    out[name] = row
  return out


def differences(
  records: Sequence[dict], arms: Sequence[str], reference: str = "unet"
) -> dict[str, dict[str, Any]]:
  """variant -> {metric: {mean, low, high, seeds, volumes, verdict}, 'sentence': str}."""
  out = {}
  for name in arms:
    if name == reference:
      continue
    entry: dict[str, Any] = {}
    clauses = []
    n_seeds = 0
    for key, per_volume, higher, label in COMPARED:
      seeds, d = stats.paired(
        seed_values(records, reference, key, per_volume),
        seed_values(records, name, key, per_volume),
      )
      if not seeds:
        entry[key] = {"seeds": [], "verdict": f"no paired seeds for {label}"}
        clauses.append(entry[key]["verdict"])
        continue
      ci = stats.bootstrap_ci(d)
      clause = stats.verdict(ci, higher_is_better=higher, metric=label)
      entry[key] = {
        "mean": ci.mean,
        "low": ci.low,
        "high": ci.high,
        "seeds": seeds,
        "volumes": ci.num_volumes,
        "verdict": clause,
      }
      clauses.append(clause)
      n_seeds = max(n_seeds, len(seeds))
    entry["sentence"] = (
      f"{name} vs {reference} ({n_seeds} paired seeds): " + "; ".join(clauses) + "."
    )
    out[name] = entry
  return out


def backend_check(records: Sequence[dict]) -> dict[str, Any] | None:
  """Final test Dice per seed, default backend vs XLA (paired), and whether it is within spread."""
  ref = seed_values(records, plan_lib.REFERENCE.name, "test_dice", False)
  xla = seed_values(records, plan_lib.BACKEND_CHECK.name, "test_dice", False)
  seeds, d = stats.paired(ref, xla)
  if not seeds:
    return None
  backends = {
    r["variant"]: r.get("conv_backend")
    for r in records
    if r["variant"] in (plan_lib.REFERENCE.name, plan_lib.BACKEND_CHECK.name)
  }
  rows = [
    {
      "seed": s,
      "default": float(ref[s]),
      "xla": float(xla[s]),
      "difference": float(xla[s] - ref[s]),
    }
    for s in seeds
  ]
  _, sd_ref = stats.mean_sd([float(ref[s]) for s in seeds])
  _, sd_xla = stats.mean_sd([float(xla[s]) for s in seeds])
  ci = stats.bootstrap_ci(d)
  spread = max(sd_ref, sd_xla) if len(seeds) > 1 else math.nan
  within = bool(abs(ci.mean) <= spread) if math.isfinite(spread) else None
  return {
    "rows": rows,
    "mean_difference": ci.mean,
    "low": ci.low,
    "high": ci.high,
    "seed_sd_default": sd_ref,
    "seed_sd_xla": sd_xla,
    "within_seed_spread": within,
    "backends": backends,
  }


def convergence(records: Sequence[dict]) -> dict[str, Any]:
  """Which plain U-Net seeds reach the bar (pooled test Dice at 0.5 >= CONVERGED_DICE)."""
  ref = seed_values(records, plan_lib.REFERENCE.name, "test_dice", False)
  ok = sorted(s for s, v in ref.items() if float(v) >= CONVERGED_DICE)
  return {
    "bar": CONVERGED_DICE,
    "seeds": sorted(ref),
    "converged": ok,
    "all": bool(ref) and len(ok) == len(ref),
  }


def _pm(m: tuple[float, float], fmt: str) -> str:
  mean, sd = m
  if not math.isfinite(mean):
    return "n/a"
  return f"{mean:{fmt}} ± {sd:{fmt}}" if math.isfinite(sd) else f"{mean:{fmt}}"


def markdown(
  meta: dict[str, Any],
  table: dict,
  diffs: dict,
  check: dict | None,
  conv: dict,
  arms_info: dict[str, tuple[float, str, float]],
) -> str:
  """The report text: header, per-variant table, differences with CIs, verdicts, backend check."""
  done, total = meta["finished_runs"], meta["planned_runs"]
  status = (
    f"**partial: {done} of {total} runs**" if done < total else f"complete: {done} of {total} runs"
  )
  lines = [
    "# Reproduction study: does the TV term help? (phantom, BCE vs BCE + TV)",
    "",
    f"Status: {status}  ",
    f"Command: `{meta['command']}`  ",
    f"Commit: `{meta['commit']}`  ",
    f"Convolutions: {meta['conv_backend']}  ",
    f"Machine: {meta['machine']}  ",
    f"Wall time of this invocation: {meta['wall_seconds'] / 60:.1f} min; summed run time of "
    f"the finished runs: {meta['run_seconds'] / 60:.1f} min  ",
    f"Recipe: `experiments/configs/study.py`; seeds {meta['seeds']}",
    "",
    f"Baseline convergence (pooled test Dice at 0.5 >= {conv['bar']}): "
    f"{len(conv['converged'])} of {len(conv['seeds'])} U-Net seeds"
    + (
      ""
      if conv["all"]
      else " -- **not every seed converged: differences are not a test of the paper's claim**"
    ),
    "",
    "## Per variant (mean ± sd over seeds)",
    "",
    "| variant | lambda | reduction | ~mean lambda | seeds | "
    + " | ".join(t[3] for t in TABLE)
    + " |",
    "|---" * (len(TABLE) + 5) + "|",
  ]
  for name, row in table.items():
    w, red, mw = arms_info[name]
    lines.append(
      f"| {name} | {w:.3g} | {red} | {mw:.3g} | {len(row['seeds'])} | "
      + " | ".join(_pm(row[k], fmt) for k, _, _, _, fmt in TABLE)
      + " |"
    )
  lines += [
    "",
    "Dice pooled: over all test slices at 128 px (`test_metrics.json`); Dice 3D and "
    "lesion-wise scores: per test volume at native resolution (volumes averaged, counts "
    "and volumes summed per seed). Isolated FP components: predicted 3D components "
    "matched to no lesion (BraTS 2023 matching, `tvunet_jax.metrics.lesionwise`). `~mean "
    "lambda`: the mean-TV weight a sum-TV weight matches (x 128*127).",
    "",
    "## Difference from the plain U-Net, paired by seed (and volume)",
    "",
    "| variant | metric | difference | 95% CI | seeds | verdict |",
    "|---" * 6 + "|",
  ]
  labels = {k: label for k, _, _, label in COMPARED}
  for name, entry in diffs.items():
    for key, _, _, _ in COMPARED:
      e = entry[key]
      if "mean" not in e:
        lines.append(f"| {name} | {labels[key]} | n/a | n/a | 0 | {e['verdict']} |")
        continue
      lines.append(
        f"| {name} | {labels[key]} | {e['mean']:+.4f} | [{e['low']:+.4f}, "
        f"{e['high']:+.4f}] | {len(e['seeds'])} | {e['verdict']} |"
      )
  lines += [
    "",
    "95% percentile bootstrap CI of the mean paired difference (variant - U-Net), "
    f"{stats.BOOTSTRAP_SAMPLES} replicates resampling seeds and, within each, volumes "
    f"(RNG seed {stats.BOOTSTRAP_SEED}).",
    "",
    "## Verdicts",
    "",
  ]
  lines += [f"- {entry['sentence']}" for entry in diffs.values()]
  if check is not None:
    lines += [
      "",
      "## Backend check: plain U-Net, default convolutions vs XLA",
      "",
      f"Backends: {check['backends']}",
      "",
      "| seed | Dice default | Dice XLA | XLA - default |",
      "|---|---|---|---|",
    ]
    lines += [
      f"| {r['seed']} | {r['default']:.4f} | {r['xla']:.4f} | {r['difference']:+.4f} |"
      for r in check["rows"]
    ]
    within = {True: "within", False: "outside", None: "undetermined (one seed)"}[
      check["within_seed_spread"]
    ]
    lines += [
      "",
      f"Mean difference {check['mean_difference']:+.4f} (95% CI "
      f"[{check['low']:+.4f}, {check['high']:+.4f}]); seed sd {check['seed_sd_default']:.4f} "
      f"(default), {check['seed_sd_xla']:.4f} (XLA): the difference is {within} the seed "
      "spread (|mean difference| <= the larger seed sd).",
    ]
  return "\n".join(lines) + "\n"


def plot_seeds(records: Sequence[dict], arms: Sequence[str], path: str) -> None:
  """Per-seed 3D Dice and isolated-FP counts per variant, a line joining each seed's runs."""
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(arms)), 4.5))
  x = np.arange(len(arms))
  seeds = sorted({int(r["seed"]) for r in records})
  for key, how, ax, title in (
    ("dice", "mean", axes[0], "Dice 3D at 0.5 (mean over volumes)"),
    ("lesion_fp", "sum", axes[1], "isolated FP components (sum)"),
  ):
    for s in seeds:
      ys = []
      for name in arms:
        v = seed_values(records, name, key, True).get(s)
        ys.append(_combine(v, how) if v is not None else math.nan)
      ax.plot(x, ys, "o-", alpha=0.7, label=f"seed {s}")
    ax.set_xticks(x, arms, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
  axes[0].set_ylim(0, 1)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  writers.save_figure(fig, path)
  plt.close(fig)


def write(
  out: str,
  prefix: str,
  records: Sequence[dict],
  arms: Sequence[plan_lib.Variant],
  meta: dict[str, Any],
  extra: dict[str, Any],
) -> str:
  """Writes `<prefix>.json`, `<prefix>.md` and `<prefix>_seeds.png` into `out`; returns the text."""
  names = [a.name for a in arms if any(r["variant"] == a.name for r in records)]
  info = {a.name: (a.tv_weight, a.tv_reduction, plan_lib.matched_mean_weight(a)) for a in arms}
  main_names = [n for n in names if n != plan_lib.BACKEND_CHECK.name]
  table = variant_table(records, names)
  diffs = differences(records, main_names)
  check = backend_check(records)
  conv = convergence(records)
  text = markdown(meta, table, diffs, check, conv, info)
  atomic.write_json(
    f"{out}/{prefix}.json",
    metrics.to_jsonable(
      {
        "meta": meta,
        "per_variant": table,
        "differences": diffs,
        "backend_check": check,
        "convergence": conv,
        "runs": list(records),
        **extra,
      }
    ),
  )
  atomic.write_text(f"{out}/{prefix}.md", text)
  if records:
    plot_seeds(records, names, f"{out}/{prefix}_seeds.png")
  return text
