"""Embedded phantom demo: trains a small TV-UNet on synthetic chest CT in a few minutes on a CPU.

  python -m tvunet_jax.main --config experiments/configs/default.py --workdir runs/demo

On first use it writes the phantom (MedSeg file layout) to <workdir>/data/medseg_phantom and builds
the `covid19_ct_seg/paper_128` TFDS dataset in <workdir>/data/tfds. Every other config imports this
one and overrides what differs; each field is commented once, here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, dropout and data order all derive from it

  c.data = ml_collections.ConfigDict()
  c.data.manual_dir = ""  # MedSeg-layout folder; "" = <workdir>/data/medseg_phantom
  c.data.data_dir = ""  # TFDS data folder; "" = <workdir>/data/tfds
  c.data.generate_phantom = True  # write the phantom into manual_dir if it holds no tr_im.nii.gz
  c.data.phantom = ml_collections.ConfigDict()
  c.data.phantom.seed = 0  # phantom patients differ by seed
  c.data.phantom.tr_slices = 100  # independent single-slice patients (MedSeg: 100)
  c.data.phantom.tr_size = 256  # in-plane size of tr slices (MedSeg: 512)
  c.data.phantom.rp_volumes = 9  # whole volumes (MedSeg: 9); splits need ids 1..9
  c.data.phantom.rp_size = 320  # in-plane size of volumes (MedSeg: mostly 630)
  c.data.phantom.rp_slices = (20, 40)  # slices per volume, drawn in this range (inclusive)
  c.data.builder_config = "paper_128"  # TFDS config: 128x128 float32 HU slices
  c.data.target = "ground_glass"  # paper: ground-glass vs rest; or "lesion", "any"
  c.data.intensity = "lung_window"  # "raw_hu" (authors) or lung window W1500/L-600 in [0, 1]
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.flip = 0.5  # probability of a left-right flip
  c.data.augment.rotate_deg = 10.0  # max |rotation| in degrees
  c.data.augment.shift_px = 6.0  # max |shift| in pixels
  c.data.augment.hu_jitter = 20.0  # max |HU offset| added to a slice
  c.data.num_threads = 2  # host threads decoding and augmenting batches
  c.data.prefetch = 2  # batches prepared ahead of the device
  c.data.eval_split = "validation"  # split used for periodic validation and model selection
  c.data.test_split = "test"  # split evaluated once at the end ("" = skip)

  c.model = ml_collections.ConfigDict()
  c.model.base = 8  # first-level width (paper: 64); level l has base * 2**l channels
  c.model.depth = 4  # number of 2x down-samplings (paper: 4)
  c.model.dropout = 0.2  # after each pool and each skip concatenation (paper: 0.2)
  c.model.num_outputs = 1  # 1 lesion channel, or 2 as the authors (background, lesion; BCE on both)
  c.model.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters
  c.model.upsample = "subpixel"  # "subpixel" (fast on CPU) or "conv_transpose": same numbers
  c.model.pool = "reshape"  # "reshape" (fast on CPU) or "max_pool": same numbers
  c.model.bn_momentum = 0.9  # BatchNorm running-stat decay; Keras' 0.99 needs >~300 steps
  c.model.conv_backend = "auto"  # "auto": oneDNN kernels on CPU if built, else XLA; "onednn"; "xla"

  c.loss = ml_collections.ConfigDict()
  c.loss.tv_weight = 0.1  # lambda; 0 = plain U-Net. With "mean" TV lies in [0, 2]
  c.loss.tv_reduction = "mean"  # "mean" (authors' code) or "sum" (per-image textbook sum)
  c.loss.tv_kind = "anisotropic"  # "anisotropic" (paper) or "isotropic"
  c.loss.dice_weight = 0.5  # soft-Dice term: lifts a <1%-of-pixels target off all-background fast

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 16  # images per optimizer step, over all devices and hosts
  c.train.per_device_batch_size = -1  # -1: derived = global / (devices * grad_accum_steps)
  c.train.grad_accum_steps = 1  # micro-batches summed per step (BatchNorm sees each micro-batch)
  c.train.num_epochs = 10  # passes over the training split
  c.train.num_steps = -1  # > 0 overrides num_epochs
  c.train.learning_rate = 1e-3  # Adam (paper: 1e-3)
  c.train.plateau_patience = 5  # evaluations without improvement before LR x plateau_factor; 0 off
  c.train.plateau_factor = 0.1  # LR multiplier on plateau (paper: 0.1)
  c.train.min_learning_rate = 1e-5  # LR floor (paper: 1e-5)
  c.train.early_stop_patience = 0  # evaluations without improvement before stopping; 0 off
  c.train.eval_every_steps = -1  # -1: once per epoch
  c.train.checkpoint_every_steps = 50  # also at every evaluation and at the end
  c.train.keep_checkpoints = 2  # recent checkpoints kept (the best one is kept apart)
  c.train.best_metric = "eval/loss"  # validation metric that selects the best checkpoint
  c.train.best_mode = "min"  # "min" or "max" for best_metric
  c.train.log_every_steps = 10  # TensorBoard scalar interval
  c.train.init_checkpoint = ""  # weights to start from when the workdir has no checkpoint
  c.train.stop_after_steps = -1  # > 0: stop (as if preempted) after this many steps of this run

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1  # devices on the data axis; -1 = all devices of all processes
  c.mesh.fsdp = False  # split large kernels and their Adam moments over the data axis

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32  # global eval batch (padded at the end of a split)
  c.eval.threshold = 0.5  # operating threshold saved in the model contract
  c.eval.num_overlays = 4  # prediction overlays written to TensorBoard per evaluation
  c.lock()
  return c
