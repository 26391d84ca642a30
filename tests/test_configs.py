"""Configs: every file loads locked, documents its command, and comments every field."""

import importlib
import os
import re

import ml_collections
import pytest

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "configs")
NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")


def test_expected_configs_exist():
  assert {"default", "tiny", "paper_split1", "unet_baseline", "tpu", "study"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_locked_with_its_command(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  cfg = module.get_config()
  assert isinstance(cfg, ml_collections.ConfigDict) and cfg.is_locked
  with pytest.raises(AttributeError):
    cfg.train.no_such_field = 1  # a typo in an override fails instead of being ignored
  assert f"--config experiments/configs/{name}.py" in module.__doc__


def test_every_default_field_is_commented():
  with open(os.path.join(CONFIG_DIR, "default.py")) as f:
    lines = [ln for ln in f if re.match(r"\s+c\.\w+(\.\w+)* = ", ln)]
  assignments = [ln for ln in lines if "ConfigDict()" not in ln]
  assert len(assignments) > 40
  uncommented = [ln.strip() for ln in assignments if "#" not in ln]
  assert not uncommented, uncommented


def test_paper_protocol_values():
  from experiments.configs import paper_split1, unet_baseline  # pylint: disable=g-import-not-at-top

  p = paper_split1.get_config()
  assert (p.model.base, p.model.depth, p.model.dropout) == (64, 4, 0.2)
  assert (p.train.global_batch_size, p.train.learning_rate, p.train.num_epochs) == (32, 1e-3, 200)
  assert (p.train.plateau_patience, p.train.plateau_factor, p.train.min_learning_rate) == (
    5,
    0.1,
    1e-5,
  )
  assert p.train.early_stop_patience == 30 and p.train.best_metric == "eval/loss"
  assert p.data.intensity == "raw_hu" and not p.data.augment.flip
  assert (p.loss.tv_weight, p.loss.tv_reduction, p.loss.dice_weight) == (2.4e-7, "mean", 0.0)
  assert unet_baseline.get_config().loss.tv_weight == 0.0
