"""Builds the dataset without TensorFlow (where TensorFlow is installed, `tfds build` works too).

  python -m tfds_builder.covid19_ct_seg --manual_dir data/medseg_phantom --data_dir data/tfds \
      [--config paper_128|native]
"""

import argparse
import sys

from tfds_builder.covid19_ct_seg import build
from tvunet_jax.nifti_io import VolumeError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--manual_dir", required=True, help="folder in the MedSeg file layout")
  parser.add_argument("--data_dir", required=True, help="TFDS data folder to write into")
  parser.add_argument("--config", default="paper_128", choices=["paper_128", "native"])
  args = parser.parse_args(argv)
  try:
    builder = build(args.manual_dir, args.data_dir, args.config)
  except VolumeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, split in builder.info.splits.items():
    print(f"{builder.info.full_name} {name}: {split.num_examples} slices")
  print(f"written to {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
