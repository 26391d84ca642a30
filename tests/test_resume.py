"""Resume from any kill: the two checkpoint managers disagreeing, leftovers of killed saves and
builds, config changes on resume, and a randomized SIGKILL loop ending bit-identical."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tvunet_jax import input_pipeline, resume, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(folder):
  return sorted(int(s) for s in os.listdir(folder) if s.isdigit())


def _raw_state(step_dir):
  """The saved train state of one step folder as a tree of numpy arrays (no target needed)."""
  with ocp.PyTreeCheckpointer() as ck:
    return ck.restore(os.path.join(step_dir, "state"))


def _assert_same_state(a_dir, b_dir):
  a, b = _raw_state(a_dir), _raw_state(b_dir)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture
def short_config(tiny_config):
  tiny_config.data.test_split = ""
  tiny_config.train.num_steps = 4
  tiny_config.train.eval_every_steps = 2
  tiny_config.train.checkpoint_every_steps = 2
  return tiny_config


@pytest.fixture
def straight(short_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  train.train_and_evaluate(short_config, workdir)
  return workdir


def _drop_checkpoints(workdir, from_step):
  for s in _steps(os.path.join(workdir, "checkpoints")):
    if s >= from_step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(s)))


def _assert_same_run(straight, workdir):
  """Same latest checkpoints and the same single best checkpoint, bit for bit."""
  assert _steps(os.path.join(workdir, "checkpoints")) == _steps(
    os.path.join(straight, "checkpoints")
  )
  for s in _steps(os.path.join(straight, "checkpoints")):
    _assert_same_state(
      os.path.join(straight, "checkpoints", str(s)), os.path.join(workdir, "checkpoints", str(s))
    )
  (best,) = _steps(os.path.join(straight, "best"))
  assert _steps(os.path.join(workdir, "best")) == [best]
  _assert_same_state(
    os.path.join(straight, "best", str(best)), os.path.join(workdir, "best", str(best))
  )


def test_best_ahead_of_latest_resumes_and_keeps_best(short_config, straight, tmp_path):
  """Killed after best/S committed and before checkpoints/S did: the next start must finish."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(short_config, workdir)
  (best,) = _steps(os.path.join(workdir, "best"))
  _drop_checkpoints(workdir, best)
  train.train_and_evaluate(short_config, workdir)  # resumes before S, reaches S again
  _assert_same_run(straight, workdir)


def test_latest_ahead_of_best_repairs_best(short_config, straight, tmp_path):
  """Killed after checkpoints/S committed and before best/S did: best/S is written at start."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(short_config, workdir)
  (best,) = _steps(os.path.join(workdir, "best"))
  shutil.rmtree(os.path.join(workdir, "best", str(best)))
  _drop_checkpoints(workdir, best + 1)  # the kill came right after checkpoints/S committed
  train.train_and_evaluate(short_config, workdir)
  _assert_same_run(straight, workdir)


def test_leftover_temporary_checkpoint_folders_are_ignored(short_config, straight, tmp_path):
  """Killed while both managers were writing step 4: their temporary folders are left over."""
  workdir = str(tmp_path / "run")
  short_config.train.stop_after_steps = 2
  train.train_and_evaluate(short_config, workdir)
  for manager in ("checkpoints", "best"):
    tmp = os.path.join(workdir, manager, "4.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(tmp, "state"))
    with open(os.path.join(tmp, "state", "partial"), "wb") as f:
      f.write(b"\0" * 100)
  short_config.train.stop_after_steps = -1
  train.train_and_evaluate(short_config, workdir)
  for manager in ("checkpoints", "best"):
    assert not [n for n in os.listdir(os.path.join(workdir, manager)) if "tmp" in n]
  _assert_same_run(straight, workdir)


def test_checkpoints_left_over_by_a_kill_are_pruned_at_start(short_config, straight, tmp_path):
  """Killed after a new checkpoint (and a new best) committed and before Orbax deleted the
  oldest: more than `keep` latest and two best steps are left, and the run has nothing left to
  save. The next start removes the extra oldest ones and leaves the straight run's folders."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(short_config, workdir)
  keep = short_config.train.keep_checkpoints
  latest = _steps(os.path.join(workdir, "checkpoints"))
  (best,) = _steps(os.path.join(workdir, "best"))
  shutil.copytree(  # an older step the kill left behind, as Orbax would have written it
    os.path.join(workdir, "checkpoints", str(latest[0])), os.path.join(workdir, "checkpoints", "1")
  )
  shutil.copytree(os.path.join(workdir, "best", str(best)), os.path.join(workdir, "best", "1"))
  assert len(_steps(os.path.join(workdir, "checkpoints"))) == keep + 1
  train.train_and_evaluate(short_config, workdir)
  _assert_same_run(straight, workdir)


