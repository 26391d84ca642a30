"""Test set-up: 8 fake CPU devices before JAX starts, so sharding is exercised on any laptop."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs compiled by different tests (every tiny run compiles the same steps) are
# read back from a persistent cache instead of being compiled again.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.environ.get("TMPDIR", "/tmp"), "tvunet_jax_test_xla_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# No machine's measured Winograd table (`python -m tvunet_jax.tune`): the tests pin the ISA rule,
# whatever a developer has tuned on this machine; tests of the table point this at their own.
os.environ["TVUNET_WINOGRAD_TABLE"] = os.path.join(
  os.environ.get("TMPDIR", "/tmp"), "tvunet_jax_tests_no_winograd_table.json"
)
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  """The tiny config's phantom and its TFDS build, made once per test session.

  Returns (manual_dir, data_dir) as strings.
  """
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  from tvunet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("tiny_data")
  cfg = tiny.get_config()
  manual_dir, data_dir = str(root / "medseg_phantom"), str(root / "tfds")
  input_pipeline.prepare_dataset(
    manual_dir, data_dir, cfg.data.builder_config, phantom=cfg.data.phantom.to_dict()
  )
  return manual_dir, data_dir


def tiny_config_for(tiny_data):
  """The tiny config pointed at prebuilt (manual_dir, data_dir), unlocked for edits."""
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top

  cfg = tiny.get_config()
  cfg.unlock()
  cfg.data.manual_dir, cfg.data.data_dir = tiny_data
  cfg.data.generate_phantom = False
  return cfg


@pytest.fixture
def tiny_config(tiny_data):
  """The tiny config pointed at the session's prebuilt data (unlocked for per-test edits)."""
  return tiny_config_for(tiny_data)


def random_variables(model, x_shape, seed=0):
  """Random variables with `model`'s tree at input shape `x_shape`, without running its
  initialisers (no init compile). Biases, BatchNorm scales, offsets and statistics are random too,
  so they are exercised; kernels are He-scaled. Returns numpy arrays."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif name == "var":
      value = rng.uniform(0.5, 1.5, size=s.shape)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.normal(size=s.shape)
    else:  # biases, BatchNorm offsets and means
      value = 0.1 * rng.normal(size=s.shape)
    return np.asarray(value, s.dtype)

  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(x_shape, jnp.float32)
  )
  return jax.tree_util.tree_map_with_path(fill, shapes)
