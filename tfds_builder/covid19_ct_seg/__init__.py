"""covid19_ct_seg: MedSeg COVID-19 CT slices (or the phantom) as a TFDS dataset.

`build(manual_dir, data_dir, config)` prepares it without TensorFlow; see README.md.
"""

from __future__ import annotations

import os
import shutil

import tensorflow_datasets as tfds

from tfds_builder.covid19_ct_seg.covid19_ct_seg_dataset_builder import (
  Builder,
  Covid19CtSegConfig,
  SplitSpec,
)

NAME = "covid19_ct_seg"
__all__ = ["NAME", "Builder", "Covid19CtSegConfig", "SplitSpec", "build"]


def build(
  manual_dir: str | os.PathLike, data_dir: str | os.PathLike, config: str = "paper_128"
) -> Builder:
  """Prepares `covid19_ct_seg/<config>` in `data_dir` from the MedSeg layout in `manual_dir`.

  Writes array_record shards (readable by `tfds.data_source` and grain without TensorFlow). TFDS
  writes into an `incomplete.*` folder and renames it when done, so an interrupted build never
  looks complete; an existing complete build is reused. The `incomplete.*` folders a killed
  build left behind are removed first (one writer per data_dir: process 0).
  """
  builder = Builder(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  parent = os.path.dirname(os.path.normpath(os.fspath(builder.data_dir)))
  if os.path.isdir(parent):
    for name in os.listdir(parent):
      if name.startswith("incomplete."):
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return builder
