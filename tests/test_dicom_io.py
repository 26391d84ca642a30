"""DICOM CT series in, DICOM SEG out: checked against the helper's known geometry, SimpleITK's
series reader and plain pydicom reads of what highdicom wrote."""

from __future__ import annotations

import os
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests import dicom_series
from tvunet_jax import dicom_io, nifti_io

highdicom = pytest.importorskip("highdicom")

# The default geometry's RAS+ affine, derived by hand: i runs along row_cos (0, -1, 0) LPS =
# anterior = +y RAS at 0.8 mm (PixelSpacing[1]); j along col_cos (-1, 0, 0) LPS = the patient's
# right = +x RAS at 0.7 mm (PixelSpacing[0]); k along the normal (0, 0, -1) = feet at 2.5 mm;
# the origin (120.5, 95.25, -310) LPS is (-120.5, -95.25, -310) RAS.
EXPECTED_AFFINE = np.array(
  [[0.0, 0.7, 0.0, -120.5], [0.8, 0.0, 0.0, -95.25], [0.0, 0.0, -2.5, -310.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(scope="module")
def hu():
  return dicom_series.phantom_hu()


@pytest.fixture
def written(tmp_path, hu):
  folder = str(tmp_path / "series")
  return folder, dicom_series.write_series(folder, hu)


def test_round_trip_hu_and_affine(written, hu):
  folder, w = written
  [s] = dicom_io.read_series(folder)
  assert s.uid == w.series_uid and s.folder == folder
  assert s.data.dtype == np.float32 and s.data.shape == hu.shape
  np.testing.assert_array_equal(s.data, hu)
  np.testing.assert_allclose(s.affine, EXPECTED_AFFINE, atol=1e-9)
  assert nib.aff2axcodes(s.affine) == ("A", "R", "I")
  assert s.files == w.files
  assert [d.SOPInstanceUID for d in s.datasets] == list(w.sop_instance_uids)
  assert all("PixelData" not in d for d in s.datasets)
  assert s.description == "Lung 1.0 B70f"


def test_helper_is_realistic(written, hu):
  """The helper really uses per-file rescaling and a non-identity orientation, so the round trip
  above could fail."""
  _, w = written
  ds = [pydicom.dcmread(f) for f in w.files]
  assert {(float(d.RescaleSlope), float(d.RescaleIntercept)) for d in ds} == {
    (1.0, -1024.0),
    (0.5, -1024.0),
  }
  raw = np.stack([d.pixel_array.T for d in ds], axis=-1)
  assert not np.array_equal(raw, hu)
  assert all(d.SOPClassUID == pydicom.uid.CTImageStorage for d in ds)
  assert all(d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian for d in ds)
  assert [float(v) for v in ds[0].ImageOrientationPatient] != [1, 0, 0, 0, 1, 0]
  assert sorted(w.files) != list(w.files)
  numbers = np.array([int(d.InstanceNumber) for d in ds])
  assert not np.all(np.diff(numbers) > 0) and not np.all(np.diff(numbers) < 0)


def test_matches_simpleitk(written):
  """SimpleITK (GDCM) is an independent reader: same HU and the same LPS geometry."""
  sitk = pytest.importorskip("SimpleITK")
  folder, w = written
  [s] = dicom_io.read_series(folder)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder, w.series_uid))
  img = reader.Execute()
  np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), s.data)
  direction = np.asarray(img.GetDirection()).reshape(3, 3)
  lps = np.eye(4)
  lps[:3, :3] = direction * np.asarray(img.GetSpacing())
  lps[:3, 3] = img.GetOrigin()
  np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, s.affine, atol=1e-6)


def test_order_ignores_file_names_and_instance_numbers(tmp_path, hu, written):
  """Names and InstanceNumbers that both run against the slice positions: a reader sorting by
  either would return the volume reversed in k."""
  _, w = written
  folder = tmp_path / "renamed"
  folder.mkdir()
  nk = len(w.files)
  for k, f in enumerate(w.files):
    ds = pydicom.dcmread(f)
    ds.InstanceNumber = nk - k
    ds.save_as(str(folder / f"{nk - k:04d}.dcm"))
  [s] = dicom_io.read_series(str(folder))
  np.testing.assert_array_equal(s.data, hu)
  assert [os.path.basename(f) for f in s.files] == [f"{nk - k:04d}.dcm" for k in range(nk)]
  # Another seed: other names, UIDs and InstanceNumbers, the same volume.
  other = str(tmp_path / "other")
  dicom_series.write_series(other, hu, seed=7)
  np.testing.assert_array_equal(dicom_io.read_series(other)[0].data, hu)


def test_rounded_positions_are_accepted(written, hu):
  """Scanners store positions with a few decimals; that rounding is not a tilt or a gap."""
  folder, w = written
  rng = np.random.default_rng(0)
  for f in w.files:
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient = [
      round(float(v) + rng.uniform(-4e-4, 4e-4), 3) for v in ds.ImagePositionPatient
    ]
    ds.save_as(f)
  np.testing.assert_array_equal(dicom_io.read_series(folder)[0].data, hu)


