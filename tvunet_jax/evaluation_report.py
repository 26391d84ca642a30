"""The offline evaluation's outputs: metrics.json, metrics.md (every run in one set of tables),
pr_curve.png and overlays.png, each written atomically (`evaluate.py` computes what they show).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from tvunet_jax import atomic, checkpointing, metrics, writers

RESOLUTIONS = ("network", "native")  # the two passes of `evaluate.evaluate_run`


def _passes(runs: dict[str, dict]):
  """(run name, resolution, its metrics) of every pass that ran, runs in order."""
  for name, r in runs.items():
    for res in RESOLUTIONS:
      if r.get(res) is not None:
        yield name, res, r[res]


def fmt(v: Any, digits: int = 4) -> str:
  """A number with `digits` decimals; 'n/a' for None, NaN and infinities."""
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return f"{v:.{digits}f}"


def markdown_report(runs: dict[str, dict], split: str) -> str:
  """All runs in one set of markdown tables (summary, per threshold, connectivity, volumes)."""
  out = [f"# Evaluation on split `{split}`", ""]
  for name, r in runs.items():
    c = r["contract"]
    out.append(
      f"- **{name}**: `{r['checkpoint']['path']}` (step {r['checkpoint']['step']}), "
      f"target {c['target']}, intensity {c['intensity']}, network "
      f"{c['image_size'][0]}x{c['image_size'][1]}, operating threshold {c['threshold']}"
    )
  out += [
    "",
    "`paper_miou` is the authors' smoothed per-pixel score (>= 0.98 for any "
    "prediction), not an IoU; read `iou` and `class_mean_iou`.",
    "",
    "## Summary at the operating threshold",
    "",
    "| run | resolution | Dice | IoU | class-mean IoU | precision | recall | specificity | "
    "AP | mean volume Dice | paper_miou |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, res, m in _passes(runs):
    op = m["operating"]
    out.append(
      f"| {name} | {res} | {fmt(op['dice'])} | {fmt(op['iou'])} | "
      f"{fmt(op['class_mean_iou'])} | {fmt(op['precision'])} | "
      f"{fmt(op['recall'])} | {fmt(op['specificity'])} | "
      f"{fmt(m['average_precision'])} | {fmt(m['mean_volume_dice'])} | "
      f"{fmt(op['paper_miou'])} |"
    )
  out += [
    "",
    "## The paper's table (per threshold)",
    "",
    "| run | resolution | threshold | precision | recall | Dice | IoU | specificity | "
    "class-mean IoU | paper_miou |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, res, m in _passes(runs):
    for i, t in enumerate(m["threshold"]):
      out.append(
        f"| {name} | {res} | {t:.1f} | {fmt(m['precision'][i])} | "
        f"{fmt(m['recall'][i])} | {fmt(m['dice'][i])} | {fmt(m['iou'][i])} | "
        f"{fmt(m['specificity'][i])} | {fmt(m['class_mean_iou'][i])} | "
        f"{fmt(m['paper_miou'][i])} |"
      )
  out += [
    "",
    "## Connectivity (per slice, 8-connected, at the operating threshold)",
    "",
    "| run | resolution | slices | predicted components | true components | "
    "count MAE | isolated FP / slice | isolated FP fraction | missed lesions |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, res, m in _passes(runs):
    cc = m["connectivity"]
    out.append(
      f"| {name} | {res} | {cc['num_slices']} | {fmt(cc['mean_pred_components'], 2)}"
      f" | {fmt(cc['mean_true_components'], 2)} | "
      f"{fmt(cc['component_count_mae'], 2)} | "
      f"{fmt(cc['isolated_fp_components_per_slice'], 2)} | "
      f"{fmt(cc['isolated_fp_fraction'], 3)} | "
      f"{fmt(cc['missed_lesion_fraction'], 3)} |"
    )
  out += [
    "",
    "## Lesion-wise (3D components per volume, native resolution; BraTS 2023 "
    "lesion-wise Dice and HD95, autoPET FP/FN volume)",
    "",
    "| run | volume | lesions | predicted | lesion Dice | lesion HD95 mm | detection F1 | "
    "FP mL | FN mL |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in runs.items():
    lw = (r.get("native") or {}).get("lesionwise")
    for vid, v in (lw or {}).get("per_volume", {}).items():
      out.append(
        f"| {name} | {vid} | {v['num_gt_lesions']} | {v['num_pred_components']} | "
        f"{fmt(v['lesion_dice'])} | {fmt(v['lesion_hd95'], 1)} | "
        f"{fmt(v['lesion_f1'])} | {fmt(v['fp_volume_ml'], 3)} | "
        f"{fmt(v['fn_volume_ml'], 3)} |"
      )
  out += [
    "",
    "## Per-volume Dice (operating threshold)",
    "",
    "| run | resolution | volume | slices | Dice |",
    "|---|---|---|---|---|",
  ]
  for name, res, m in _passes(runs):
    pv = m["per_volume"]
    for vid, ns, d in zip(pv["volume_id"], pv["num_slices"], pv["dice"]):
      out.append(f"| {name} | {res} | {vid} | {int(ns)} | {fmt(float(d))} |")
  return "\n".join(out) + "\n"


def plot_pr_curves(runs: dict[str, dict], path: str) -> None:
  """Precision-recall curves of every run and resolution in one PNG."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(5.5, 5))
  ax = fig.add_subplot(1, 1, 1)
  for k, (name, r) in enumerate(runs.items()):
    color = f"C{k}"
    for res, style in zip(RESOLUTIONS, ("-", "--")):
      m = r.get(res)
      if m is None:
        continue
      pr = m["pr_curve"]
      ax.plot(
        pr["recall"],
        pr["precision"],
        style,
        color=color,
        label=f"{name} {res} (AP {fmt(m['average_precision'], 3)})",
      )
  ax.set_xlabel("recall")
  ax.set_ylabel("precision")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  ax.set_title("Precision-recall (pixels)")
  writers.save_figure(fig, path)


