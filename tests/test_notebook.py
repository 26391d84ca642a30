"""The Colab notebook's code runs on CPU with the tiny config (so it cannot rot)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_tpu.ipynb")


def notebook_script(parameters: str) -> str:
  """The notebook's code cells as one script, with the parameters cell replaced."""
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert "parameters" in cells[0]["metadata"]["tags"]
  return "\n\n".join([parameters] + ["".join(c["source"]) for c in cells[1:]])


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_tiny_config(tiny_data, tmp_path):
  manual_dir, data_dir = tiny_data
  params = "\n".join(
    [
      'CONFIG = "experiments/configs/tiny.py"',
      f'WORKDIR = "{tmp_path / "run"}"',
      f'MEDSEG_DIR = "{manual_dir}"',
      f'EXTRA_FLAGS = ["--config.data.data_dir={data_dir}", "--config.train.num_steps=2"]',
      "INSTALL = False",
    ]
  )
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script(params))
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT,
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  proc = subprocess.run(
    [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "Summary at the operating threshold" in proc.stdout
  assert "pr_curve.png" in proc.stdout and "overlays.png" in proc.stdout
  # the export cell: both formats with the contract, and predict from the export alone
  assert "'model.onnx'" in proc.stdout and "'model.stablehlo'" in proc.stdout
  assert "'model_contract.json'" in proc.stdout and "'1_mask.nii.gz'" in proc.stdout