EXPECTED_REFUSAL = {
  "modality": "Modality MR, expected CT",
  "missing_slice": "missing slice",
  "duplicate_position": "duplicate position",
  "spacing_varies": "spacing varies",
  "tilted": "tilted stack (gantry tilt)",
  "non_parallel": "non-parallel slices",
  "pixel_spacing": "PixelSpacing",
  "compressed": "transfer syntax 1.2.840.10008.1.2.4.70 (JPEG Lossless",
}


@pytest.mark.parametrize("defect", dicom_series.DEFECTS)
def test_refused_with_one_line(tmp_path, hu, defect):
  if (
    defect == "compressed" and pydicom.pixels.get_decoder(pydicom.uid.JPEGLosslessSV1).is_available
  ):
    pytest.skip(
      "a JPEG Lossless decoder is installed here; the helper's junk stream would fail "
      "as a decode error instead"
    )
  folder = str(tmp_path / defect)
  w = dicom_series.write_series(folder, hu, defect=defect)
  with pytest.raises(nifti_io.VolumeError) as e:
    dicom_io.read_series(folder)
  msg = str(e.value)
  assert "\n" not in msg
  assert EXPECTED_REFUSAL[defect] in msg
  assert f"series {w.series_uid}" in msg
  named = msg.split(":")[0]
  assert named in w.files, msg


def test_undecodable_pixels_name_the_file(written, monkeypatch):
  """A decoder failure while reading pixels (e.g. a truncated file) is one line with the file."""
  folder, w = written
  with open(w.files[3], "r+b") as f:
    f.truncate(os.path.getsize(w.files[3]) - 100)
  with pytest.raises(nifti_io.VolumeError) as e:
    dicom_io.read_series(folder)
  assert str(e.value).startswith(f"{w.files[3]}: series {w.series_uid}: cannot decode")
  assert "\n" not in str(e.value)


def test_several_series(tmp_path, hu):
  folder = str(tmp_path / "two")
  a, b = dicom_series.write_two_series(folder, hu)
  with pytest.raises(nifti_io.VolumeError) as e:
    dicom_io.read_series(folder)
  msg = str(e.value)
  assert msg.startswith(f"{folder}: 2 series (") and a.series_uid in msg and b.series_uid in msg
  assert "pass --series UID or --series all" in msg
  [s] = dicom_io.read_series(folder, b.series_uid)
  assert s.uid == b.series_uid
  np.testing.assert_array_equal(s.data, hu[:, :, ::-1])
  both = dicom_io.read_series(folder, "all")
  assert {x.uid for x in both} == {a.series_uid, b.series_uid}
  assert len({x.name for x in both}) == 2
  assert all(x.name.replace("-", "").replace("_", "").replace(".", "").isalnum() for x in both)
  with pytest.raises(nifti_io.VolumeError, match=r"no series 1\.2\.3\.4"):
    dicom_io.read_series(folder, "1.2.3.4")


def test_is_dicom_folder_and_non_dicom_files(tmp_path, written, hu):
  folder, w = written
  assert dicom_io.is_dicom_folder(folder)
  assert not dicom_io.is_dicom_folder(w.files[0])  # a file, not a folder
  empty = tmp_path / "empty"
  empty.mkdir()
  assert not dicom_io.is_dicom_folder(str(empty))
  (empty / "notes.txt").write_text("not DICOM\n")
  assert not dicom_io.is_dicom_folder(str(empty))
  with pytest.raises(nifti_io.VolumeError, match="no DICOM files"):
    dicom_io.read_series(str(empty))
  # Other files beside a series are not part of it.
  (tmp_path / "series" / "README.txt").write_text("exported by a PACS\n")
  np.testing.assert_array_equal(dicom_io.read_series(folder)[0].data, hu)


def test_single_slice(tmp_path, hu):
  folder = str(tmp_path / "one")
  dicom_series.write_series(folder, hu[:, :, :1])
  [s] = dicom_io.read_series(folder)
  np.testing.assert_array_equal(s.data, hu[:, :, :1])
  np.testing.assert_allclose(s.affine, EXPECTED_AFFINE, atol=1e-9)  # SliceThickness 2.5


def test_without_pydicom_gives_the_hint(written, monkeypatch):
  folder, _ = written
  for name in [m for m in sys.modules if m == "pydicom" or m.startswith("pydicom.")]:
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(dicom_io.DicomUnavailable, match=r"pip install -e '\.\[dicom\]'") as e:
    dicom_io.read_series(folder)
  assert isinstance(e.value, ImportError) and "\n" not in str(e.value)
  assert dicom_io.is_dicom_folder(folder)  # still recognised, so the caller can give the hint


