"""Builder test: builds the hand-made `dummy_data/` (MedSeg layout) and checks what TFDS wrote.

`tfds.testing.DatasetBuilderTestCase` needs TensorFlow, so the builder is exercised directly and
read back through `tfds.data_source`, the path training uses.
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_builder.covid19_ct_seg import build, make_dummy_data
from tvunet_jax import nifti_io

DUMMY = os.path.join(os.path.dirname(__file__), "dummy_data")
# 4 tr slices + rp1..5 (3 slices each); rp6 (3); rp7, rp8 (3 each) + rp9 (2).
EXPECTED_SPLITS = {"train": 4 + 5 * 3, "validation": 3, "test": 3 + 3 + 2}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builders = {c: build(DUMMY, data_dir, c) for c in ("paper_128", "native")}
  return data_dir, builders


def _read_all(data_dir, config, split):
  src = tfds.data_source(f"covid19_ct_seg/{config}", split=split, data_dir=data_dir, download=False)
  return [src[i] for i in range(len(src))]


@pytest.mark.parametrize("config", ["paper_128", "native"])
def test_split_sizes_and_no_volume_leakage(built, config):
  data_dir, builders = built
  info = builders[config].info
  assert {k: v.num_examples for k, v in info.splits.items()} == EXPECTED_SPLITS
  vols = {
    s: {ex["volume_id"].decode() for ex in _read_all(data_dir, config, s)} for s in EXPECTED_SPLITS
  }
  assert vols["validation"] == {"rp6"}
  assert vols["test"] == {"rp7", "rp8", "rp9"}
  assert vols["train"] == {f"tr_{z:03d}" for z in range(4)} | {f"rp{n}" for n in range(1, 6)}


def test_paper_config_shapes_dtypes_labels(built):
  data_dir, _ = built
  for ex in _read_all(data_dir, "paper_128", "test"):
    assert ex["image"].shape == (128, 128) and ex["image"].dtype == np.float32
    assert ex["mask"].shape == (128, 128) and ex["mask"].dtype == np.uint8
    assert set(np.unique(ex["mask"])) <= {0, 1, 2}  # nearest neighbour: no blended labels
    assert -1000.0 <= ex["image"].min() and ex["image"].max() <= 40.0 + 1e-3
  rp9 = [ex for ex in _read_all(data_dir, "paper_128", "test") if ex["volume_id"] == b"rp9"]
  # rp9 is 36x48 displayed at 0.7 mm: resized to 128x128 the pixels become 0.7*36/128 x 0.7*48/128.
  np.testing.assert_allclose(rp9[0]["spacing"], [0.7 * 36 / 128, 0.7 * 48 / 128, 3.9], rtol=1e-6)


def test_native_config_is_display_oriented_and_exact(built):
  data_dir, _ = built
  train = {ex["volume_id"].decode(): ex for ex in _read_all(data_dir, "native", "train")}
  ex = train["tr_001"]  # slice 1 carries a ground-glass square at display rows 11..14, cols 7..10
  assert ex["image"].dtype == np.int16 and ex["image"].shape == (40, 40)
  expected_img, expected_mask, expected_lung = make_dummy_data._slice(40, 40, 1, lesion_label=1)
  np.testing.assert_array_equal(ex["mask"], expected_mask.astype(np.uint8))
  np.testing.assert_array_equal(ex["image"], expected_img.astype(np.int16))
  np.testing.assert_array_equal(ex["lung_mask"], expected_lung)
  assert ex["has_lung_mask"] and ex["slice_index"] == 1
  np.testing.assert_allclose(ex["spacing"], [0.8, 0.8, 5.0])
  test = [ex for ex in _read_all(data_dir, "native", "test") if ex["volume_id"] == b"rp9"]
  assert {ex["image"].shape for ex in test} == {(36, 48)}


def _copy_dummy(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(DUMMY, manual)
  return manual


def test_missing_volume_fails_before_writing(tmp_path):
  manual = _copy_dummy(tmp_path)
  os.remove(manual / "rp_im" / "8.nii.gz")
  with pytest.raises(nifti_io.VolumeError, match=r"rp_im/8\.nii\.gz: file not found"):
    build(manual, tmp_path / "tfds")
  assert not (tmp_path / "tfds" / "covid19_ct_seg" / "paper_128" / "1.0.0").exists()


def test_mask_shape_mismatch_names_the_file(tmp_path):
  manual = _copy_dummy(tmp_path)
  bad = np.zeros((10, 10, 3), np.uint8)
  nifti_io.save_volume(bad, np.eye(4), manual / "rp_msk" / "3.nii.gz")
  with pytest.raises(nifti_io.VolumeError, match=r"rp_msk/3\.nii\.gz: mask shape"):
    build(manual, tmp_path / "tfds")
  # The failed build left no complete-looking dataset behind.
  assert not (tmp_path / "tfds" / "covid19_ct_seg" / "paper_128" / "1.0.0").exists()
