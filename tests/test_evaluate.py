"""evaluate.py: a perfect model scores 1, numbers match training and scikit-learn, runs compare."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tvunet_jax import contract as contract_lib
from tvunet_jax import evaluate, input_pipeline, predict


class OracleModel:
  """Test double with flax's `apply` signature that predicts the ground truth exactly.

  It stores the network inputs and masks of a split and answers each input with the mask of the
  stored slice nearest to it (logit +-30), so it is right on any slice of that split.
  """

  def __init__(self, images, labels):
    self.images = jnp.asarray(images)  # (N, H, W)
    self.labels = jnp.asarray(labels)  # (N, H, W) {0, 1}

  def apply(self, variables, x, train=False):
    del variables, train
    d = jnp.sum((x[:, None, :, :, 0] - self.images[None]) ** 2, axis=(2, 3))  # (B, N)
    return jnp.where(self.labels[jnp.argmin(d, axis=1)] > 0, 30.0, -30.0)[..., None]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
  """A real 2-step tiny run (with its final test metrics) and a copy served by the oracle."""
  from tests.conftest import tiny_config_for  # pylint: disable=g-import-not-at-top
  from tvunet_jax import train  # pylint: disable=g-import-not-at-top

  cfg = tiny_config_for(tiny_data)
  cfg.train.num_steps = 2
  root = tmp_path_factory.mktemp("evaluate")
  real = str(root / "real")
  train.train_and_evaluate(cfg, real)
  oracle = str(root / "oracle")
  shutil.copytree(real, oracle, ignore=shutil.ignore_patterns("tensorboard"))
  return real, oracle


@pytest.fixture
def with_oracle(runs, tiny_data, monkeypatch):
  """`predict.load_model` serves the oracle for the workdir named 'oracle'."""
  contract = contract_lib.read(runs[0])
  src = input_pipeline.load_split(tiny_data[1], "paper_128", "test")
  pre = [
    input_pipeline.preprocess(src[i], target=contract["target"], intensity=contract["intensity"])
    for i in range(len(src))
  ]
  oracle = OracleModel(
    np.stack([p["image"][..., 0] for p in pre]), np.stack([p["label"][..., 0] for p in pre])
  )
  real_load = predict.load_model

  def load(path, mesh=None):
    if "oracle" in os.path.normpath(path).split(os.sep):
      return oracle, {}, contract
    return real_load(path, mesh)

  monkeypatch.setattr(predict, "load_model", load)
  return runs


def test_perfect_model_scores_one_at_both_resolutions(with_oracle, tiny_data, tmp_path):
  _, oracle = with_oracle
  out = evaluate.evaluate_workdirs([oracle], out_dir=str(tmp_path / "eval"))
  r = out["runs"]["oracle"]
  n_test = len(input_pipeline.load_split(tiny_data[1], "paper_128", "test"))
  native_src = input_pipeline.load_split(tiny_data[1], "native", "test")
  native_pixels = sum(native_src[i]["image"].size for i in range(len(native_src)))
  assert r["network"]["num_pixels"] == n_test * 128 * 128
  assert r["native"]["num_pixels"] == native_pixels == n_test * 64 * 64
  for res in ("network", "native"):
    m = r[res]
    assert m["tp"][4] > 0  # the split has lesions
    # At native resolution the 0/1 network output is resized back (bilinear, anti-aliased), so
    # a lesion edge pixel gets 0.2..0.8: thresholds 0.3..0.7 recover the mask exactly, 0.1 and
    # 0.9 do not (the honest cost of resampling).
    rows = slice(None) if res == "network" else slice(2, 7)
    np.testing.assert_allclose(
      m["threshold"][rows][[0, -1]], [0.1, 0.9] if res == "network" else [0.3, 0.7]
    )
    for k in ("dice", "iou", "precision", "recall", "specificity", "paper_miou"):
      np.testing.assert_array_equal(m[k][rows], 1.0, err_msg=f"{res} {k}")
      assert m["operating"][k] == 1.0
    if res == "native":
      assert m["dice"][0] < 1.0 and m["dice"][-1] < 1.0
    assert m["average_precision"] == pytest.approx(1.0, abs=1e-9 if res == "network" else 0.01)
    dice = m["per_volume"]["dice"]
    assert np.all((dice == 1.0) | np.isnan(dice)) and np.count_nonzero(dice == 1.0) >= 1
    cc = m["connectivity"]
    assert cc["component_count_mae"] == 0 and cc["isolated_fp_components_per_slice"] == 0
    assert cc["missed_lesion_fraction"] == 0
  assert r["checkpoint"]["step"] == 2


def test_network_pass_reproduces_the_training_test_metrics(runs, tmp_path):
  real, _ = runs
  out = evaluate.evaluate_workdirs([real], out_dir=str(tmp_path / "eval"), native=False)
  m = out["runs"]["real"]["network"]
  with open(os.path.join(real, "test_metrics.json")) as f:
    ref = json.load(f)  # written by train.evaluate on the same (best = last) checkpoint
  for k in ("tp", "fp", "fn", "tn"):
    np.testing.assert_array_equal(m[k], ref[k], err_msg=k)
  np.testing.assert_array_equal(m["per_volume"]["volume_id"], ref["per_volume"]["volume_id"])
  np.testing.assert_allclose(m["per_volume"]["dice"], ref["per_volume"]["dice"])
  assert out["runs"]["real"]["native"] is None


def test_average_precision_agrees_with_sklearn(runs, tiny_data, tmp_path):
  real, _ = runs
  m = evaluate.evaluate_workdirs([real], out_dir=str(tmp_path / "eval"), native=False)["runs"][
    "real"
  ]["network"]
  model, variables, contract = predict.load_model(real)
  src = input_pipeline.load_split(tiny_data[1], "paper_128", "test")
  pre = [
    input_pipeline.preprocess(src[i], target=contract["target"], intensity=contract["intensity"])
    for i in range(len(src))
  ]
  probs = predict.SlicePredictor(model, variables)(np.stack([p["image"][..., 0] for p in pre]))
  labels = np.stack([p["label"][..., 0] for p in pre])
  ref = average_precision_score(labels.ravel(), probs.ravel())
  assert abs(m["average_precision"] - ref) <= m["average_precision_max_error"] + 1e-9


def test_two_workdirs_side_by_side(with_oracle, tmp_path, capsys):
  real, oracle = with_oracle
  out = str(tmp_path / "compare")
  rc = evaluate.main(
    ["--workdir", real, "--workdir", oracle, "--out", out, "--no_progress", "--num_overlays", "3"]
  )
  assert rc == 0
  assert "oracle network: dice 1.0000" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["metrics.json", "metrics.md", "overlays.png", "pr_curve.png"]
  with open(os.path.join(out, "metrics.json")) as f:
    report = json.load(f)
  assert report["run_order"] == ["real", "oracle"] and set(report["runs"]) == {"real", "oracle"}
  assert len(report["overlay_slices"]) == 3
  for name in ("real", "oracle"):
    for res in ("network", "native"):
      assert len(report["runs"][name][res]["threshold"]) == 9
  with open(os.path.join(out, "metrics.md")) as f:
    md = f.read()
  assert "| oracle | network | 1.0000 | 1.0000 |" in md and "| real | native |" in md
  table = md.split("## The paper's table")[1].split("##")[0]
  assert sum(line.startswith("| ") and "| 0." in line for line in table.splitlines()) == 36
  overlay = matplotlib.image.imread(os.path.join(out, "overlays.png"))
  pr = matplotlib.image.imread(os.path.join(out, "pr_curve.png"))
  assert overlay.ndim == pr.ndim == 3
  assert overlay.shape[0] > overlay.shape[1] * 0.6  # 3 rows of 4 panels


@pytest.mark.parametrize(
  "args,match",
  [
    (["--workdir", "/nonexistent/run"], "/nonexistent/run"),
    (["--checkpoint", "7"], "no checkpoint at step 7"),
    (["--split", "nope"], "cannot read split 'nope'"),
  ],
)
def test_bad_arguments_one_line_error(runs, tmp_path, capsys, args, match):
  real, _ = runs
  argv = args if args[0] == "--workdir" else ["--workdir", real] + args
  out = tmp_path / "eval"
  rc = evaluate.main(argv + ["--out", str(out), "--no_progress", "--no_native"])
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
  assert rc == 2 and len(err) == 1 and match in err[0], err
  assert not out.exists() or os.listdir(out) == []


def test_overlay_slice_choice_and_parsing():
  def ex(vid, idx, area):
    mask = np.zeros((4, 4), np.uint8)
    mask.flat[:area] = 1
    return {"mask": mask, "volume_id": vid.encode(), "slice_index": idx}

  source = [ex("a", 0, 5), ex("a", 1, 0), ex("a", 2, 9), ex("b", 0, 3), ex("b", 1, 7)]
  # Volume a has the largest lesion (9), then b (7); round-robin: a2, b1, a0, b0.
  assert evaluate.choose_overlay_slices(source, "ground_glass", 3) == [("a", 2), ("b", 1), ("a", 0)]
  assert evaluate.parse_slices("rp7:3, rp8:10") == [("rp7", 3), ("rp8", 10)]
  with pytest.raises(ValueError, match="volume:slice"):
    evaluate.parse_slices("rp7")


def test_inference_does_not_import_the_training_loop():
  code = (
    "import sys, tvunet_jax.evaluate, tvunet_jax.predict; "
    "sys.exit('tvunet_jax.train' in sys.modules)"
  )
  assert (
    subprocess.run(
      [sys.executable, "-c", code],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      timeout=120,
    ).returncode
    == 0
  )
