"""Input pipeline: the built TFDS dataset -> grain -> global `jax.Array` batches on the mesh.

Owns everything between the array_record files and the device: random-access reading
(`tfds.data_source`), the per-process shard, the seeded per-epoch shuffle, augmentation, intensity
handling, the training target, batching, prefetching and the placement of each process's rows into
one global batch sharded over the mesh's data axis. It knows nothing of the model.

Determinism and resume: the training stream is a pure function of (seed, step). Batch `k` is
`batched[k]` of a grain `MapDataset` (shuffle -> augment -> batch), whose indices past one epoch
re-shuffle with a per-epoch seed, so the iterator state is just `{"step": k}`; restoring it replays
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
import scipy.ndimage
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from tfds_builder import covid19_ct_seg
from tvunet_jax import atomic, console

# Lung window (W 1500, L -600): the intensity range a radiologist reads lung infection in.
LUNG_WINDOW = (-1350.0, 150.0)
AIR_HU = -1000.0
TARGETS = {
  "ground_glass": (1,),  # the paper's target: ground-glass opacity vs everything else
  "lesion": (1, 2),  # ground-glass or consolidation
  "any": (1, 2, 3),  # every labelled finding, effusion included
}
INTENSITIES = ("raw_hu", "lung_window")


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training-time augmentation; all off reproduces the paper's protocol.

  flip: probability of a left-right flip. rotate_deg / shift_px: maximum absolute in-plane rotation
  (degrees) and translation (pixels), drawn uniformly. hu_jitter: maximum absolute HU offset added
  to the whole slice (scanner calibration differences).
  """

  flip: float = 0.0
  rotate_deg: float = 0.0
  shift_px: float = 0.0
  hu_jitter: float = 0.0

  @property
  def enabled(self) -> bool:
    return bool(self.flip or self.rotate_deg or self.shift_px or self.hu_jitter)


def data_dirs(workdir: str, manual_dir: str = "", data_dir: str = "") -> tuple[str, str]:
  """(manual_dir, data_dir) of a run: the configured folders, else <workdir>/data/{medseg_phantom,
  tfds} (the embedded phantom's default home)."""
  return (
    manual_dir or os.path.join(workdir, "data", "medseg_phantom"),
    data_dir or os.path.join(workdir, "data", "tfds"),
  )


def prepare_dataset(
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  builder_config: str,
  phantom: dict | None = None,
) -> None:
  """Makes `covid19_ct_seg/<builder_config>` exist in `data_dir`.

  With `phantom` (keyword arguments of `phantom.write_medseg_phantom`), a missing or empty
  `manual_dir` is filled with the synthetic phantom first; a non-empty one is taken as data (the
  builder names any file it lacks). An existing complete TFDS build is reused as is.
  """
  manual_dir = os.path.abspath(os.fspath(manual_dir))
  if phantom is not None and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
    from tvunet_jax import phantom as phantom_lib  # pylint: disable=g-import-not-at-top

    # Generated beside the target and renamed into place: an interrupted run never leaves a
    # partial phantom under manual_dir. A non-empty manual_dir is data and is never replaced.
    # Process 0 is the only writer, so a leftover temporary folder is a killed start's: removed.
    parent, name = os.path.split(manual_dir)
    if os.path.isdir(parent):
      for stale in os.listdir(parent):
        if stale.startswith(f"{atomic.TEMP_PREFIX}{name}-"):
          shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    with atomic.replacing_dir(manual_dir, overwrite=True) as tmp:
      phantom_lib.write_medseg_phantom(tmp, overwrite=True, **phantom)
  covid19_ct_seg.build(manual_dir, data_dir, builder_config)


