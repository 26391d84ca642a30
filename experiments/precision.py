r"""Does bfloat16 training keep quality? The default config trained in float32 and in bfloat16.

  python -m experiments.precision [--seeds 2] [--out experiments/results/precision]

Trains `experiments/configs/default.py` unchanged except `model.dtype` (compute dtype; parameters
stay float32) for each seed in both dtypes, with the same data, budget and seeds, evaluates each run
on the test split, and writes `precision.json` and `precision.md` (per run and mean ± std per
dtype) to `--out`. Runs live in `<out>/runs/<dtype>/seed<k>`; an interrupted comparison resumes.
The seed-to-seed spread of the float32 runs is the noise the bfloat16 mean is judged against.
About 5 minutes per run on 2 cores.
"""

from __future__ import annotations

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import argparse
import os
import sys
import time

import numpy as np

from experiments.configs import default
from tvunet_jax import atomic, train
from tvunet_jax.kernels import conv

DTYPES = ("float32", "bfloat16")
METRICS = ("dice", "iou", "precision", "recall", "average_precision")


def run(out: str, dtype: str, seed: int) -> dict:
  cfg = default.get_config()
  cfg.unlock()
  cfg.seed, cfg.model.dtype = seed, dtype
  cfg.eval.num_overlays = 0
  final = train.train_and_evaluate(cfg, os.path.join(out, "runs", dtype, f"seed{seed}"))
  return {"dtype": dtype, "seed": seed, **{k: final.get(f"test/{k}") for k in METRICS}}


def markdown(rows: list[dict], command: str, minutes: float, backend: str) -> str:
  lines = [
    f"Command: `{command}`; convolutions: {backend}; wall time {minutes:.1f} min.",
    "",
    "| dtype | seed | " + " | ".join(METRICS) + " |",
    "|---|---:" + "|---:" * len(METRICS) + "|",
  ]
  lines += [
    f"| {r['dtype']} | {r['seed']} | " + " | ".join(f"{r[k]:.4f}" for k in METRICS) + " |"
    for r in rows
  ]
  lines += ["", "| dtype | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
  for dtype in DTYPES:
    v = np.array([[r[k] for k in METRICS] for r in rows if r["dtype"] == dtype], np.float64)
    if len(v):
      sd = v.std(axis=0, ddof=1) if len(v) > 1 else np.zeros(len(METRICS))
      lines.append(
        f"| {dtype} | "
        + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(v.mean(axis=0), sd))
        + " |"
      )
  lines += ["", "Test split at threshold 0.5; mean ± sample std over seeds."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--out", default=os.path.join("experiments", "results", "precision"))
  args = parser.parse_args(argv)
  t0 = time.time()
  rows = [run(args.out, dtype, seed) for seed in range(args.seeds) for dtype in DTYPES]
  rows.sort(key=lambda r: (DTYPES.index(r["dtype"]), r["seed"]))
  command = "python -m experiments.precision " + " ".join(sys.argv[1:] if argv is None else argv)
  backend = conv.choose(default.get_config().model.conv_backend).describe()
  atomic.write_json(
    os.path.join(args.out, "precision.json"),
    {"command": command, "conv_backend": backend, "runs": rows},
  )
  md = markdown(rows, command.strip(), (time.time() - t0) / 60, backend)
  atomic.write_text(os.path.join(args.out, "precision.md"), md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
