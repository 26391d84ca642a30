"""The plain U-Net baseline: the paper protocol with the TV term off (tv_weight = 0).

  python -m tvunet_jax.main --config experiments/configs/unet_baseline.py \
      --workdir runs/paper_unet \
      --config.data.manual_dir=/path/to/medseg --config.data.generate_phantom=false
"""

from experiments.configs import paper_split1


def get_config():
  c = paper_split1.get_config()
  c.unlock()
  c.loss.tv_weight = 0.0
  c.lock()
  return c
