"""Tiny config for tests: a few-kilobyte phantom and a 4-channel U-Net; seconds on a CPU.

python -m tvunet_jax.main --config experiments/configs/tiny.py --workdir /tmp/tiny
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.unlock()
  c.data.phantom.tr_slices = 8
  c.data.phantom.tr_size = 64
  c.data.phantom.rp_size = 64
  c.data.phantom.rp_slices = (3, 4)
  c.data.augment.rotate_deg = 0.0
  c.data.num_threads = 1
  c.model.base = 4
  c.model.depth = 2
  c.train.global_batch_size = 8
  c.train.num_epochs = 1
  c.train.num_steps = 4
  c.train.eval_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.train.log_every_steps = 1
  c.eval.batch_size = 8
  c.eval.num_overlays = 2
  c.lock()
  return c
