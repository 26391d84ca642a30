"""Tests for the quiet console (tvunet_jax/console.py) and the main job's output.

Pinned: libraries' records below WARNING (Orbax's below ERROR) are dropped unless absl's
verbosity is >= 1, the project's own INFO lines are kept; a library's prints are held back; the
main job on the phantom prints its own lines and the closing table, none of JAX's TPU probe,
TFDS's "Downloading and preparing" and shuffling lines or the per-step metric dumps, and shows
them again at --verbosity=1.
"""

import io
import logging as py_logging
import os
import subprocess
import sys
from contextlib import redirect_stdout

from absl import logging

from tvunet_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(path, level):
  return py_logging.LogRecord("x", level, path, 1, "msg", None, None)


def test_filter_keeps_ours_and_drops_library_info():
  ours = os.path.join(ROOT, "tvunet_jax", "train.py")
  lib = "/site-packages/jax/_src/xla_bridge.py"
  orbax = "/site-packages/orbax/checkpoint/checkpointer.py"
  old = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    assert console._keep(_record(ours, py_logging.INFO))
    assert not console._keep(_record(lib, py_logging.INFO))
    assert console._keep(_record(lib, py_logging.WARNING))
    assert not console._keep(_record(orbax, py_logging.WARNING))
    assert console._keep(_record(orbax, py_logging.ERROR))
    logging.set_verbosity(1)
    assert all(console._keep(_record(p, py_logging.INFO)) for p in (lib, orbax))
  finally:
    logging.set_verbosity(old)


def test_library_prints_are_held_back_unless_verbose():
  old = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    out = io.StringIO()
    with redirect_stdout(out):
      with console.library_prints():
        print("Downloading and preparing dataset Unknown size")
      print("ours")
    assert out.getvalue() == "ours\n"
    logging.set_verbosity(1)
    out = io.StringIO()
    with redirect_stdout(out), console.library_prints():
      print("shown")
    assert out.getvalue() == "shown\n"
  finally:
    logging.set_verbosity(old)


def test_table_aligns_names():
  text = console.table("title", [("a", "1"), ("longer", "2")], "footer")
  assert text.splitlines() == ["title", "  a       1", "  longer  2", "footer"]


def _main(tmp_path, *extra):
  cmd = [
    sys.executable,
    "-m",
    "tvunet_jax.main",
    "--config",
    os.path.join(ROOT, "experiments", "configs", "tiny.py"),
    "--workdir",
    str(tmp_path / "run"),
    "--config.train.num_steps=2",
    *extra,
  ]
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
  return subprocess.run(
    cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=420
  )


def test_main_job_console_is_quiet_and_verbosity_restores_it(tmp_path):
  quiet = _main(tmp_path)
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  both = quiet.stdout + quiet.stderr
  for noise in (
    "Downloading and preparing",
    "Shuffling",
    "Unable to initialize backend",
    "train/bce=",
    "final: {",
    "Load dataset info",
  ):
    assert noise not in both, noise
  assert "test split at threshold 0.50" in quiet.stdout and "  Dice " in quiet.stdout
  assert "convolutions: " in quiet.stderr and "data: paper_128" in quiet.stderr
  (tmp_path / "again").mkdir()
  loud = _main(tmp_path / "again", "--verbosity=1")  # a fresh workdir: TFDS builds again
  assert loud.returncode == 0, loud.stderr[-3000:]
  assert "Downloading and preparing" in loud.stdout and "final: {" in loud.stderr
  assert "train/bce=" in loud.stderr
