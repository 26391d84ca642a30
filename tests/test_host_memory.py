"""tvunet_jax.host_memory: glibc keeps XLA's per-run buffers mapped, so repeated runs stop
page-faulting. The policy is checked in processes of its own (it is process-wide and must be set
before JAX starts its threads); only the setting's validation runs in the test process."""

import os
import subprocess
import sys

import pytest

from tvunet_jax import host_memory

# A jitted program with a 48 MB temporary (the sorted copy), above glibc's largest mmap
# threshold (32 MiB): without the policy every run maps it afresh, 4 KiB page by page.
_PROGRAM = r"""
import resource, sys
import jax, jax.numpy as jnp
from tvunet_jax import host_memory
applied = host_memory.keep_freed_memory()
f = jax.jit(lambda x: jnp.sort(x + 1.0, axis=0)[0, 0])
x = jnp.ones((3464, 3464), jnp.float32)
for _ in range(3):
  f(x).block_until_ready()
faults = []
for _ in range(3):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(applied, host_memory.status(), min(faults))
"""


def _run(mode: str) -> tuple[str, str, int]:
  env = {**os.environ, host_memory.ENV: mode, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = ""  # one device: the fake-device count would only add threads
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                       check=True, timeout=300).stdout.split()
  return out[0], out[1], int(out[2])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")  # pylint: disable=protected-access
def test_policy_removes_page_faults_of_repeated_runs():
  applied, status, faults = _run("reuse")
  assert (applied, status) == ("True", "reuse")
  _, status_off, faults_off = _run("system")
  assert status_off == "system"
  pages = 3464 * 3464 * 4 // 4096  # one 48 MB temporary
  assert faults_off > pages // 2, faults_off  # the control: fresh pages on every run
  assert faults < pages // 20, faults


def test_bad_setting_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.setenv(host_memory.ENV, "jemalloc")
  with pytest.raises(ValueError, match="TVUNET_MALLOC must be 'reuse' or 'system', got 'jemalloc'"):
    host_memory.keep_freed_memory()
  monkeypatch.setenv(host_memory.ENV, "system")
  assert host_memory.keep_freed_memory() is False and host_memory.status() == "system"
