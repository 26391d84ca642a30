"""Nothing lost at the volume boundary: one orientation rule for training and inference, headers
kept, labels range-checked, output names that never collide, DICOM in and DICOM SEG out."""

import json
import os

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from tests import dicom_series
from tfds_builder.covid19_ct_seg import covid19_ct_seg_dataset_builder as builder_lib
from tvunet_jax import input_pipeline, nifti_io, outputs, predict, volumes

ornt = nib.orientations

CONTRACT = {
  "image_size": [32, 32],
  "in_channels": 1,
  "intensity": "lung_window",
  "lung_window": list(input_pipeline.LUNG_WINDOW),
  "target": "ground_glass",
  "threshold": 0.5,
  "model": {"num_outputs": 1},
}


class AnteriorRightModel:
  """Flax-`apply` test double: logit +10 where the windowed input is bright (> -300 HU) in the
  top-left quarter of a display slice (anterior, patient right), -10 elsewhere, so a wrong
  orientation anywhere shows up in the mask."""

  def apply(self, variables, x, train=False):
    del variables, train
    lo, hi = input_pipeline.LUNG_WINDOW
    bright = x[..., 0] > (-300.0 - lo) / (hi - lo)
    h, w = x.shape[1:3]
    quarter = (jnp.arange(h)[:, None] < h // 2) & (jnp.arange(w)[None, :] < w // 2)
    return jnp.where(bright & quarter, 10.0, -10.0)[..., None]


@pytest.fixture(scope="module")
def predictor():
  return predict.SlicePredictor(AnteriorRightModel(), {}, batch_size=8)


def _display_volume(seed=0, shape=(32, 32, 4)):
  """(rows, cols, Z) HU: air, a body, and bright blobs in every quadrant (display orientation)."""
  rng = np.random.default_rng(seed)
  hu = np.full(shape, -1000.0, np.float32)
  hu[4:-4, 4:-4] = -800.0
  for _ in range(10):
    r, c = rng.integers(6, shape[0] - 6), rng.integers(6, shape[1] - 6)
    hu[r - 2 : r + 2, c - 2 : c + 2, :] = 40.0
  return hu


def _save(data, affine, path, qform_code=1, sform_code=1):
  img = nib.Nifti1Image(np.asarray(data), affine)
  img.set_qform(affine, code=qform_code)
  img.set_sform(affine, code=sform_code)
  nib.save(img, str(path))
  return str(path)


LAS = np.array([[-0.8, 0, 0, 30.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 50.0], [0, 0, 0, 1]])


def _same_volume_two_ways(tmp_path, codes=("L", "P", "S")):
  """A MedSeg-style LAS volume and the same physical volume stored with other axis codes."""
  stored = volumes.to_storage(_display_volume())  # (X, Y, Z) LAS, as MedSeg stores it
  t = ornt.ornt_transform(ornt.io_orientation(LAS), ornt.axcodes2ornt(codes))
  other = ornt.apply_orientation(stored, t)
  other_affine = LAS @ ornt.inv_ornt_aff(t, stored.shape)
  return stored, other, other_affine, t


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("R", "A", "S"), ("A", "R", "I")])
def test_builder_gives_identical_examples_for_the_same_volume_stored_two_ways(tmp_path, codes):
  stored, other, other_affine, _ = _same_volume_two_ways(tmp_path, codes)
  labels = (stored > 0).astype(np.uint8)
  t = ornt.ornt_transform(ornt.io_orientation(LAS), ornt.axcodes2ornt(codes))
  for name, img, lab, aff in (
    ("las", stored, labels, LAS),
    ("other", other, ornt.apply_orientation(labels, t), other_affine),
  ):
    root = tmp_path / name
    (root / "rp_im").mkdir(parents=True)
    (root / "rp_msk").mkdir()
    _save(img, aff, root / "rp_im" / "1.nii.gz")
    _save(lab, aff, root / "rp_msk" / "1.nii.gz")
  a = list(builder_lib.iter_slices(str(tmp_path / "las"), "rp1"))
  b = list(builder_lib.iter_slices(str(tmp_path / "other"), "rp1"))
  assert [k for k, _ in a] == [k for k, _ in b]
  display = _display_volume()
  for z, ((_, ea), (_, eb)) in enumerate(zip(a, b)):
    np.testing.assert_array_equal(ea["image"], display[:, :, z])  # the LAS file: MedSeg's rot90
    np.testing.assert_array_equal(ea["image"], eb["image"])
    np.testing.assert_array_equal(ea["mask"], eb["mask"])
    np.testing.assert_allclose(ea["spacing"], eb["spacing"])