def plot_overlays(runs: dict[str, dict], keys: Sequence[tuple[str, int]], path: str) -> None:
  """Rows = slices; columns = CT (lung window) | ground truth (green) | each run (red)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  first = next(iter(runs.values()))
  keys = [k for k in keys if all(k in r["overlays"] for r in runs.values())]
  if not keys:
    return
  cols = 2 + len(runs)
  fig = Figure(figsize=(2.6 * cols, 2.7 * len(keys)))
  for i, key in enumerate(keys):
    image, label, _ = first["overlays"][key]
    panels = []
    for r in runs.values():
      _, _, probs = r["overlays"][key]
      thr = float(r["contract"]["threshold"])
      # (H, 3W, 3): CT | truth | prediction; the prediction column differs per run.
      panels.append(writers.overlay_panels(image[None], label[None], probs[None], thr))
    w = image.shape[1]
    columns = [panels[0][:, :w], panels[0][:, w : 2 * w]] + [p[:, 2 * w :] for p in panels]
    titles = ["CT", "ground truth"] + list(runs)
    for j, (panel, title) in enumerate(zip(columns, titles)):
      ax = fig.add_subplot(len(keys), cols, i * cols + j + 1)
      ax.imshow(panel)
      ax.set_axis_off()
      ax.set_title(f"{title}" + (f"\n{key[0]} slice {key[1]}" if j == 0 else ""), fontsize=8)
  writers.save_figure(fig, path)


def write_outputs(
  runs: dict[str, dict], split: str, out_dir: str, overlay_keys: Sequence[tuple[str, int]]
) -> dict[str, str]:
  """metrics.json, metrics.md, pr_curve.png, overlays.png into `out_dir`; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    k: os.path.join(out_dir, f)
    for k, f in (
      ("json", "metrics.json"),
      ("markdown", "metrics.md"),
      ("pr_curve", "pr_curve.png"),
      ("overlays", "overlays.png"),
    )
  }
  payload = {
    "split": split,
    "versions": checkpointing.library_versions(),
    "overlay_slices": [list(k) for k in overlay_keys],
    "run_order": list(runs),  # the JSON writer sorts keys
    "runs": {name: {k: v for k, v in r.items() if k != "overlays"} for name, r in runs.items()},
  }
  atomic.write_json(paths["json"], metrics.to_jsonable(payload))
  atomic.write_text(paths["markdown"], markdown_report(runs, split))
  plot_pr_curves(runs, paths["pr_curve"])
  plot_overlays(runs, overlay_keys, paths["overlays"])
  return paths
