"""Tests for `python -m tvunet_jax.tune` (the Winograd table of this machine).

What is pinned: the convs it lists for a model are the U-Net's 3x3 convs as the oneDNN backend
calls them (written out by hand from the architecture, the up blocks' fused skip halves
included); a tuning run measures each pass of each shape with positive times, writes this
machine's section and keeps other machines' sections; a second run measures nothing; a corrupt
table is named and left as it was; and the next `conv.choose` carries the table's decisions.
Timings are never asserted (they are what is measured); reps are 1 on tiny shapes.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.test_kernels import needs_onednn, onednn_library  # noqa: F401
from tvunet_jax import tune
from tvunet_jax.kernels import conv, winograd

TINY_MODEL = dict(
  base=4,
  depth=2,
  dropout=0.0,
  num_outputs=1,
  dtype="float32",
  upsample="subpixel",
  pool="reshape",
  bn_momentum=0.9,
)


def _tiny_shapes(n):
  """The tiny U-Net (base 4, depth 2) at 32x32 on oneDNN, by hand: two 3x3 convs per down block
  and in the bottleneck; each up block's first conv runs as two convs, one per half of
  [upsampled, skip], of its second conv's shape (the up-sampling is a transposed conv, not a
  3x3 pad-1 conv)."""
  return [
    ((n, 32, 32, 1), (3, 3, 1, 4), n),
    ((n, 32, 32, 4), (3, 3, 4, 4), n),
    ((n, 16, 16, 4), (3, 3, 4, 8), n),
    ((n, 16, 16, 8), (3, 3, 8, 8), n),
    ((n, 8, 8, 8), (3, 3, 8, 16), n),
    ((n, 8, 8, 16), (3, 3, 16, 16), n),
  ]


def test_model_shapes_are_the_unets_3x3_convs():
  assert tune.model_shapes(TINY_MODEL, [2], (32, 32)) == _tiny_shapes(2)
  both = tune.model_shapes(TINY_MODEL, [2, 3, 2], (32, 32))
  assert both == _tiny_shapes(2) + _tiny_shapes(3)
  assert tune.model_shapes({**TINY_MODEL, "dtype": "bfloat16"}, [2], (32, 32)) == []


@needs_onednn
def test_tune_measures_merges_and_is_then_chosen(tmp_path, monkeypatch):
  path = tmp_path / "winograd_table.json"
  other = {"Another CPU | avx2 | 64 cores | oneDNN 3.2.0": {"1,8,8,4,4": {}}}
  path.write_text(json.dumps(other))
  shapes = _tiny_shapes(2)[:3]
  lines = []
  section = tune.tune(shapes, path=str(path), reps=1, log=lines.append)
  assert lines[0].startswith("tune: 3 of 3 conv shapes to measure")
  assert set(section) == {winograd.shape_key(*s) for s in shapes}
  for passes in section.values():
    assert set(passes) == set(winograd.PASSES)
    assert all(v["direct_ms"] > 0 and v["winograd_ms"] > 0 for v in passes.values())
  on_disk = json.loads(path.read_text())
  assert on_disk[conv.machine_key()] == section and on_disk[
    "Another CPU | avx2 | 64 cores | oneDNN 3.2.0"
  ] == {"1,8,8,4,4": {}}
  before = os.stat(path).st_mtime_ns
  lines.clear()
  again = tune.tune(shapes, path=str(path), reps=1, log=lines.append)
  assert again == section and lines == [
    "tune: 0 of 3 conv shapes to measure on " + conv.machine_key()
  ]
  assert os.stat(path).st_mtime_ns == before  # nothing measured: nothing written
  monkeypatch.setenv(winograd.ENV_TABLE, str(path))
  ops = conv.choose("onednn")
  assert ops.winograd_table == winograd.decisions(section)
  summary = tune.summary(section, shapes)
  assert summary.splitlines()[1].split()[0] == winograd.shape_key(*shapes[0])


@needs_onednn
def test_a_corrupt_table_is_named_and_kept(tmp_path):
  path = tmp_path / "winograd_table.json"
  path.write_text('{"cut off": ')
  with pytest.raises(ValueError, match="winograd_table.json: unreadable Winograd table"):
    tune.tune(_tiny_shapes(1)[:1], path=str(path), reps=1, log=lambda _: None)
  assert path.read_text() == '{"cut off": '


@needs_onednn
def test_command_line_writes_the_table_and_prints_the_choice(tmp_path):
  path = tmp_path / "table.json"
  env = {**os.environ, winograd.ENV_TABLE: str(path), "XLA_FLAGS": ""}
  cmd = [
    sys.executable,
    "-m",
    "tvunet_jax.tune",
    "--config",
    "experiments/configs/tiny.py",
    "--image_size",
    "32",
    "--batch",
    "1",
    "--reps",
    "1",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "W: Winograd, d: oneDNN direct" in out.stdout
  assert len(json.loads(path.read_text())[conv.machine_key()]) == 6
  path.write_text("[1, 2]")
  bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode != 0 and "table.json: not a Winograd table" in bad.stderr
  assert path.read_text() == "[1, 2]"