def test_new_learning_rate_on_resume_is_used_and_history_kept(short_config, tmp_path):
  workdir = str(tmp_path / "run")
  short_config.train.stop_after_steps = 2
  train.train_and_evaluate(short_config, workdir)
  short_config.train.stop_after_steps = -1
  short_config.train.learning_rate = 2.5e-4
  train.train_and_evaluate(short_config, workdir)
  opt_state = _raw_state(os.path.join(workdir, "checkpoints", "4"))["opt_state"]
  assert float(opt_state["hyperparams"]["learning_rate"]) == pytest.approx(2.5e-4)
  first = _raw_state(os.path.join(workdir, "checkpoints", "2"))["opt_state"]
  assert float(first["hyperparams"]["learning_rate"]) == pytest.approx(1e-3)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["learning_rate"] == pytest.approx(1e-3)  # the first start's
  with open(os.path.join(workdir, "config_history.json")) as f:
    history = json.load(f)
  assert [h["start_step"] for h in history] == [0, 2]
  assert {"field": "train.learning_rate", "old": 1e-3, "new": 2.5e-4} in history[1]["changes"]
  assert {"field": "train.stop_after_steps", "old": 2, "new": -1} in history[1]["changes"]


def test_changed_model_field_on_resume_is_refused(short_config, tmp_path):
  workdir = str(tmp_path / "run")
  short_config.train.stop_after_steps = 2
  train.train_and_evaluate(short_config, workdir)
  short_config.loss.tv_weight = 0.5
  with pytest.raises(
    ValueError,
    match=r"^config field loss.tv_weight may not change on resume: "
    r"checkpoint 0.1, now 0.5",
  ):
    train.train_and_evaluate(short_config, workdir)
  short_config.loss.tv_weight = 0.1
  short_config.model.dropout = 0.3
  with pytest.raises(ValueError, match="config field model.dropout may not change"):
    train.train_and_evaluate(short_config, workdir)
  with open(os.path.join(workdir, "config_history.json")) as f:
    assert len(json.load(f)) == 1  # refused starts record nothing
  assert _steps(os.path.join(workdir, "checkpoints")) == [2]


def test_config_rules_hand_cases():
  saved = {"seed": 0, "train": {"num_steps": 4, "global_batch_size": 8}, "data": {"x": (1, 2)}}
  assert resume.config_changes(
    saved, {"seed": 0, "train": {"num_steps": 9, "global_batch_size": 8}, "data": {"x": [1, 2]}}
  ) == [("train.num_steps", 4, 9)]
  with pytest.raises(ValueError, match="train.global_batch_size may not change"):
    resume.config_changes(
      saved, {"seed": 0, "train": {"num_steps": 4, "global_batch_size": 16}, "data": {"x": [1, 2]}}
    )
  with pytest.raises(
    ValueError, match="model.extra may not change on resume: checkpoint '<absent>'"
  ):
    resume.config_changes(saved, {**saved, "model": {"extra": 1}})


# ----------------------------------------------------------------------------- killed builds


_PREPARE = """
import sys
from experiments.configs import tiny
from tvunet_jax import input_pipeline
cfg = tiny.get_config()
input_pipeline.prepare_dataset(sys.argv[1], sys.argv[2], cfg.data.builder_config,
                               phantom=cfg.data.phantom.to_dict())
"""