def prepare_data(config: Any, workdir: str) -> str:
  """A run's data, by process 0 (the others wait): the phantom if configured and absent, and the
  TFDS build (`prepare_dataset`, TFDS's prints held back by `console`); returns data_dir."""
  d = config.data
  manual_dir, data_dir = data_dirs(workdir, d.manual_dir, d.data_dir)
  if jax.process_index() == 0:
    t0 = time.time()
    with console.library_prints():  # TFDS's "Downloading and preparing dataset Unknown size"
      prepare_dataset(
        manual_dir,
        data_dir,
        d.builder_config,
        phantom=d.phantom.to_dict() if d.generate_phantom else None,
      )
    logging.info("data: %s in %s (%.0f s)", d.builder_config, data_dir, time.time() - t0)
  multihost_utils.sync_global_devices("data prepared")
  return data_dir


def volume_names(source) -> list[str]:
  """Sorted volume ids of a split (decodes every example: call once per split)."""
  return sorted({source[i]["volume_id"].decode() for i in range(len(source))})


def load_split(data_dir: str | os.PathLike, config: str, split: str):
  """Random-access source of one split of `covid19_ct_seg/<config>` (no TensorFlow needed)."""
  return tfds.data_source(
    f"{covid19_ct_seg.NAME}/{config}", split=split, data_dir=os.fspath(data_dir), download=False
  )


