"""Reproduction study machinery, no training: bootstrap CI, verdicts, plan, resuming, report."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from experiments.configs import study
from experiments.reproduce import plan as plan_lib
from experiments.reproduce import report, stats


def numpy_percentile_ci(d, samples, seed, confidence=0.95):
  """Independent transcription: loops over replicates, seeds drawn first, then volumes."""
  d = np.asarray(d, np.float64).reshape(len(d), -1)
  s, v = d.shape
  rng = np.random.default_rng(seed)
  seed_idx = rng.integers(0, s, (samples, s))
  vol_idx = rng.integers(0, v, (samples, s, v))
  means = []
  for b in range(samples):
    picked = [d[seed_idx[b, i], vol_idx[b, i, j]] for i in range(s) for j in range(v)]
    means.append(sum(picked) / len(picked))
  means = np.sort(means)
  return np.percentile(means, 100 * (1 - confidence) / 2), np.percentile(
    means, 100 * (1 + confidence) / 2
  )


def test_bootstrap_positive_shift_gives_ci_above_zero():
  rng = np.random.default_rng(0)
  d = 0.05 + 0.01 * rng.standard_normal((5, 3))  # a clear +0.05 paired shift
  ci = stats.bootstrap_ci(d)
  assert ci.low > 0 and ci.high > ci.low
  assert ci.mean == pytest.approx(d.mean())
  assert ci.low < d.mean() < ci.high
  assert (ci.num_seeds, ci.num_volumes) == (5, 3)


def test_bootstrap_zero_shift_contains_zero():
  d = np.array([[0.02, -0.01], [-0.03, 0.01], [0.01, 0.0], [-0.02, 0.02], [0.01, -0.01]])
  ci = stats.bootstrap_ci(d)
  assert ci.low < 0 < ci.high
  assert stats.direction(ci) == "contains"


@pytest.mark.parametrize("shape", [(5,), (4, 3)])
def test_bootstrap_equals_numpy_reimplementation(shape):
  d = np.random.default_rng(1).normal(0.01, 0.02, shape)
  ci = stats.bootstrap_ci(d, samples=400, seed=7)
  low, high = numpy_percentile_ci(d, 400, 7)
  assert ci.low == pytest.approx(low, abs=1e-12)
  assert ci.high == pytest.approx(high, abs=1e-12)


def test_bootstrap_by_hand_single_seed_single_volume():
  ci = stats.bootstrap_ci(np.array([[0.3]]))
  assert (ci.mean, ci.low, ci.high) == (pytest.approx(0.3),) * 3


def test_bootstrap_refuses_nan():
  with pytest.raises(ValueError, match="finite"):
    stats.bootstrap_ci(np.array([0.1, np.nan]))


def test_verdict_rule():
  above = stats.Interval(0.02, 0.01, 0.03, 5, 3)
  below = stats.Interval(-0.02, -0.03, -0.01, 5, 3)
  zero = stats.Interval(0.0, -0.01, 0.01, 5, 3)
  assert stats.verdict(above, higher_is_better=True, metric="Dice") == ("improves Dice: CI above 0")
  assert stats.verdict(below, higher_is_better=True, metric="Dice") == "worsens Dice: CI below 0"
  assert stats.verdict(below, higher_is_better=False, metric="FP") == "improves FP: CI below 0"
  assert stats.verdict(above, higher_is_better=False, metric="FP") == "worsens FP: CI above 0"
  assert stats.verdict(zero, higher_is_better=True, metric="AP").startswith(
    "no detectable difference in AP"
  )
  one_seed = stats.Interval(0.02, 0.01, 0.03, 1, 3)
  assert stats.verdict(one_seed, higher_is_better=True, metric="Dice").startswith("not enough")


def test_paired_keeps_common_finite_seeds():
  ref = {0: np.array([0.5, 0.6]), 1: np.array([0.4, 0.4]), 2: np.array([0.1, 0.2])}
  var = {0: np.array([0.6, 0.6]), 2: np.array([np.nan, 0.3]), 3: np.array([1.0, 1.0])}
  seeds, d = stats.paired(ref, var)
  assert seeds == [0]
  np.testing.assert_allclose(d, [[0.1, 0.0]])


def test_variants_and_matching_rule():
  names = [v.name for v in plan_lib.variants()]
  assert names[0] == "unet" and len(names) == len(set(names)) == 8
  mean = [v for v in plan_lib.variants() if v.tv_reduction == "mean" and v.tv_weight > 0]
  summed = [v for v in plan_lib.variants() if v.tv_reduction == "sum"]
  assert sorted(v.tv_weight for v in mean) == [2.4e-7, 0.01, 0.1, 1.0]
  # Sum-TV of a 128 x 128 map with mean difference m: 127*128 m per direction, mean-TV 2 m.
  p = np.random.default_rng(0).random((128, 128))
  mean_tv = np.abs(np.diff(p, axis=0)).mean() + np.abs(np.diff(p, axis=1)).mean()
  sum_tv = np.abs(np.diff(p, axis=0)).sum() + np.abs(np.diff(p, axis=1)).sum()
  assert [plan_lib.matched_mean_weight(v) for v in summed] == pytest.approx([0.01, 0.1, 1.0])
  for v in summed:
    w_mean = plan_lib.matched_mean_weight(v)
    assert v.tv_weight * sum_tv == pytest.approx(w_mean * mean_tv, rel=1e-9)


def test_plan_is_seed_major_with_backend_check_last():
  arms = plan_lib.variants(quick=True)
  runs = plan_lib.make_plan(arms, [0, 1, 2], backend_check_seeds=[0, 1, 2])
  assert [(r.variant.name, r.seed) for r in runs[:4]] == [
    (arms[0].name, 0),
    (arms[1].name, 0),
    (arms[2].name, 0),
    ("unet_xla", 0),
  ]
  assert [r.seed for r in runs] == [0] * 4 + [1] * 4 + [2] * 4
  assert runs[3].variant.conv_backend == "xla"
  # the backend check on the first seed only: every variant of every seed, one XLA run
  some = plan_lib.make_plan(arms, [0, 1, 2], backend_check_seeds=[0])
  assert [r.seed for r in some] == [0] * 4 + [1] * 3 + [2] * 3
  assert [r.seed for r in some if r.variant.conv_backend == "xla"] == [0]
  # the matched sum arms (the mean arms' loss at 128 x 128) on the first seed only
  fewer = plan_lib.make_plan(arms, [0, 1, 2], sum_seeds=[0])
  sums = [(r.variant.name, r.seed) for r in fewer if r.variant.tv_reduction == "sum"]
  assert sums == [(v.name, 0) for v in arms if v.tv_reduction == "sum"] and sums
  assert {r.seed for r in fewer if r.variant.tv_reduction == "mean"} == {0, 1, 2}


def test_run_config_sets_the_variant():
  run = plan_lib.Run(plan_lib.Variant("tv_sum_x", 6e-7, "sum", "xla"), 3)
  cfg = plan_lib.run_config(study.get_config(), run)
  assert (cfg.seed, cfg.loss.tv_weight, cfg.loss.tv_reduction, cfg.model.conv_backend) == (
    3,
    6e-7,
    "sum",
    "xla",
  )
  assert cfg.loss.dice_weight == 0.0 and cfg.train.num_epochs == 30 and cfg.is_locked


def fake_record(run, dice, fps):
  return {
    "variant": run.variant.name,
    "seed": run.seed,
    "tv_weight": run.variant.tv_weight,
    "tv_reduction": run.variant.tv_reduction,
    "conv_backend": "onednn",
    "test_dice": float(np.mean(dice)),
    "average_precision": float(np.mean(dice)) + 0.1,
    "isolated_fp_components_per_slice": 0.0,
    "seconds": 1.0,
    "volumes": [
      {
        "volume": f"rp{7 + i}",
        "dice": d,
        "lesion_fp": f,
        "lesion_dice": d,
        "lesion_hd95": 10.0,
        "lesion_f1": None,
        "fp_volume_ml": 0.1,
        "fn_volume_ml": 0.2,
      }
      for i, (d, f) in enumerate(zip(dice, fps))
    ],
  }


def make_fake_run_fn(calls):
  def run_fn(run, config, workdir):
    calls.append((run.variant.name, run.seed))
    shift = 0.0 if run.variant.name == "unet" else 0.05
    dice = [0.7 + shift + 0.01 * run.seed + 0.005 * i for i in range(3)]
    record = fake_record(run, dice, [3, 1, 2] if shift == 0 else [1, 0, 1])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, plan_lib.TEST_METRICS_FILE), "w") as f:
      json.dump({}, f)
    with open(os.path.join(workdir, plan_lib.RECORD_FILE), "w") as f:
      json.dump(record, f)
    return record

  return run_fn


def test_finished_runs_are_skipped(tmp_path):
  arms = plan_lib.variants(quick=True)
  runs = plan_lib.make_plan(arms, [0, 1])
  base = study.get_config("quick")
  # A run with only test_metrics.json (killed before its record) is not finished: it is redone.
  half = runs[1].workdir(str(tmp_path))
  os.makedirs(half)
  open(os.path.join(half, plan_lib.TEST_METRICS_FILE), "w").close()
  assert not plan_lib.is_finished(half)
  calls = []
  records = plan_lib.run_study(runs[:3], base, str(tmp_path), make_fake_run_fn(calls))
  assert len(calls) == 3 and len(records) == 3
  calls2 = []
  seen = []
  records2 = plan_lib.run_study(
    runs, base, str(tmp_path), make_fake_run_fn(calls2), on_record=lambda rs: seen.append(len(rs))
  )
  assert calls2 == [(r.variant.name, r.seed) for r in runs[3:]]  # only the unfinished ones
  assert [r["variant"] for r in records2] == [r.variant.name for r in runs]
  assert seen == [4, 5, 6]


def test_budget_stops_new_runs_but_reads_finished(tmp_path):
  arms = plan_lib.variants(quick=True)
  runs = plan_lib.make_plan(arms, [0, 1])
  base = study.get_config("quick")
  plan_lib.run_study(runs[3:4], base, str(tmp_path), make_fake_run_fn([]))
  ticks = itertools.chain([0.0, 10.0], itertools.repeat(100.0))  # start, run 0, then over
  calls = []
  records = plan_lib.run_study(
    runs,
    base,
    str(tmp_path),
    make_fake_run_fn(calls),
    budget_seconds=50.0,
    clock=lambda: next(ticks),
  )
  assert calls == [(runs[0].variant.name, 0)]  # first run started within the budget
  assert [(r["variant"], r["seed"]) for r in records] == [
    (runs[0].variant.name, 0),
    (runs[3].variant.name, 1),
  ]


def test_bad_record_is_one_line_error(tmp_path):
  open(tmp_path / plan_lib.RECORD_FILE, "w").write("{not json")
  with pytest.raises(ValueError, match=plan_lib.RECORD_FILE):
    plan_lib.read_record(str(tmp_path))


def test_report_on_partial_study(tmp_path):
  arms = list(plan_lib.variants(quick=True)) + [plan_lib.BACKEND_CHECK]
  runs = plan_lib.make_plan(arms[:3], [0, 1, 2], backend_check_seeds=[0, 1, 2])
  records = plan_lib.run_study(
    runs[:10], study.get_config("quick"), str(tmp_path), make_fake_run_fn([])
  )
  meta = {
    "command": "x",
    "commit": "c",
    "conv_backend": "onednn",
    "machine": "m",
    "wall_seconds": 1.0,
    "run_seconds": 10.0,
    "planned_runs": len(runs),
    "finished_runs": len(records),
    "seeds": [0, 1, 2],
  }
  text = report.write(str(tmp_path), "reproduce", records, arms, meta, {})
  assert "partial: 10 of 12 runs" in text
  data = json.loads((tmp_path / "reproduce.json").read_text())
  d = data["differences"][arms[1].name]["dice"]
  assert d["seeds"] == [0, 1, 2] and d["low"] > 0 and d["verdict"].startswith("improves")
  assert d["mean"] == pytest.approx(0.05)
  fp = data["differences"][arms[1].name]["lesion_fp"]
  assert fp["mean"] == pytest.approx(-4 / 3) and fp["verdict"].startswith("improves")
  # unet_xla ran for seeds 0, 1 (runs 3 and 7); the fake run shifts its Dice by +0.05.
  check = data["backend_check"]
  assert [r["seed"] for r in check["rows"]] == [0, 1] and check["mean_difference"] != 0
  assert (tmp_path / "reproduce_seeds.png").stat().st_size > 0
  assert "unet_xla" not in data["differences"]
  assert data["per_variant"]["unet"]["lesion_fp"][0] == pytest.approx(6.0)
