"""predict.py: orientation round trips, training-identical preprocessing, report numbers, errors."""

import json
import os
import shutil

import jax.numpy as jnp
import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from tvunet_jax import (
  checkpointing,
  input_pipeline,
  models,
  nifti_io,
  outputs,
  phantom,
  predict,
  sharding,
  volumes,
)
from tvunet_jax import contract as contract_lib

ornt = nib.orientations

CONTRACT = {
  "image_size": [128, 128],
  "in_channels": 1,
  "intensity": "lung_window",
  "lung_window": list(input_pipeline.LUNG_WINDOW),
  "target": "ground_glass",
  "threshold": 0.5,
  "model": {},
}


def _window(hu):
  lo, hi = input_pipeline.LUNG_WINDOW
  return (hu - lo) / (hi - lo)


class BandModel:
  """Test double with flax's `apply` signature: logit +10 where the windowed input lies in
  (lo_hu, hi_hu), -10 elsewhere; with `quadrant`, only in the top-left quarter of the display
  slice (anterior, patient right), which makes the output depend on the orientation."""

  def __init__(self, lo_hu, hi_hu, quadrant=False):
    self.lo, self.hi, self.quadrant = _window(lo_hu), _window(hi_hu), quadrant

  def apply(self, variables, x, train=False):
    del variables, train
    hit = (x[..., 0] > self.lo) & (x[..., 0] < self.hi)
    if self.quadrant:
      h, w = x.shape[1:3]
      hit = hit & (jnp.arange(h)[:, None] < h // 2) & (jnp.arange(w)[None, :] < w // 2)
    return jnp.where(hit, 10.0, -10.0)[..., None]


def _las_affine(pixel=0.7, slice_mm=5.0):
  """Voxel -> RAS for a MedSeg-like (X left, Y anterior, Z superior) array, 0.7 mm, 5 mm."""
  return np.array(
    [[-pixel, 0, 0, 40.0], [0, pixel, 0, -30.0], [0, 0, slice_mm, 100.0], [0, 0, 0, 1]]
  )


def _reorient(data, affine, codes):
  """The same anatomy in another voxel order: array and affine transformed together."""
  t = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(codes))
  return ornt.apply_orientation(data, t), affine @ ornt.inv_ornt_aff(t, data.shape), t


def _rotation(deg, axis):
  a = np.deg2rad(deg)
  c, s = np.cos(a), np.sin(a)
  i, j = [k for k in range(3) if k != axis]
  r = np.eye(4)
  r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
  return r


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
  """A 2-step tiny run on the session's phantom (a real checkpoint with its contract)."""
  from tests.conftest import tiny_config_for  # pylint: disable=g-import-not-at-top
  from tvunet_jax import train  # pylint: disable=g-import-not-at-top

  cfg = tiny_config_for(tiny_data)
  cfg.data.test_split = ""
  cfg.train.num_steps = 2
  workdir = str(tmp_path_factory.mktemp("predict") / "run")
  train.train_and_evaluate(cfg, workdir)
  return workdir


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
  "codes", [("L", "A", "S"), ("R", "P", "I"), ("S", "L", "P"), ("A", "I", "R")]
)
def test_orientation_inverts_exactly_and_finds_anatomy(codes):
  # A marker voxel at the anterior-right-superior corner of the world box: in display
  # orientation it must be row 0 (anterior), column 0 (patient right), last slice (superior).
  base = np.zeros((5, 6, 4), np.int16)
  base[0, -1, -1] = 7  # LAS array: X=0 is the right side, Y max anterior, Z max superior
  data, aff, _ = _reorient(base, _las_affine(), codes)
  o = volumes.Orientation.of(aff, data.shape)
  disp = o.to_display(data)
  assert disp.shape == (6, 5, 4)
  assert disp[0, 0, -1] == 7 and np.count_nonzero(disp) == 1
  np.testing.assert_array_equal(o.from_display(disp), data)
  assert o.display_spacing_mm() == pytest.approx((0.7, 0.7, 5.0))
  assert o.pixel_area_mm2() == pytest.approx(0.49)