def lung_window(hu: np.ndarray) -> np.ndarray:
  """HU -> the lung window (W 1500, L -600) mapped to [0, 1], float32, same shape."""
  lo, hi = LUNG_WINDOW
  return ((np.clip(np.asarray(hu, np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def preprocess_image(image: np.ndarray, *, intensity: str = "raw_hu") -> np.ndarray:
  """HU -> the network's intensity (`raw_hu` as given, or the lung window in [0, 1]); float32,
  same shape. The one intensity path of training, evaluation and inference."""
  image = np.asarray(image, np.float32)
  if intensity == "lung_window":
    return lung_window(image)
  if intensity != "raw_hu":
    raise ValueError(f"unknown intensity {intensity!r}; choose from {INTENSITIES}")
  return image


def preprocess(
  example: dict, *, target: str = "ground_glass", intensity: str = "raw_hu"
) -> dict[str, np.ndarray]:
  """One decoded TFDS example -> model input and target.

  Returns:
    image: (H, W, 1) float32, HU (`raw_hu`, as the authors fed it) or the lung window mapped
      to [0, 1] (`lung_window`).
    label: (H, W, 1) float32 in {0, 1}: mask value in `TARGETS[target]`.
  """
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; choose from {sorted(TARGETS)}")
  image = preprocess_image(example["image"], intensity=intensity)
  label = np.isin(example["mask"], TARGETS[target]).astype(np.float32)
  return {"image": image[..., None], "label": label[..., None]}


def augment_example(example: dict, rng: np.random.Generator, aug: Augment) -> dict:
  """Random flip / rotation / shift / HU offset of one raw example (before `preprocess`).

  Image resampled bilinearly with air outside the field of view; masks by nearest neighbour so
  labels stay integers.
  """
  image = np.asarray(example["image"], np.float32)
  mask = np.asarray(example["mask"])
  if aug.flip and rng.random() < aug.flip:
    image, mask = image[:, ::-1], mask[:, ::-1]
  if aug.rotate_deg or aug.shift_px:
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    shift = rng.uniform(-aug.shift_px, aug.shift_px, size=2)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    center = (np.array(image.shape) - 1) / 2.0
    offset = center - rot @ (center + shift)  # output pixel o samples input rot @ o + offset
    image = scipy.ndimage.affine_transform(
      image, rot, offset, order=1, mode="constant", cval=AIR_HU
    )
    mask = scipy.ndimage.affine_transform(mask, rot, offset, order=0, mode="constant", cval=0)
  if aug.hu_jitter:
    image = image + np.float32(rng.uniform(-aug.hu_jitter, aug.hu_jitter))
  return {**example, "image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask)}


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding | None):
  """This process's rows of a batch -> one global `jax.Array` per key, split along axis 0."""
  if sharding is None:
    return batch
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class TrainIterator:
  """Endless, seeded, resumable stream of training batches.

  Each `next()` returns `{"image": (B, H, W, 1) f32, "label": (B, H, W, 1) f32}` where B is the
  global batch: this process contributes `local_batch_size` rows. Batches are prefetched by a
  thread pool (decoding and scipy release the GIL). `get_state()`/`set_state()` are JSON-able.
  """

  def __init__(
    self,
    source,
    *,
    local_batch_size: int,
    seed: int,
    target: str = "ground_glass",
    intensity: str = "raw_hu",
    augment: Augment = Augment(),
    sharding: jax.sharding.Sharding | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
  ):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    per_process = len(source) // pc
    if per_process < local_batch_size:
      raise ValueError(
        f"train split has {len(source)} slices over {pc} process(es): "
        f"{per_process} per process, fewer than the per-process batch "
        f"{local_batch_size}"
      )
    # Strided shards of equal length: every process sees the same number of batches per epoch.
    ds = grain.MapDataset.source(source)[pi::pc][:per_process].seed(seed).shuffle()
    if augment.enabled:
      ds = ds.random_map(lambda ex, rng: augment_example(ex, rng, augment))
    ds = ds.map(lambda ex: preprocess(ex, target=target, intensity=intensity))
    self._batched = ds.batch(local_batch_size, drop_remainder=True)
    self.steps_per_epoch = len(self._batched)
    self._sharding = sharding
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads))
    self._prefetch = max(1, prefetch)
    self._queue: collections.deque = collections.deque()
    self._step = 0

  def _fill(self):
    while len(self._queue) < self._prefetch:
      step = self._step + len(self._queue)
      self._queue.append(self._pool.submit(self._batched.__getitem__, step))

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    self._fill()
    batch = self._queue.popleft().result()
    self._step += 1
    self._fill()
    return to_global(batch, self._sharding)

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: dict[str, int]) -> None:
    for f in self._queue:
      f.cancel()
    self._queue.clear()
    self._step = int(state["step"])

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(
  source,
  *,
  local_batch_size: int,
  target: str = "ground_glass",
  intensity: str = "raw_hu",
  sharding: jax.sharding.Sharding | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
):
  """One ordered pass over an evaluation split, padded so every process yields the same count.

  Yields `(batch, meta)`: batch holds global arrays "image", "label" (B, H, W, 1) f32 and "valid"
  (B,) f32 (0 for padding rows); meta holds this process's host-side rows: "volume_id" (b,) str,
  "slice_index" (b,) int32, "valid" (b,) bool, "spacing" (b, 3) float32.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  indices = list(range(pi, len(source), pc))
  per_process = -(-len(source) // pc)
  num_batches = -(-per_process // local_batch_size)
  template = preprocess(source[0], target=target, intensity=intensity)
  for b in range(num_batches):
    rows = indices[b * local_batch_size : (b + 1) * local_batch_size]
    examples = [source[i] for i in rows]
    pre = [preprocess(ex, target=target, intensity=intensity) for ex in examples]
    pad = local_batch_size - len(pre)  # uneven shards and the last batch are padded
    image = np.stack([p["image"] for p in pre] + [np.zeros_like(template["image"])] * pad)
    label = np.stack([p["label"] for p in pre] + [np.zeros_like(template["label"])] * pad)
    valid = np.array([1.0] * len(pre) + [0.0] * pad, np.float32)
    meta = {
      "volume_id": np.array([ex["volume_id"].decode() for ex in examples] + [""] * pad),
      "slice_index": np.array([ex["slice_index"] for ex in examples] + [-1] * pad, np.int32),
      "valid": valid > 0,
      "spacing": np.array([ex["spacing"] for ex in examples] + [[0.0] * 3] * pad, np.float32),
    }
    yield to_global({"image": image, "label": label, "valid": valid}, sharding), meta
