"""The study's plan: which variants, in which order, where each run lives, and resuming.

A run is one (variant, seed). Runs are ordered seed-major (every variant of seed 0, then of
seed 1, ...) so that an interrupted study holds complete, paired seeds. A run is finished when
its workdir holds both `test_metrics.json` (written by training) and `study_volumes.json` (the
per-volume record written by `runs.evaluate_run`); finished runs are read back, never redone,
so the study resumes across sessions. This module imports no JAX: the run function is injected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

RECORD_FILE = "study_volumes.json"  # per-run, per-volume metrics; its presence marks "finished"
TEST_METRICS_FILE = "test_metrics.json"  # written by train.train_and_evaluate at the end

# Matching rule for the two TV reductions at 128 x 128: 'sum' adds the (H-1) * W vertical and
# H * (W-1) horizontal differences where 'mean' averages each set, so for a map with equal mean
# differences sum-TV = 128 * 127 * mean-TV, and lambda_sum = lambda_mean / (128 * 127) weighs
# the same.
IMAGE_SIZE = 128
SUM_PER_MEAN = IMAGE_SIZE * (IMAGE_SIZE - 1)
MEAN_WEIGHTS = (0.01, 0.1, 1.0)  # from "no visible effect" to "too strong" (TV in [0, 2])
AUTHORS_WEIGHT = 2.4e-7  # the authors' lambda with their 'mean' reduction


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of the study: the TV weight, its reduction and the convolution backend."""

  name: str
  tv_weight: float
  tv_reduction: str = "mean"
  conv_backend: str = "auto"  # "auto" = the default CPU path (oneDNN when built)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a variant trained from one seed."""

  variant: Variant
  seed: int

  def workdir(self, out: str) -> str:
    return os.path.join(out, "runs", self.variant.name, f"seed{self.seed}")


def _fmt(w: float) -> str:
  return f"{w:.2g}"


REFERENCE = Variant("unet", 0.0)
BACKEND_CHECK = Variant("unet_xla", 0.0, conv_backend="xla")


def variants(quick: bool = False) -> tuple[Variant, ...]:
  """The study's arms: U-Net first (the reference), mean-TV weights, matched sum-TV, authors'."""
  if quick:
    return (
      REFERENCE,
      Variant("tv_mean_1", 1.0),
      Variant(f"tv_sum_{_fmt(1.0 / SUM_PER_MEAN)}", 1.0 / SUM_PER_MEAN, "sum"),
    )
  mean = [Variant(f"tv_mean_{_fmt(w)}", w) for w in MEAN_WEIGHTS]
  summed = [
    Variant(f"tv_sum_{_fmt(w / SUM_PER_MEAN)}", w / SUM_PER_MEAN, "sum") for w in MEAN_WEIGHTS
  ]
  return (REFERENCE, *mean, *summed, Variant(f"tv_mean_{_fmt(AUTHORS_WEIGHT)}", AUTHORS_WEIGHT))


def matched_mean_weight(v: Variant) -> float:
  """The mean-TV weight a variant corresponds to (its own for 'mean'; x 128*127 for 'sum')."""
  return v.tv_weight * SUM_PER_MEAN if v.tv_reduction == "sum" else v.tv_weight


def make_plan(
  arms: Sequence[Variant],
  seeds: Sequence[int],
  *,
  backend_check_seeds: Sequence[int] = (),
  sum_seeds: Sequence[int] | None = None,
) -> list[Run]:
  """Seed-major run order; the XLA backend-check run closes each seed of `backend_check_seeds`.

  `sum_seeds`: the seeds the 'sum'-reduction arms run on (None: all). At the study's square
  128 x 128 inputs a matched sum-TV weight makes the same loss as its mean-TV weight
  (`SUM_PER_MEAN`: both difference maps have 128 * 127 terms), so after one seed shows it the
  sum arms add no information; they are kept to show the identity, not to test it again.
  """

  def runs_for(seed: int) -> list[Variant]:
    kept = [v for v in arms if v.tv_reduction != "sum" or sum_seeds is None or seed in sum_seeds]
    return [*kept, *([BACKEND_CHECK] if seed in backend_check_seeds else [])]

  return [Run(v, s) for s in seeds for v in runs_for(s)]


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The base recipe with the run's seed, TV weight / reduction and conv backend set."""
  cfg = base.copy_and_resolve_references()
  cfg.unlock()
  cfg.seed = run.seed
  cfg.loss.tv_weight = run.variant.tv_weight
  cfg.loss.tv_reduction = run.variant.tv_reduction
  cfg.model.conv_backend = run.variant.conv_backend
  cfg.lock()
  return cfg


def is_finished(workdir: str) -> bool:
  """True when training wrote its test metrics and the study wrote the per-volume record."""
  return all(os.path.isfile(os.path.join(workdir, f)) for f in (TEST_METRICS_FILE, RECORD_FILE))


def read_record(workdir: str) -> dict[str, Any]:
  """The per-volume record of a finished run; one-line ValueError naming the file if unusable."""
  path = os.path.join(workdir, RECORD_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable study record ({type(e).__name__}: {e})") from None
  if not isinstance(record, dict) or "volumes" not in record or "variant" not in record:
    raise ValueError(f"{path}: not a study record (no 'variant' / 'volumes')")
  return record


RunFn = Callable[[Run, ml_collections.ConfigDict, str], dict[str, Any]]


def run_study(
  plan: Sequence[Run],
  base: ml_collections.ConfigDict,
  out: str,
  run_fn: RunFn,
  *,
  budget_seconds: float = 0.0,
  on_record: Callable[[list[dict[str, Any]]], None] | None = None,
  clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
  """Runs the plan in order, skipping finished runs; returns the records of finished runs.

  Args:
    plan: runs in order (see `make_plan`).
    base: the study recipe (`experiments/configs/study.py`).
    out: the study folder; run `r` lives in `r.workdir(out)`.
    run_fn: `(run, config, workdir) -> record`; must leave `is_finished(workdir)` true.
    budget_seconds: > 0: start no new run after this long (finished runs are still read).
    on_record: called with all records so far after each run (the report is rewritten there).
    clock: seconds, for the budget.
  """
  start = clock()
  records: list[dict[str, Any]] = []
  for run in plan:
    workdir = run.workdir(out)
    if is_finished(workdir):
      records.append(read_record(workdir))
      continue
    if budget_seconds > 0 and clock() - start >= budget_seconds:
      continue  # later finished runs are still collected
    records.append(run_fn(run, run_config(base, run), workdir))
    if on_record is not None:
      on_record(records)
  return records