def test_medseg_orientation_is_the_training_rotation(tiny_data):
  """For a file as MedSeg/the phantom store it, `to_display` is exactly `from_storage`."""
  vol = nifti_io.load_volume(os.path.join(tiny_data[0], "rp_im", "7.nii.gz"))
  assert nib.aff2axcodes(vol.affine) == volumes.STORAGE_AXCODES
  o = volumes.Orientation.of(vol.affine, vol.data.shape)
  np.testing.assert_array_equal(o.to_display(vol.data), volumes.from_storage(vol.data))


def test_network_inputs_equal_training_examples(tiny_data):
  """Native volume -> network inputs reproduces the paper_128 examples + preprocess bit for bit."""
  vol = nifti_io.load_volume(os.path.join(tiny_data[0], "rp_im", "7.nii.gz"))
  slices = np.moveaxis(volumes.from_storage(vol.data), 2, 0)
  x = predict.network_inputs(slices, CONTRACT)
  src = input_pipeline.load_split(tiny_data[1], "paper_128", "test")
  seen = 0
  for i in range(len(src)):
    ex = src[i]
    if ex["volume_id"].decode() == "rp7":
      ref = input_pipeline.preprocess(ex, target="ground_glass", intensity="lung_window")
      np.testing.assert_array_equal(x[ex["slice_index"]], ref["image"][..., 0])
      seen += 1
  assert seen == slices.shape[0] >= 3


# ----------------------------------------------------------------------------- round trip


def _phantom_ct(seed=3, rows=96, cols=80, slices=6):
  """Display-oriented phantom CT, cropped to a non-square slice."""
  hu, labels, lung = phantom.generate_volume(np.random.default_rng(seed), 96, slices, lesion=True)
  c0 = (96 - cols) // 2
  return (hu[:rows, c0 : c0 + cols], labels[:rows, c0 : c0 + cols], lung[:rows, c0 : c0 + cols])


def test_round_trip_nontrivial_affines(tmp_path):
  hu, _, _ = _phantom_ct()
  # Only the anterior-right quarter keeps air-like HU: a model that looks there on display
  # slices finds something only if the slices reach it the right way up and round.
  h, w = hu.shape[:2]
  quarter = (np.arange(h)[:, None, None] < h // 2) & (np.arange(w)[None, :, None] < w // 2)
  hu = np.where((hu < -600) & ~quarter, -100.0, hu).astype(np.float32)
  base = volumes.to_storage(hu)  # (X, Y, Z) as MedSeg stores it
  base_aff = _las_affine()
  permuted, perm_aff, perm_t = _reorient(base, base_aff, ("P", "I", "R"))
  variants = {
    "las": (base, base_aff),
    "permuted_flipped": (permuted, perm_aff),
    # Oblique: 12 degrees about the superior axis; the nearest axis orientation is unchanged.
    "oblique": (base, _rotation(12, 2) @ base_aff),
  }
  model = BandModel(-1050, -675, quadrant=True)  # aerated lung in the anterior-right quarter
  predictor = predict.SlicePredictor(model, {}, batch_size=8)
  masks = {}
  for name, (data, aff) in variants.items():
    path = str(tmp_path / f"{name}.nii.gz")
    nifti_io.save_volume(data, aff, path)
    seg = predict.segment_volume(path, predictor, CONTRACT)
    report = outputs.write_outputs(seg, str(tmp_path / "out"), probabilities=True)
    out = nib.load(report["outputs"]["mask"])
    src = nib.load(path)
    assert out.shape == src.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, src.affine)
    mask = np.asarray(out.dataobj)
    probs = np.asarray(nib.load(report["outputs"]["probabilities"]).dataobj)
    assert probs.dtype == np.float32
    np.testing.assert_array_equal(mask, (probs >= np.float32(0.5)).astype(np.uint8))
    voxel_mm3 = abs(np.linalg.det(src.affine[:3, :3]))
    assert voxel_mm3 == pytest.approx(0.7 * 0.7 * 5.0, rel=1e-6)  # 2.45 mm^3
    assert mask.sum() > 50
    # The mask lies on the anatomy the model found (aerated lung), not on a rotated copy of it.
    in_band = (data[mask > 0] > -1100) & (data[mask > 0] < -600)
    assert in_band.mean() > 0.9
    assert report["lesion_voxels"] == int(mask.sum())
    assert report["lesion_volume_ml"] == pytest.approx(mask.sum() * 2.45 / 1000, rel=1e-6)
    assert sum(report["per_slice_lesion_area_mm2"]) == pytest.approx(mask.sum() * 0.49, rel=1e-6)
    masks[name] = mask
  # The same anatomy gives the same mask in world space, whatever the voxel order.
  np.testing.assert_array_equal(
    masks["permuted_flipped"], ornt.apply_orientation(masks["las"], perm_t)
  )
  np.testing.assert_array_equal(masks["oblique"], masks["las"])
  # ... and it is on the patient's anterior right (RAS: x > 0 is right, y > 0 anterior).
  ijk = np.argwhere(masks["las"] > 0)
  world = nib.affines.apply_affine(base_aff, ijk)
  centre = nib.affines.apply_affine(base_aff, (np.array(base.shape) - 1) / 2)
  assert (world[:, 0] > centre[0] - 1.0).all() and (world[:, 1] > centre[1] - 1.0).all()


