"""Tests for experiments/profile_step.py: the trace parsing behind its per-op table.

The trace is real (a jitted function profiled by `jax.profiler` on CPU); what is pinned is that
the oneDNN custom calls are found in the compiled HLO and named by op, that XLA's thunks are
classified, that the summed times are positive and per call, and that the profiler imports only
the benchmark's steps module.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_step
from tvunet_jax.kernels import custom_calls, library

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kind_classifies_thunk_names():
  targets = {"ffi_call.3": "oneDNN conv weight grad"}
  assert profile_step._kind("ffi_call.3", targets) == "oneDNN conv weight grad"
  assert profile_step._kind("ffi_call.9", targets) == "custom call (other)"
  assert profile_step._kind("add_maximum_fusion.2", targets) == "XLA fusion"
  assert profile_step._kind("copy.4", targets) == "copy / transpose"
  assert profile_step._kind("concatenate.1", targets) == "concatenate / pad / slice"


def test_profile_sums_thunks_of_a_jitted_function():
  """A fusion of a real jitted function shows up with a positive time; runtime bookkeeping
  events (PjRt, Python frames) are not counted as thunks."""
  f = jax.jit(lambda x: jnp.tanh(x) * 2.0 + jnp.sin(x)).lower(jnp.ones((256, 256))).compile()
  x = jnp.ones((256, 256))
  per_name, wall = profile_step.profile(lambda: jax.block_until_ready(f(x)), reps=2)
  assert wall > 0 and per_name
  assert all(us > 0 for us in per_name.values())
  assert any(profile_step._kind(n, {}) == "XLA fusion" for n in per_name), list(per_name)
  assert not any(
    n.startswith(("$", "PjitFunction", "ThunkExecutor", "end:", "Common")) or " " in n
    for n in per_name
  ), list(per_name)


@pytest.mark.skipif(not library.available(), reason="oneDNN kernel library not built")
def test_custom_call_targets_names_the_onednn_ops():
  """Every oneDNN custom call of a compiled forward + backward is mapped to its op by name."""
  w = jnp.ones((3, 3, 4, 4))

  def loss(x, w, wt):
    y = custom_calls.onednn_conv(x, w, (1, 1, 1, 1))
    return jnp.sum(custom_calls.onednn_conv_transpose(y, wt, 2, (0, 1, 0, 1)))

  x = jnp.ones((2, 8, 8, 4))
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, w, w).compile().as_text()
  kinds = sorted(profile_step._custom_call_targets(hlo).values())
  assert kinds == sorted(
    [
      "oneDNN conv forward",
      "oneDNN conv input grad",
      "oneDNN conv weight grad",
      "oneDNN transposed conv input grad",
      "oneDNN transposed conv weight grad",
    ]
  )


@pytest.mark.skipif(not library.available(), reason="oneDNN kernel library not built")
def test_custom_call_targets_names_the_winograd_ops():
  """The Winograd kernels' calls (forward, input gradient, weight gradient) are named too."""
  loss = lambda x, w: jnp.sum(custom_calls.winograd_conv(x, w) ** 2)
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
  assert sorted(profile_step._custom_call_targets(hlo).values()) == [
    "Winograd conv forward / input grad",
    "Winograd conv forward / input grad",
    "Winograd conv weight grad",
  ]


def test_profile_step_imports_the_steps_not_the_cli():
  """The profiler builds the benchmark's own step without the command line or PyTorch."""
  code = (
    "import sys; import experiments.profile_step; "
    "print('experiments.benchmark.steps' in sys.modules, "
    "'experiments.benchmark.cli' in sys.modules, 'torch' in sys.modules)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
  ).stdout.split()
  assert out == ["True", "False", "False"]