def test_predict_gives_the_same_world_space_mask_for_both_storages(tmp_path, predictor):
  stored, other, other_affine, t = _same_volume_two_ways(tmp_path)
  seg_a = predict.segment_volume(_save(stored, LAS, tmp_path / "a.nii.gz"), predictor, CONTRACT)
  seg_b = predict.segment_volume(
    _save(other, other_affine, tmp_path / "b.nii.gz"), predictor, CONTRACT
  )
  assert seg_a.mask.sum() > 0
  # The same voxels of the world: b's mask taken back to a's voxel order equals a's.
  back = ornt.ornt_transform(ornt.axcodes2ornt(("L", "P", "S")), ornt.io_orientation(LAS))
  np.testing.assert_array_equal(ornt.apply_orientation(seg_b.mask, back), seg_a.mask)
  assert seg_a.report["lesion_volume_ml"] == pytest.approx(seg_b.report["lesion_volume_ml"])


def test_medseg_shaped_file_without_orientation_in_its_header(tmp_path):
  """MedSeg's tr_im was converted from JPGs: a header with neither qform nor sform. nibabel's
  fallback affine is ('L', 'A', 'S'), so the one rule applies MedSeg's storage rotation."""
  display = _display_volume(shape=(40, 40, 3))
  display[2:6, 2:6, :] = 500.0  # a marker at the anterior-right corner (display row 0, col 0)
  img = nib.Nifti1Image(volumes.to_storage(display), None)
  img.set_qform(None, code=0)
  img.set_sform(None, code=0)
  path = str(tmp_path / "tr_im.nii.gz")
  nib.save(img, path)
  vol = nifti_io.load_volume(path)
  assert nib.aff2axcodes(vol.affine) == volumes.STORAGE_AXCODES
  shown = volumes.Orientation.of(vol.affine, vol.data.shape).to_display(vol.data)
  np.testing.assert_array_equal(shown, display)
  assert shown[3, 3, 0] == 500.0


# ----------------------------------------------------------------------------- headers, labels


@pytest.mark.parametrize("qform_only", [False, True])
def test_outputs_keep_the_input_header(tmp_path, predictor, qform_only):
  q = LAS.copy()
  s = LAS.copy()
  s[:3, 3] += [1.5, -2.0, 0.5]  # sform and qform differ: a viewer may prefer either
  img = nib.Nifti1Image(volumes.to_storage(_display_volume()).astype(np.int16), None)
  img.set_qform(q, code=1)
  img.set_sform(None if qform_only else s, code=0 if qform_only else 2)
  img.header.set_xyzt_units("mm", "sec")
  path = str(tmp_path / "ct.nii.gz")
  nib.save(img, path)
  seg = predict.segment_volume(path, predictor, CONTRACT)
  report = outputs.write_outputs(seg, str(tmp_path / "out"), probabilities=True)
  for key, dtype, intent in (("mask", np.uint8, "label"), ("probabilities", np.float32, "none")):
    out = nib.load(report["outputs"][key])
    hdr = out.header
    assert hdr.get_data_dtype() == dtype and hdr.get_intent()[0] == intent
    assert int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(hdr.get_qform(), q, atol=1e-5)
    assert int(hdr["sform_code"]) == (0 if qform_only else 2)
    if not qform_only:
      np.testing.assert_allclose(hdr.get_sform(), s, atol=1e-5)
    np.testing.assert_allclose(hdr.get_zooms()[:3], img.header.get_zooms()[:3])
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert hdr.get_slope_inter() in ((None, None), (1.0, 0.0))


@pytest.mark.parametrize("value,dtype", [(-1, np.uint8), (256, np.uint8), (70000, np.int16)])
def test_labels_that_do_not_fit_are_refused(tmp_path, value, dtype):
  data = np.zeros((4, 4, 2), np.int32)
  data[1, 2, 1] = value
  path = _save(data, np.eye(4), tmp_path / "m.nii.gz")
  with pytest.raises(nifti_io.VolumeError, match=rf"^{path}: label value {value} outside"):
    nifti_io.load_volume(path, dtype=dtype)


# ----------------------------------------------------------------------------- output names