def test_trailing_singleton_axis_is_kept(tmp_path):
  hu, _, _ = _phantom_ct(slices=3)
  path = str(tmp_path / "vol4d.nii")
  nifti_io.save_volume(volumes.to_storage(hu)[..., None], _las_affine(), path)
  predictor = predict.SlicePredictor(BandModel(-1050, -675), {}, batch_size=8)
  seg = predict.segment_volume(path, predictor, CONTRACT)
  report = outputs.write_outputs(seg, str(tmp_path / "out"))
  assert nib.load(report["outputs"]["mask"]).shape == (80, 96, 3, 1)


def test_perfect_model_reports_the_truth(tmp_path):
  """Lesions of a unique HU and a model that finds exactly them: the report is the truth's."""
  h = w = 128  # the network size: no resampling, so the model's output is the truth exactly
  disp = np.full((h, w, 5), 40.0, np.float32)  # soft tissue
  lung = np.zeros((h, w, 5), bool)
  lung[20:110, 10:60] = lung[20:110, 68:118] = True
  disp[lung] = -850.0
  truth = np.zeros((h, w, 5), bool)
  truth[30:40, 20:30, 0:3] = True  # a 10 x 10 x 3 lesion: 300 voxels
  truth[80:84, 90:95, 2] = True  # a 4 x 5 x 1 lesion: 20 voxels
  disp[truth] = -300.0
  # Stored with the slice axis pointing inferior: per-slice areas come back in file order.
  stored = volumes.to_storage(disp)
  data, aff, t = _reorient(stored, _las_affine(), ("L", "A", "I"))
  path, lung_path = str(tmp_path / "ct.nii.gz"), str(tmp_path / "lung.nii.gz")
  nifti_io.save_volume(data, aff, path)
  lung_file = ornt.apply_orientation(volumes.to_storage(lung.astype(np.uint8)), t)
  nifti_io.save_volume(lung_file, aff, lung_path)
  seg = predict.segment_volume(
    path,
    predict.SlicePredictor(BandModel(-400, -200), {}, batch_size=8),
    CONTRACT,
    lung_mask_path=lung_path,
  )
  truth_file = ornt.apply_orientation(volumes.to_storage(truth.astype(np.uint8)), t)
  np.testing.assert_array_equal(seg.mask, truth_file)
  r = seg.report
  assert r["lesion_voxels"] == 320
  assert r["lesion_volume_ml"] == pytest.approx(320 * 2.45 / 1000, rel=1e-6)
  assert r["num_lesions"] == 2
  assert r["lesion_volumes_ml"] == pytest.approx([300 * 2.45e-3, 20 * 2.45e-3], rel=1e-6)
  assert r["slice_axis"] == 2
  # Display slice k is file slice 4 - k; display slices 0..2 hold 100 pixels, slice 2 20 more.
  assert r["per_slice_lesion_area_mm2"] == pytest.approx(
    [0.0, 0.0, 120 * 0.49, 100 * 0.49, 100 * 0.49], rel=1e-6
  )
  lung_vox = int(lung.sum())
  assert r["lung_volume_ml"] == pytest.approx(lung_vox * 2.45e-3, rel=1e-6)
  assert r["percent_lung_involved"] == pytest.approx(100 * 320 / lung_vox, rel=1e-6)


