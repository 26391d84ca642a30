"""The authors' protocol (TV-UNet, split 1) on whatever data `data.manual_dir` holds.

  python -m tvunet_jax.main --config experiments/configs/paper_split1.py --workdir runs/paper_tv \
      --config.data.manual_dir=/path/to/medseg --config.data.generate_phantom=false

128x128 slices in raw HU, base-64 U-Net, BCE + TV, Adam 1e-3, batch 32, up to 200 epochs, learning
rate x0.1 after 5 validations without improvement down to 1e-5, early stopping after 30, best
checkpoint by validation loss, no augmentation. The TV weight is the authors' released 2.4e-7 with
the `mean` reduction: at that weight the term is ~1e-7 of the BCE and cannot shape the output, so
this config is, in effect, the plain U-Net. To test the paper's claim give the term a weight that
matters, e.g. `--config.loss.tv_weight=0.1` (see README: what lambda and the reduction do).
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.unlock()
  c.data.intensity = "raw_hu"
  c.data.augment.flip = 0.0
  c.data.augment.rotate_deg = 0.0
  c.data.augment.shift_px = 0.0
  c.data.augment.hu_jitter = 0.0
  c.model.base = 64
  c.model.num_outputs = (
    2  # the authors' head: sigmoid (background, ground-glass), Keras BCE on both
  )
  c.model.bn_momentum = 0.99  # Keras' default, as the authors
  c.loss.tv_weight = 2.4e-7
  c.loss.tv_reduction = "mean"
  c.loss.dice_weight = 0.0  # the authors' loss is BCE + TV only
  c.train.global_batch_size = 32
  c.train.num_epochs = 200
  c.train.plateau_patience = 5
  c.train.early_stop_patience = 30
  c.train.checkpoint_every_steps = 500
  c.train.keep_checkpoints = 3
  c.lock()
  return c