def _kill_when(cmd, appears, timeout=120.0):
  """Starts `cmd`, SIGKILLs it as soon as `appears()` is true; True if it was killed so."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.monotonic()
  try:
    while proc.poll() is None and time.monotonic() - t0 < timeout:
      if appears():
        proc.kill()
        proc.wait()
        return True
      time.sleep(0.005)
    return False
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _leftovers(root):
  return [
    os.path.join(d, n)
    for d, dirs, files in os.walk(root)
    for n in dirs + files
    if n.startswith(".tmp-") or n.startswith("incomplete.")
  ]


@pytest.mark.slow
def test_killed_phantom_and_tfds_build_recover(tiny_data, tmp_path):
  manual, data = str(tmp_path / "medseg_phantom"), str(tmp_path / "tfds")
  cmd = [sys.executable, "-c", _PREPARE, manual, data]

  def phantom_started():
    return any(
      n.startswith(".tmp-medseg_phantom-") and os.listdir(os.path.join(tmp_path, n))
      for n in os.listdir(tmp_path)
    )

  assert _kill_when(cmd, phantom_started), "the phantom was never seen being written"
  assert not os.path.exists(manual)  # a killed phantom never appears under its final name

  def tfds_started():
    folder = os.path.join(data, "covid19_ct_seg")
    if not os.path.isdir(folder):
      return False
    return any(n.startswith("incomplete.") for d, dirs, _ in os.walk(folder) for n in dirs)

  assert _kill_when(cmd, tfds_started), "the TFDS build was never seen running"
  assert os.path.isdir(manual)
  cfg_name = "paper_128"
  input_pipeline.prepare_dataset(
    manual, data, cfg_name, phantom={"seed": 0}
  )  # manual_dir is complete: not regenerated
  assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))
  for split in ("train", "validation", "test"):
    got, ref = (input_pipeline.load_split(d, cfg_name, split) for d in (data, tiny_data[1]))
    assert len(got) == len(ref)
    key = lambda src: sorted(
      (str(src[i]["volume_id"]), int(src[i]["slice_index"]), i) for i in range(len(src))
    )
    for (_, _, i), (_, _, j) in zip(key(got), key(ref)):
      np.testing.assert_array_equal(got[i]["image"], ref[j]["image"])
      np.testing.assert_array_equal(got[i]["mask"], ref[j]["mask"])


# ----------------------------------------------------------------------------- SIGKILL loop


def _main_cmd(workdir):
  return [
    sys.executable,
    "-m",
    "tvunet_jax.main",
    "--config",
    "experiments/configs/tiny.py",
    "--workdir",
    workdir,
    "--config.train.num_steps=16",
    "--config.data.test_split=",
  ]


def _steps_or_empty(folder):
  return _steps(folder) if os.path.isdir(folder) else []


def _triggers(workdir):
  """Named moments of the main job, each a predicate on what is on disk right now. The first
  start generates the data, later ones resume; a trigger that cannot happen in a start is
  replaced by a random time."""
  data = os.path.join(workdir, "data")
  ckpt, best = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "best")

  def tmp_in(folder):
    return os.path.isdir(folder) and any("tmp" in n for n in os.listdir(folder))

  def phantom_writing():
    return os.path.isdir(data) and any(
      n.startswith(".tmp-medseg_phantom-") for n in os.listdir(data)
    )

  def tfds_building():
    root = os.path.join(data, "tfds", "covid19_ct_seg")
    return os.path.isdir(root) and any(
      n.startswith("incomplete.") for _, ds, _ in os.walk(root) for n in ds
    )

  start = set(_steps_or_empty(ckpt))
  return {
    "phantom being written": phantom_writing,
    "TFDS build running": tfds_building,
    "latest checkpoint being saved": lambda: tmp_in(ckpt),
    "best checkpoint being saved": lambda: tmp_in(best),
    "latest committed, best not (between the saves)": lambda: bool(
      set(_steps_or_empty(ckpt)) - start
      and max(_steps_or_empty(ckpt)) > max(_steps_or_empty(best) or [-1])
    ),
    "right after a new checkpoint": lambda: bool(set(_steps_or_empty(ckpt)) - start),
  }


def _window(workdir):
  """A description of where a kill landed, read from what is on disk."""
  parts = []
  for sub in ("data/medseg_phantom", "data/tfds"):
    parts.append(
      f"{sub.split('/')[-1]}={'yes' if os.path.isdir(os.path.join(workdir, sub)) else 'no'}"
    )
  for manager in ("checkpoints", "best"):
    folder = os.path.join(workdir, manager)
    if os.path.isdir(folder):
      names = os.listdir(folder)
      parts.append(
        f"{manager}={_steps(folder)}" + ("+tmp" if any("tmp" in n for n in names) else "")
      )
  return " ".join(parts)


@pytest.mark.slow
def test_randomized_sigkill_loop_ends_bit_identical(tmp_path):
  """At least 5 SIGKILLs at random moments of the main job, then the same command to the end:
  the final and best checkpoints equal those of an uninterrupted run, bit for bit."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  straight = str(tmp_path / "straight")
  t0 = time.monotonic()
  subprocess.run(_main_cmd(straight), cwd=ROOT, env=env, check=True, capture_output=True)
  duration = time.monotonic() - t0
  rng = random.Random(int(os.environ.get("TVUNET_KILL_SEED", "0")))
  workdir = str(tmp_path / "killed")
  windows = []
  for start in range(12):
    if len(windows) >= 6:
      break
    triggers = _triggers(workdir)
    names = list(triggers)[:2] if start == 0 else list(triggers)[2:] + ["random time"]
    name = rng.choice(names)
    deadline = time.monotonic() + rng.uniform(0.1, 0.9) * duration  # the fallback moment
    proc = subprocess.Popen(
      _main_cmd(workdir),
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      start_new_session=True,
    )
    fired = None
    while proc.poll() is None:
      if name in triggers and triggers[name]():
        fired = name
      elif time.monotonic() > deadline:
        fired = f"random time (waiting for: {name})"
      if fired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        windows.append(f"{fired}: {_window(workdir)}")
        break
      time.sleep(0.002)
    if not fired:
      assert proc.returncode == 0, f"a start failed after kills at: {windows}"
      break  # finished before the kill: nothing left to interrupt
  print("\nkill windows:\n  " + "\n  ".join(windows))
  final = subprocess.run(_main_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True)
  assert final.returncode == 0, final.stderr[-2000:]
  assert len(windows) >= 5, windows  # the loop must actually have interrupted the job
  _assert_same_run(straight, workdir)