# ----------------------------------------------------------------------------- lungs


@pytest.mark.parametrize("seed", [0, 2])
def test_derived_lung_mask_matches_phantom_lungs(seed):
  hu, labels, lung = phantom.generate_volume(np.random.default_rng(seed), 96, 8, lesion=True)
  derived = volumes.derive_lung_mask(hu) | (labels > 0)
  truth = lung > 0
  dice = 2 * (derived & truth).sum() / (derived.sum() + truth.sum())
  assert dice > 0.93
  assert not derived[0].any() and not derived[:, 0].any()  # outside air is not lung


def test_derived_lung_excludes_outside_air():
  hu = np.full((20, 20, 3), -1000.0, np.float32)  # air around the body
  hu[3:17, 3:17] = 40.0  # body
  hu[5:15, 5:9] = hu[5:15, 11:15] = -850.0  # two lungs
  hu[8, 6] = 40.0  # a vessel inside the right lung: a hole to fill
  expected = np.zeros(hu.shape, bool)
  expected[5:15, 5:9] = expected[5:15, 11:15] = True
  np.testing.assert_array_equal(volumes.derive_lung_mask(hu), expected)


# ----------------------------------------------------------------------------- devices


def test_sharded_predictor_matches_direct_apply():
  model = models.build(
    {
      "base": 4,
      "depth": 2,
      "dropout": 0.2,
      "num_outputs": 1,
      "dtype": "float32",
      "upsample": "subpixel",
      "pool": "reshape",
    }
  )
  import jax  # pylint: disable=g-import-not-at-top

  variables = jax.jit(model.init, static_argnames="train")(
    jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False
  )
  x = np.random.default_rng(0).random((11, 32, 32)).astype(np.float32)
  ref = np.asarray(
    jax.nn.sigmoid(
      jax.jit(model.apply, static_argnames="train")(variables, x[..., None], train=False)[..., 0]
    )
  )
  for n in (8, 1):
    p = predict.SlicePredictor(model, variables, mesh=sharding.make_mesh(n), batch_size=4)
    assert p.batch_size == (8 if n == 8 else 4)
    np.testing.assert_allclose(p(x), ref, rtol=1e-5, atol=1e-6)


