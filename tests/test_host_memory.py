"""tvunet_jax.host_memory: the opt-in glibc policy. It is checked in processes of its own (it is
process-wide and must be set before JAX starts its threads); only the setting's validation runs
in the test process."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tvunet_jax import host_memory

# The policy set before JAX is imported (as the entry points do), then a jitted program with a
# 48 MB temporary run a few times: the settings must hold and the program's result must not
# change. Whether page faults go away depends on how the heap fragments (see host_memory's
# docstring); the benchmark's A/B measures the effect, not this test.
_PROGRAM = r"""
import resource, sys
from tvunet_jax import host_memory
applied = host_memory.keep_freed_memory()  # before JAX's threads exist, as the entry points do
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sort(x * x, axis=0)[:, 0].sum())
x = jnp.arange(3464 * 3464, dtype=jnp.float32).reshape(3464, 3464) % 7.0
print(applied, host_memory.status(), *[float(f(x)) for _ in range(3)])
"""


def _run(mode: str | None) -> list[str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  env.pop(host_memory.ENV, None)
  if mode is not None:
    env[host_memory.ENV] = mode
  return subprocess.run(
    [sys.executable, "-c", _PROGRAM],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  ).stdout.split()


_GLIBC = host_memory._glibc() is not None  # pylint: disable=protected-access


@pytest.mark.skipif(not _GLIBC, reason="glibc only")
def test_policy_is_opt_in_and_keeps_results():
  """Unset: malloc is left alone. 'reuse': every mallopt setting is accepted (status 'reuse'),
  and the program's result is the same as under 'system' and equals numpy's."""
  default, system, reuse = _run(None), _run("system"), _run("reuse")
  assert default[:2] == ["False", "system"] and system[:2] == ["False", "system"]
  assert reuse[:2] == ["True", "reuse"]
  x = np.arange(3464 * 3464, dtype=np.float32).reshape(3464, 3464) % 7.0
  want = float(np.sort(x * x, axis=0)[:, 0].sum())
  assert [float(v) for v in reuse[2:]] == [float(v) for v in system[2:]] == [want] * 3


def test_bad_setting_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.setenv(host_memory.ENV, "jemalloc")
  with pytest.raises(ValueError, match="TVUNET_MALLOC must be 'reuse' or 'system', got 'jemalloc'"):
    host_memory.keep_freed_memory()
  monkeypatch.setenv(host_memory.ENV, "system")
  assert host_memory.keep_freed_memory() is False and host_memory.status() == "system"
