"""Cloud / Colab TPU: the paper network in bfloat16 compute with a large global batch.

  python -m tvunet_jax.main --config experiments/configs/tpu.py --workdir runs/tpu

On a multi-host TPU slice run the same command on every host: `jax.distributed` reads the slice
from the environment. The workdir (and data) must be a local path that every host sees, e.g. a
bucket mounted with gcsfuse or an NFS share; `gs://` URLs are not supported yet. Parameters and
optimizer state stay float32; activations are bfloat16. The
learning rate follows the linear scaling rule from the paper's 1e-3 at batch 32.
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.unlock()
  c.model.base = 64
  c.model.bn_momentum = 0.99  # Keras' default, as the authors
  c.model.dtype = "bfloat16"
  c.model.upsample = "conv_transpose"  # the CPU-specific rewrite buys nothing on TPU
  c.model.pool = "max_pool"
  c.loss.tv_weight = 0.1
  c.train.global_batch_size = 256
  c.train.learning_rate = 1e-3 * 256 / 32
  c.train.num_epochs = 200
  c.train.early_stop_patience = 30
  c.train.checkpoint_every_steps = 200
  c.data.num_threads = 8
  c.data.prefetch = 4
  c.eval.batch_size = 256
  c.lock()
  return c