def test_last_batch_runs_at_the_smallest_power_of_two_rows():
  """11 slices at batch 8 on one device run as 8 + 4 rows (not 8 + 8), 9 as 8 + 1, 16 as 8 + 8;
  on 8 devices a partial batch is still 8 rows (one per device). Outputs equal the unbatched
  network's: the padding rows are dropped, whatever their size."""
  model = models.build(
    {
      "base": 4,
      "depth": 1,
      "dropout": 0.0,
      "num_outputs": 1,
      "dtype": "float32",
      "upsample": "subpixel",
      "pool": "reshape",
    }
  )
  import jax  # pylint: disable=g-import-not-at-top

  variables = jax.jit(model.init, static_argnames="train")(
    jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 1)), train=False
  )
  p = predict.SlicePredictor(model, variables, mesh=sharding.make_mesh(1), batch_size=8)
  assert [p.rows_for(n) for n in (1, 2, 3, 4, 5, 7, 8)] == [1, 2, 4, 4, 8, 8, 8]
  p6 = predict.SlicePredictor(model, variables, mesh=sharding.make_mesh(1), batch_size=6)
  assert [p6.rows_for(n) for n in (1, 3, 4, 5, 6)] == [1, 4, 4, 6, 6]  # capped at the batch
  p8 = predict.SlicePredictor(model, variables, mesh=sharding.make_mesh(8), batch_size=16)
  assert [p8.rows_for(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
  seen = []
  fn = p._fn  # pylint: disable=protected-access
  p._fn = lambda v, x: (seen.append(x.shape[0]), fn(v, x))[1]  # pylint: disable=protected-access
  for n, rows in ((11, [8, 4]), (9, [8, 1]), (16, [8, 8])):
    seen.clear()
    x = np.random.default_rng(n).random((n, 16, 16)).astype(np.float32)
    ref = np.asarray(jax.nn.sigmoid(model.apply(variables, x[..., None], train=False)[..., 0]))
    np.testing.assert_allclose(p(x), ref, rtol=1e-5, atol=1e-6)
    assert seen == rows, (n, seen)


# ----------------------------------------------------------------------------- command line


def test_cli_with_real_checkpoint(trained, tiny_data, tmp_path, capsys):
  vol = os.path.join(tiny_data[0], "rp_im", "7.nii.gz")
  lung = os.path.join(tiny_data[0], "rp_lung_msk", "7.nii.gz")
  out = str(tmp_path / "out")
  rc = predict.main(
    [
      "--checkpoint",
      trained,
      vol,
      "--out",
      out,
      "--probabilities",
      "--overlay",
      "--lung_mask",
      lung,
      "--no_progress",
    ]
  )
  assert rc == 0
  assert "lesion mL" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == [
    "7_mask.nii.gz",
    "7_overlay.png",
    "7_probs.nii.gz",
    "7_report.json",
  ]
  src, m = nib.load(vol), nib.load(os.path.join(out, "7_mask.nii.gz"))
  assert m.shape == src.shape
  np.testing.assert_array_equal(m.affine, src.affine)
  mask = np.asarray(m.dataobj)
  probs = np.asarray(nib.load(os.path.join(out, "7_probs.nii.gz")).dataobj)
  contract = contract_lib.read(trained)
  np.testing.assert_array_equal(mask, probs >= np.float32(contract["threshold"]))
  with open(os.path.join(out, "7_report.json")) as f:
    report = json.load(f)
  voxel_mm3 = abs(np.linalg.det(src.affine[:3, :3]))
  assert report["lesion_volume_ml"] == pytest.approx(mask.sum() * voxel_mm3 / 1000, rel=1e-6)
  lung_arr = np.asarray(nib.load(lung).dataobj) > 0
  assert report["percent_lung_involved"] == pytest.approx(
    100 * (mask.astype(bool) & lung_arr).sum() / lung_arr.sum(), rel=1e-6
  )
  assert matplotlib.image.imread(os.path.join(out, "7_overlay.png")).ndim == 3


def _corrupt_checkpoint(workdir, dst, edit):
  shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns("tensorboard"))
  _, step = checkpointing.find_checkpoint(dst)
  for path in (
    os.path.join(dst, "best", str(step), "meta", "metadata"),
    os.path.join(dst, "model_contract.json"),
  ):
    with open(path) as f:
      obj = json.load(f)
    edit(obj["contract"] if "contract" in obj else obj)
    with open(path, "w") as f:
      json.dump(obj, f)
  return dst


def _bad_volume(kind, tmp_path):
  path = str(tmp_path / f"{kind}.nii.gz")
  if kind == "not_nifti":
    with open(path, "w") as f:
      f.write("this is not a NIfTI file\n")
  elif kind == "2d":
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), path)
  elif kind == "4d":
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4, 2), np.float32), np.eye(4)), path)
  elif kind == "nan":
    data = np.full((16, 16, 4), -800.0, np.float32)
    data[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
  return path


@pytest.mark.parametrize(
  "kind,match",
  [
    ("not_nifti", "not a readable NIfTI"),
    ("2d", "expected a 3D volume"),
    ("4d", "expected a 3D volume"),
    ("nan", "1 NaN/inf voxels"),
    ("model_config", "does not fit this model"),
    ("intensity", "intensity 'hounsfield'"),
  ],
)
def test_bad_input_one_line_error_and_no_output(kind, match, trained, tiny_data, tmp_path, capsys):
  ckpt, vol = trained, os.path.join(tiny_data[0], "rp_im", "8.nii.gz")
  if kind == "model_config":
    ckpt = _corrupt_checkpoint(
      trained, str(tmp_path / "other"), lambda c: c["model"].update(base=8)
    )
  elif kind == "intensity":
    ckpt = _corrupt_checkpoint(
      trained, str(tmp_path / "other"), lambda c: c.update(intensity="hounsfield")
    )
  else:
    vol = _bad_volume(kind, tmp_path)
  out = tmp_path / "out"
  rc = predict.main(
    ["--checkpoint", ckpt, vol, "--out", str(out), "--probabilities", "--overlay", "--no_progress"]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2
  errors = [line for line in err if line.startswith("error: ")]
  assert len(errors) == 1 and match in errors[0], err
  assert (ckpt if kind in ("model_config", "intensity") else vol) in errors[0]
  assert not out.exists() or os.listdir(out) == []


def test_one_bad_volume_does_not_stop_the_others(trained, tiny_data, tmp_path, capsys):
  good = os.path.join(tiny_data[0], "rp_im", "9.nii.gz")
  bad = _bad_volume("nan", tmp_path)
  out = tmp_path / "out"
  rc = predict.main(["--checkpoint", trained, bad, good, "--out", str(out), "--no_progress"])
  assert rc == 2
  assert sorted(os.listdir(out)) == ["9_mask.nii.gz", "9_report.json"]
  assert "nan.nii.gz" in capsys.readouterr().err


def test_a_failing_series_writes_nothing_and_the_others_finish(trained, tmp_path, capsys):
  """`--series all` on a folder with a good series and one whose spacing varies: exit 2, the bad
  series named on one line and nothing written for it, the good one's outputs complete."""
  pytest.importorskip("highdicom")
  from tests import dicom_series  # pylint: disable=g-import-not-at-top

  hu = dicom_series.phantom_hu()
  folder = str(tmp_path / "study")
  good = dicom_series.write_series(folder, hu, seed=0)
  bad = dicom_series.write_series(
    folder, hu, seed=1, study_uid=good.study_uid, series_number=4, defect="spacing_varies"
  )
  out = tmp_path / "out"
  rc = predict.main(
    ["--checkpoint", trained, folder, "--series", "all", "--out", str(out), "--no_progress"]
  )
  err = capsys.readouterr().err
  assert rc == 2
  [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert f"series {bad.series_uid}" in line and "spacing varies" in line
  stems = {f.split("_mask")[0] for f in os.listdir(out) if f.endswith("_mask.nii.gz")}
  assert len(stems) == 1
  [stem] = stems
  assert sorted(os.listdir(out)) == sorted(
    f"{stem}{suffix}" for suffix in ("_mask.nii.gz", "_report.json", "_seg.dcm")
  )
  with open(os.path.join(out, f"{stem}_report.json")) as f:
    assert good.series_uid in f.read()


def test_a_checkpoint_of_the_first_design_predicts_the_same(tmp_path):
  """A tiny run trained and applied by main at 657f02a, before the redesign
  (tests/fixtures/run_657f02a/README.md): today's code restores its checkpoint and predicts the
  same probabilities, mask and report numbers on the same volume."""
  fixture = os.path.join(os.path.dirname(__file__), "fixtures", "run_657f02a")
  workdir = tmp_path / "run"
  shutil.copytree(fixture, workdir)  # the fixture itself stays untouched
  out = tmp_path / "out"
  rc = predict.main(
    [
      "--checkpoint",
      str(workdir),
      str(workdir / "volume.nii.gz"),
      "--out",
      str(out),
      "--probabilities",
      "--no_progress",
    ]
  )
  assert rc == 0
  got = nib.load(out / "volume_probs.nii.gz").get_fdata(dtype=np.float32)
  want = nib.load(os.path.join(fixture, "expected_probs.nii.gz")).get_fdata(dtype=np.float32)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(
    np.asarray(nib.load(out / "volume_mask.nii.gz").dataobj),
    np.asarray(nib.load(os.path.join(fixture, "expected_mask.nii.gz")).dataobj),
  )
  with open(out / "volume_report.json") as f:
    report = json.load(f)
  with open(os.path.join(fixture, "expected_report.json")) as f:
    expected = json.load(f)
  for k in (
    "lesion_voxels",
    "num_lesions",
    "lesion_volume_ml",
    "percent_lung_involved",
    "shape",
    "axcodes",
    "threshold",
  ):
    assert report[k] == pytest.approx(expected[k]), k