def test_nifti_twin(tmp_path, written, hu):
  """`as_nifti` is the same physical volume: identical voxels and affine through nifti_io, and in
  nibabel's canonical order every voxel keeps its world position."""
  folder, _ = written
  [s] = dicom_io.read_series(folder)
  path = str(tmp_path / "twin.nii.gz")
  nib.save(dicom_series.as_nifti(hu), path)
  vol = nifti_io.load_volume(path)
  np.testing.assert_array_equal(vol.data, s.data)
  np.testing.assert_allclose(vol.affine, s.affine, atol=1e-5)
  canon = dicom_series.as_nifti(hu, canonical=True)
  assert nib.aff2axcodes(canon.affine) == ("R", "A", "S")
  rng = np.random.default_rng(0)
  for ijk in rng.integers(0, hu.shape, size=(20, 3)):
    world = s.affine @ np.r_[ijk, 1.0]
    c = np.round(np.linalg.solve(canon.affine, world)[:3]).astype(int)
    assert canon.get_fdata()[tuple(c)] == hu[tuple(ijk)]


def _mask(series):
  m = ((series.data > -600) & (series.data < -300)).astype(np.uint8)
  m[:, :, 1] = 0  # an empty slice, which must still get its frame
  assert m.any() and not m[:, :, 1].any()
  return m


def test_segmentation_round_trip(tmp_path, written):
  folder, w = written
  [s] = dicom_io.read_series(folder)
  mask = _mask(s)
  out = str(tmp_path / "out" / f"{s.name}.seg.dcm")
  dicom_io.write_segmentation(mask, s, out, algorithm_version="0.1.0", threshold=0.4)
  assert os.listdir(os.path.dirname(out)) == [os.path.basename(out)]

  seg = highdicom.seg.segread(out)
  assert seg.number_of_segments == 1
  d = seg.get_segment_description(1)
  assert d.segment_label == "Ground-glass opacity"
  cat, typ = d.segmented_property_category, d.segmented_property_type
  assert (cat.value, cat.scheme_designator) == ("49755003", "SCT")
  assert (typ.value, typ.scheme_designator) == ("112120", "DCM")
  assert d.algorithm_type == highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC
  algo = d.algorithm_identification[0]
  assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("tvunet_jax", "0.1.0")
  assert algo.AlgorithmParameters == "threshold=0.4"
  assert seg.segmentation_type == highdicom.seg.SegmentationTypeValues.BINARY
  assert {uid for _, _, uid in seg.get_source_image_uids()} == set(w.sop_instance_uids)

  # Plain pydicom, independent of highdicom's reader: UIDs, frames and their pixels.
  ds = pydicom.dcmread(out)
  assert ds.SOPClassUID == pydicom.uid.SegmentationStorage
  assert ds.FrameOfReferenceUID == w.frame_of_reference_uid
  assert ds.StudyInstanceUID == w.study_uid
  assert ds.SeriesInstanceUID != w.series_uid
  assert ds.SOPInstanceUID not in w.sop_instance_uids
  assert int(ds.NumberOfFrames) == len(w.files) == mask.shape[2]
  referenced = {
    r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
  }
  assert referenced == set(w.sop_instance_uids)
  assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == w.series_uid
  frames = ds.pixel_array.reshape(-1, *mask.shape[1::-1])  # (frames, rows = J, columns = I)
  source = {
    u: pydicom.dcmread(f, stop_before_pixels=True) for u, f in zip(w.sop_instance_uids, w.files)
  }
  k_of = {u: k for k, u in enumerate(w.sop_instance_uids)}
  seen = set()
  for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
    uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    k = k_of[uid]
    seen.add(k)
    np.testing.assert_allclose(
      [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
      [float(v) for v in source[uid].ImagePositionPatient],
      atol=1e-6,
    )
    np.testing.assert_array_equal(frames[n], mask[:, :, k].T)
  assert seen == set(range(mask.shape[2]))


def test_segmentation_failure_writes_nothing(tmp_path, written, monkeypatch):
  folder, _ = written
  [s] = dicom_io.read_series(folder)
  out = tmp_path / "out" / "x.seg.dcm"
  out.parent.mkdir()

  def broken(self, filename, *args, **kwargs):
    with open(filename, "wb") as f:
      f.write(b"half a file")
    raise OSError("disk full")

  monkeypatch.setattr(highdicom.seg.Segmentation, "save_as", broken)
  with pytest.raises(OSError, match="disk full"):
    dicom_io.write_segmentation(_mask(s), s, str(out), algorithm_version="0", threshold=0.5)
  assert os.listdir(out.parent) == []
  out.write_bytes(b"an earlier result")
  with pytest.raises(OSError, match="disk full"):
    dicom_io.write_segmentation(_mask(s), s, str(out), algorithm_version="0", threshold=0.5)
  assert out.read_bytes() == b"an earlier result"
  assert os.listdir(out.parent) == ["x.seg.dcm"]


@pytest.mark.parametrize("bad", ["shape", "values"])
def test_segmentation_rejects_bad_masks(tmp_path, written, bad):
  folder, _ = written
  [s] = dicom_io.read_series(folder)
  mask = _mask(s)
  mask = mask[:-1] if bad == "shape" else mask * 2
  out = tmp_path / "x.seg.dcm"
  with pytest.raises(ValueError, match=str(out)):
    dicom_io.write_segmentation(mask, s, str(out), algorithm_version="0", threshold=0.5)
  assert not out.exists()
