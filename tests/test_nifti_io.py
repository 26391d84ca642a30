"""NIfTI boundary: every bad file gives one line naming it; writes are atomic; storage rotation."""

import os
import stat

import nibabel as nib
import numpy as np
import pytest

from tvunet_jax import atomic, nifti_io, volumes


def _write(path, data, affine=None):
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
  return path


def test_round_trip_keeps_data_affine_and_zooms(tmp_path):
  data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
  affine = np.diag([0.7, 0.8, 5.0, 1.0])
  path = tmp_path / "v.nii.gz"
  nifti_io.save_volume(data, affine, path)
  vol = nifti_io.load_volume(path)
  np.testing.assert_array_equal(vol.data, data.astype(np.float32))
  np.testing.assert_allclose(vol.affine, affine)
  assert vol.zooms == pytest.approx((0.7, 0.8, 5.0))
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
  mode = stat.S_IMODE(os.stat(path).st_mode)
  assert mode & stat.S_IRGRP and mode & stat.S_IROTH  # not mkstemp's private 0600


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda p: None, "file not found"),
    (lambda p: p.write_text("not an image"), "not a readable NIfTI file"),
    (lambda p: _write(p, np.zeros((4, 4), np.float32)), "expected a 3D volume"),
    (lambda p: _write(p, np.zeros((4, 4, 3, 2), np.float32)), "expected a 3D volume"),
    (lambda p: _write(p, np.array([[[np.nan, 1.0]]], np.float32)), "1 NaN/inf voxels"),
  ],
)
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, make, match):
  path = tmp_path / "scan.nii.gz"
  make(path)
  with pytest.raises(nifti_io.VolumeError, match=match) as err:
    nifti_io.load_volume(path)
  message = str(err.value)
  assert message.startswith(str(path)) and "\n" not in message


def test_truncated_file(tmp_path):
  full = _write(tmp_path / "full.nii.gz", np.random.default_rng(0).normal(size=(32, 32, 8)))
  cut = tmp_path / "cut.nii.gz"
  cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
  with pytest.raises(nifti_io.VolumeError, match=r"cut\.nii\.gz: (truncated|not a readable)"):
    nifti_io.load_volume(cut)


def test_label_maps_must_be_integers(tmp_path):
  path = _write(tmp_path / "m.nii.gz", np.array([[[0.0, 1.5]]], np.float32))
  with pytest.raises(nifti_io.VolumeError, match="non-integer"):
    nifti_io.load_volume(path, dtype=np.uint8)
  ok = _write(tmp_path / "ok.nii.gz", np.array([[[0.0, 3.0]]], np.float32))
  assert nifti_io.load_volume(ok, dtype=np.uint8).data.dtype == np.uint8


def test_trailing_singleton_axis_is_a_volume(tmp_path):
  path = _write(tmp_path / "v.nii", np.ones((3, 4, 5, 1), np.float32))
  assert nifti_io.load_volume(path).data.shape == (3, 4, 5)


def test_failed_save_leaves_nothing(tmp_path):
  with pytest.raises(nib.spatialimages.HeaderDataError):  # nibabel has no object dtype
    nifti_io.save_volume(np.zeros((2, 2, 2), object), np.eye(4), tmp_path / "x.nii.gz")
  assert os.listdir(tmp_path) == []


def test_storage_rotation_is_a_quarter_turn_and_its_inverse():
  display = np.array([[1, 2, 3], [4, 5, 6]])  # (rows, cols)
  stored = volumes.to_storage(display)
  np.testing.assert_array_equal(stored, [[4, 1], [5, 2], [6, 3]])  # a clockwise quarter turn
  np.testing.assert_array_equal(volumes.from_storage(stored), display)


def test_write_text_atomic(tmp_path):
  path = tmp_path / "r.json"
  atomic.write_text(path, "{}\n")
  assert path.read_text() == "{}\n" and os.listdir(tmp_path) == ["r.json"]
