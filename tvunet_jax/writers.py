"""The one logging place: TensorBoard event files (tensorboardX, no TensorFlow) and the console.

Only process 0 writes. Scalar keys are prefixed `train/`, `eval/` or `test/` by the caller;
overlays show CT (lung window), ground truth and prediction side by side.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from tvunet_jax.input_pipeline import lung_window


class MetricWriter:
  """Writes scalars and images under `<workdir>/tensorboard`; a no-op on processes other than 0."""

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer is None:
      return
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), step)
    self._writer.flush()
    # Every scalar is in TensorBoard; the console shows them at --verbosity=1.
    logging.vlog(
      1, "step %d: %s", step, ", ".join(f"{k}={float(v):.5g}" for k, v in scalars.items())
    )

  def write_overlays(
    self,
    step: int,
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    threshold: float = 0.5,
  ) -> None:
    """images (N, H, W) in HU or [0, 1]; labels, probs (N, H, W). One RGB panel row per slice."""
    if self._writer is None or images is None or len(images) == 0:
      return
    self._writer.add_image(
      "eval/overlay", overlay_panels(images, labels, probs, threshold), step, dataformats="HWC"
    )
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def to_window(images: np.ndarray) -> np.ndarray:
  """HU -> lung window in [0, 1]; inputs already in [0, 1] pass through."""
  images = np.asarray(images, np.float32)
  if images.min(initial=0.0) < -1.5 or images.max(initial=0.0) > 1.5:
    images = lung_window(images)
  return images


def overlay_panels(
  images: np.ndarray, labels: np.ndarray, probs: np.ndarray, threshold: float
) -> np.ndarray:
  """(N, H, W) each -> (N*H, 3*W, 3) uint8: CT | truth in green | prediction in red."""
  ct = to_window(images)
  gray = np.repeat(ct[..., None], 3, axis=-1)
  truth, pred = gray.copy(), gray.copy()
  truth[labels > 0.5] = 0.6 * truth[labels > 0.5] + 0.4 * np.array([0.0, 1.0, 0.0])
  hit = probs >= threshold
  pred[hit] = 0.6 * pred[hit] + 0.4 * np.array([1.0, 0.0, 0.0])
  rows = np.concatenate([gray, truth, pred], axis=2)  # (N, H, 3W, 3)
  return (np.concatenate(list(rows), axis=0) * 255).astype(np.uint8)


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure as a PNG, atomically (`atomic.replacing`)."""
  from tvunet_jax import atomic  # pylint: disable=g-import-not-at-top

  with atomic.replacing(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