def test_colliding_names_get_distinct_outputs_and_twice_is_refused(tmp_path):
  for d in ("a", "b"):
    (tmp_path / d).mkdir()
    _save(np.zeros((4, 4, 2), np.int16), LAS, tmp_path / d / "scan.nii.gz")
  a, b = str(tmp_path / "a" / "scan.nii.gz"), str(tmp_path / "b" / "scan.nii.gz")
  specs = predict.plan_inputs([a, b])
  assert [s.stem for s in specs] == ["a_scan", "b_scan"]
  assert outputs.output_stems(
    [("/x/p/a/s.nii", "s"), ("/x/q/a/s.nii", "s"), ("/x/t.nii", "t")]
  ) == ["p_a_s", "q_a_s", "t"]
  with pytest.raises(nifti_io.VolumeError, match="given twice"):
    predict.plan_inputs([a, str(tmp_path / "a" / ".." / "a" / "scan.nii.gz")])


def test_outputs_of_another_input_are_never_overwritten(tmp_path, predictor):
  out = tmp_path / "out"
  first = _save(volumes.to_storage(_display_volume()), LAS, tmp_path / "scan.nii.gz")
  (tmp_path / "other").mkdir()
  second = _save(
    volumes.to_storage(_display_volume(seed=1)), LAS, tmp_path / "other" / "scan.nii.gz"
  )
  seg = predict.segment_volume(first, predictor, CONTRACT)
  outputs.write_outputs(seg, str(out))
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}
  with pytest.raises(nifti_io.VolumeError, match="would overwrite those of"):
    outputs.check_no_foreign_outputs(predict.plan_inputs([second]), str(out))
  outputs.check_no_foreign_outputs(predict.plan_inputs([first]), str(out))  # a re-run is fine
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


# ----------------------------------------------------------------------------- DICOM


def test_dicom_series_and_nifti_give_the_same_mask_and_report(tmp_path, predictor):
  hu = dicom_series.phantom_hu(shape=(32, 32, 5))
  hu[:12, :12, :] = 40  # bright in a corner whose display quadrant depends on the geometry
  folder = tmp_path / "series"
  dicom_series.write_series(str(folder), hu)
  nifti = str(tmp_path / "same.nii.gz")
  nib.save(dicom_series.as_nifti(hu), nifti)
  (spec,) = predict.plan_inputs([str(folder)])
  seg_d = predict.segment_volume(predict.load_input(spec), predictor, CONTRACT)
  seg_n = predict.segment_volume(nifti, predictor, CONTRACT)
  np.testing.assert_array_equal(seg_d.mask, seg_n.mask)
  np.testing.assert_allclose(seg_d.probs, seg_n.probs, atol=1e-6)
  for key in ("lesion_volume_ml", "num_lesions", "per_slice_lesion_area_mm2", "lung_volume_ml"):
    assert seg_d.report[key] == pytest.approx(seg_n.report[key]), key
  report = outputs.write_outputs(seg_d, str(tmp_path / "out"), spec.stem, algorithm_version="t")
  import highdicom as hd  # pylint: disable=g-import-not-at-top

  seg = hd.seg.segread(report["outputs"]["dicom_seg"])
  assert seg.number_of_segments == 1 and int(seg.NumberOfFrames) == hu.shape[2]
  assert seg.SeriesInstanceUID != spec.series_uid
  referenced = {
    r.ReferencedSOPInstanceUID
    for s in seg.ReferencedSeriesSequence
    for r in s.ReferencedInstanceSequence
  }
  assert referenced == {ds.SOPInstanceUID for _, ds in spec.dicom_items}
  mask_nifti = nib.load(report["outputs"]["mask"])
  np.testing.assert_allclose(mask_nifti.affine, seg_d.volume.affine, atol=1e-5)
  with open(report["outputs"]["report"]) as f:
    assert json.load(f)["series_uid"] == spec.series_uid


def test_dicom_folder_with_two_series_needs_series(tmp_path):
  hu = dicom_series.phantom_hu()
  dicom_series.write_two_series(str(tmp_path / "two"), hu)
  with pytest.raises(nifti_io.VolumeError, match=r"2 series .* pass --series UID or --series all"):
    predict.plan_inputs([str(tmp_path / "two")])
  specs = predict.plan_inputs([str(tmp_path / "two")], series="all")
  assert len(specs) == 2 and len({s.stem for s in specs}) == 2


def test_bad_dicom_series_is_refused_with_one_line(tmp_path):
  hu = dicom_series.phantom_hu()
  folder = tmp_path / "bad"
  dicom_series.write_series(str(folder), hu, defect="missing_slice")
  (spec,) = predict.plan_inputs([str(folder)])  # headers alone look fine
  with pytest.raises(nifti_io.VolumeError, match="missing slice") as e:
    predict.load_input(spec)
  assert "\n" not in str(e.value) and spec.series_uid in str(e.value)
