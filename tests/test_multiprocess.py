"""Two local processes joined by `jax.distributed` (CPU collectives) train the tiny config."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_agree(tiny_data, tmp_path):
  manual_dir, data_dir = tiny_data
  port = _free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    PYTHONPATH=ROOT,
  )
  procs, logs = [], []
  for pid in range(2):
    cmd = [
      sys.executable,
      "-m",
      "tvunet_jax.main",
      "--config",
      os.path.join(ROOT, "experiments", "configs", "tiny.py"),
      "--workdir",
      str(tmp_path / "run"),
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={pid}",
      f"--config.data.manual_dir={manual_dir}",
      f"--config.data.data_dir={data_dir}",
      "--config.data.generate_phantom=false",
      "--config.train.num_steps=3",
      "--alsologtostderr",
      "--verbosity=1",
    ]  # the final JSON line is logged at 1
    # Own process group: on failure the whole group is killed (these processes can ignore TERM).
    # Output to files, not pipes: at --verbosity=1 a process whose pipe is not being read fills
    # it and blocks, and its peer then waits for it in a collective forever.
    logs.append(open(tmp_path / f"process{pid}.log", "w+"))  # noqa: SIM115 (closed below)
    procs.append(
      subprocess.Popen(
        cmd,
        cwd=str(tmp_path),
        env=env,
        stdout=logs[-1],
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
      )
    )
  outputs = []
  try:
    for p, log in zip(procs, logs):
      p.wait(timeout=420)
      log.seek(0)
      outputs.append(log.read())
  finally:
    for p, log in zip(procs, logs):
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      log.close()
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {pid} failed:\n{out[-3000:]}"
  finals = []
  for out in outputs:
    assert "process 0 of 2" in out or "process 1 of 2" in out
    assert "4 global devices" in out
    match = re.search(r"final: (\{.*\})", out)
    assert match, out[-2000:]
    finals.append(json.loads(match.group(1)))
  # Each process fingerprints its own local copy of the replicated parameters.
  assert finals[0]["param_fingerprint"] == finals[1]["param_fingerprint"]
  assert finals[0]["test/loss"] == finals[1]["test/loss"]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")
