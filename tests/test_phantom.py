"""Tests of the synthetic chest-CT phantom (tvunet_jax/phantom.py) and its MedSeg file layout."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tvunet_jax import phantom, volumes
from tvunet_jax.phantom import anatomy, generate, render
from tvunet_jax.phantom import tubes as phantom_tubes

T = phantom.Tissue


# ---------------------------------------------------------------------------------------------
# Fixtures: a few small slices and volumes, generated once per module.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slices():
  """Eight 128 px single-slice patients: lesions in the even ones, effusion in 0 and 4."""
  return [
    generate._simulate_slice(
      np.random.default_rng(100 + i), 128, lesion=i % 2 == 0, effusion=i % 4 == 0
    )
    for i in range(8)
  ]


@pytest.fixture(scope="module")
def volume():
  return generate._simulate_volume(np.random.default_rng(7), 96, 24, lesion=True)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """A default-shaped set (100 tr slices, 9 volumes of 20-40 slices) at a tiny matrix size."""
  out = tmp_path_factory.mktemp("phantom") / "medseg"
  summary = phantom.write_medseg_phantom(
    out, tr_slices=100, tr_size=48, rp_volumes=9, rp_size=48, rp_slices=(20, 40), seed=3
  )
  return out, summary


def _pooled(phantoms):
  return tuple(
    np.concatenate([getattr(p, k).ravel() for p in phantoms])
    for k in ("hu", "labels", "lung", "tissue")
  )


# ---------------------------------------------------------------------------------------------
# Storage orientation.
# ---------------------------------------------------------------------------------------------


def test_storage_rotation_contract_on_a_hand_made_array():
  assert phantom.STORAGE_ROT90_K == 1
  display = np.array(
    [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
  )  # row 0 anterior, column 0 the patient's right
  # Rotating the display a quarter turn clockwise: stored[x, y] with y = 0 posterior.
  expected = np.array([[9, 5, 1], [10, 6, 2], [11, 7, 3], [12, 8, 4]])
  stored = phantom.to_storage(display)
  np.testing.assert_array_equal(stored, expected)
  np.testing.assert_array_equal(np.rot90(stored, k=phantom.STORAGE_ROT90_K, axes=(0, 1)), display)
  np.testing.assert_array_equal(phantom.from_storage(stored), display)
  # The phantom's helpers are the ones every reader uses.
  assert phantom.to_storage is volumes.to_storage
  assert phantom.from_storage is volumes.from_storage


def test_storage_round_trip_3d():
  x = np.random.default_rng(0).normal(size=(5, 7, 3))
  np.testing.assert_array_equal(phantom.from_storage(phantom.to_storage(x)), x)
  assert phantom.to_storage(x).shape == (7, 5, 3)


# ---------------------------------------------------------------------------------------------
# Single slices.
# ---------------------------------------------------------------------------------------------


def test_generate_slice_types_and_label_sets():
  hu, labels, lung = phantom.generate_slice(np.random.default_rng(0), 64, lesion=True)
  assert hu.shape == labels.shape == lung.shape == (64, 64)
  assert hu.dtype == np.float32 and labels.dtype == np.uint8 and lung.dtype == np.uint8
  assert set(np.unique(labels)) <= {0, 1, 2, 3}
  assert set(np.unique(lung)) == {0, 1, 2}
  assert np.all(np.isfinite(hu)) and hu.min() >= -1024 and hu.max() <= 3071


def test_lesion_flag(slices):
  for i, s in enumerate(slices):
    has = np.isin(s.labels, (phantom.GROUND_GLASS, phantom.CONSOLIDATION)).any()
    assert has == (i % 2 == 0), i
    if i % 2:
      assert not s.labels.any(), i  # lesion=False: no label at all, not even effusion
  assert all((s.labels == phantom.PLEURAL_EFFUSION).any() for s in (slices[0], slices[4]))


def test_labels_lie_inside_the_lung_mask(slices, volume):
  assert volume.labels.any() and sum(s.labels.any() for s in slices) == 4
  for s in [*slices, volume]:
    assert np.all(s.lung[s.labels > 0] > 0)


def test_display_orientation_right_lung_left_spine_bottom(slices):
  for s in slices:
    h, w = s.lung.shape
    cols = np.arange(w)[None, :]
    right = np.broadcast_to(cols, s.lung.shape)[s.lung == phantom.RIGHT_LUNG]
    left = np.broadcast_to(cols, s.lung.shape)[s.lung == phantom.LEFT_LUNG]
    # Radiological convention: the patient's right lung is on the image's left.
    assert right.mean() < w / 2 < left.mean()
    rows = np.arange(h)[:, None]
    midline = np.zeros_like(s.lung, bool)
    midline[:, w // 2 - w // 16 : w // 2 + w // 16] = True
    spine_rows = np.broadcast_to(rows, s.lung.shape)[(s.tissue == T.BONE) & midline]
    lung_rows = np.broadcast_to(rows, s.lung.shape)[s.lung > 0]
    # The spine (and so the posterior side) is at the bottom, behind the lungs' centre.
    assert np.median(spine_rows) > lung_rows.mean() > h / 4


def test_hounsfield_units_per_tissue(slices):
  hu, labels, lung, tissue = _pooled(slices)
  med = lambda m: float(np.median(hu[m]))  # noqa: E731
  assert -1010 <= med(tissue == T.AIR) <= -990
  assert -130 <= med(tissue == T.FAT) <= -70
  assert 30 <= med(tissue == T.MUSCLE) <= 70
  assert 20 <= med(tissue == T.SOFT) <= 70
  assert 400 <= med(tissue == T.BONE) <= 1000
  assert -950 <= med((lung > 0) & (labels == 0)) <= -750
  assert -700 <= med(labels == phantom.GROUND_GLASS) <= -300
  assert -100 <= med(labels == phantom.CONSOLIDATION) <= 50
  assert -5 <= med(labels == phantom.PLEURAL_EFFUSION) <= 25
  # Vessels: brighter than the lung around them.
  assert med(tissue == T.VESSEL) > med(tissue == T.LUNG) + 150


def test_noise_level_in_air(slices):
  for s in slices:
    corner = s.hu[:12, :12]  # air in front of the patient
    assert 5 <= corner.std() <= 25
    assert abs(np.median(corner) + 1000) < 15


def test_airways_hold_air():
  for seed in range(3):
    rng = np.random.default_rng(seed)
    p = anatomy._sample_patient(rng)
    # A slice high in the chest, through the trachea.
    ph = render._render(p, rng, 128, 350.0, np.array([0.8 * p.lung_h]), 5.0, None, 0, None)
    core = ndimage.binary_erosion(ph.tissue[0] == T.AIRWAY)
    assert core.any()
    assert np.median(ph.hu[0][core]) < -900


def test_effusion_is_dependent(slices):
  for s in (slices[0], slices[4]):
    rows = np.broadcast_to(np.arange(s.lung.shape[0])[:, None], s.lung.shape)
    eff = s.labels == phantom.PLEURAL_EFFUSION
    side = np.bincount(s.lung[eff]).argmax()
    # Fluid layers at the back of the lung it sits in (supine patient).
    assert rows[eff].mean() > rows[s.lung == side].mean()


def test_lung_is_smaller_at_the_apex_than_in_the_middle():
  rng = np.random.default_rng(5)
  p = anatomy._sample_patient(rng)
  zs = np.array([0.4, 0.5, 0.6, 0.7, 0.92]) * p.lung_h
  ph = render._render(p, rng, 96, 350.0, zs, 5.0, None, 0, None)
  area = (ph.lung > 0).sum(axis=(1, 2))
  assert area[-1] < 0.65 * area[:-1].max()


# ---------------------------------------------------------------------------------------------
# Volumes.
# ---------------------------------------------------------------------------------------------


def _dice(a, b):
  return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_generate_volume_shapes():
  hu, labels, lung = phantom.generate_volume(np.random.default_rng(1), 48, 5)
  assert hu.shape == labels.shape == lung.shape == (48, 48, 5)
  assert hu.dtype == np.float32 and labels.dtype == np.uint8 and lung.dtype == np.uint8


def test_volume_is_coherent_across_slices(volume):
  les = np.isin(volume.labels, (phantom.GROUND_GLASS, phantom.CONSOLIDATION))
  z = les.shape[2]
  adjacent = [
    _dice(les[..., k], les[..., k + 1])
    for k in range(z - 1)
    if les[..., k].any() and les[..., k + 1].any()
  ]
  assert len(adjacent) >= 3
  assert np.mean(adjacent) > 0.5
  # Lesions of another patient at the same slice index overlap far less.
  other = generate._simulate_volume(np.random.default_rng(8), 96, z, lesion=True)
  les_o = np.isin(other.labels, (phantom.GROUND_GLASS, phantom.CONSOLIDATION))
  unrelated = [
    _dice(les[..., k], les_o[..., k]) for k in range(z) if les[..., k].any() and les_o[..., k].any()
  ]
  assert np.mean(unrelated or [0.0]) < 0.5 * np.mean(adjacent)
  # Anatomy too: the lung masks of neighbouring 5 mm slices nearly coincide.
  lung = volume.lung > 0
  pairs = [_dice(lung[..., k], lung[..., k + 1]) for k in range(z - 1) if lung[..., k].any()]
  assert np.mean(pairs) > 0.85


def test_lesion_free_volume():
  ph = generate._simulate_volume(np.random.default_rng(2), 48, 6, lesion=False)
  assert not ph.labels.any()


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="size"):
    phantom.generate_slice(np.random.default_rng(0), 16)
  with pytest.raises(ValueError, match="num_slices"):
    phantom.generate_volume(np.random.default_rng(0), 48, 0)
  with pytest.raises(ValueError, match="effusion"):
    phantom.generate_slice(np.random.default_rng(0), 48, lesion=False, effusion=True)


def test_same_seed_same_arrays():
  a = phantom.generate_slice(np.random.default_rng(11), 48)
  b = phantom.generate_slice(np.random.default_rng(11), 48)
  c = phantom.generate_slice(np.random.default_rng(12), 48)
  for x, y in zip(a, b):
    assert x.tobytes() == y.tobytes()
  assert a[0].tobytes() != c[0].tobytes()


# ---------------------------------------------------------------------------------------------
# Geometry helpers, checked against hand-computed values.
# ---------------------------------------------------------------------------------------------


def test_tube_coverage_matches_circle_area_and_slab_fraction():
  x = (np.arange(41) - 20).astype(np.float32)  # 1 mm pixels
  # A vertical cylinder of radius 5 mm through a 5 mm slab: a disc of area pi * 25 pixels.
  vertical = phantom_tubes._Tubes.of([((0, 0, -50), (0, 0, 50), 5.0)])
  cov = phantom_tubes._draw_tubes(vertical, x, x, np.array([0.0]), 2.5, 1.0)
  assert abs(cov.sum() - np.pi * 25) < 0.02 * np.pi * 25
  assert cov[0, 20, 20] == 1.0 and cov[0, 20, 27] == 0.0
  # A horizontal cylinder of radius 1 mm inside a 5 mm slab fills 2/5 of it (partial volume).
  horizontal = phantom_tubes._Tubes.of([((-10, 0, 0), (10, 0, 0), 1.0)])
  cov = phantom_tubes._draw_tubes(horizontal, x, x, np.array([0.0]), 2.5, 1.0)
  assert abs(cov.max() - 0.4) < 1e-6
  # ... and nothing in a slab 10 mm away.
  cov = phantom_tubes._draw_tubes(horizontal, x, x, np.array([10.0]), 2.5, 1.0)
  assert cov.max() == 0.0


def test_territory_tree_follows_murray_law_and_reaches_every_point():
  rng = np.random.default_rng(0)
  pts = rng.uniform(-20, 20, (64, 3))
  tubes, gen, tree = phantom_tubes._territory_trees(
    rng, pts, np.zeros(64, np.int64), np.zeros((1, 3)), r_leaf=0.5
  )
  assert gen[0] == 0 and tubes.r[0] == pytest.approx(0.5 * 64 ** (1 / 3))
  leaves = np.isclose(tubes.r, 0.5)
  assert leaves.sum() == 64  # a binary tree over 64 points: 64 leaves, 63 branchings
  assert len(tubes.r) == 127 and np.all(tree == 0)
  # Every sampled point is the end of exactly one leaf segment.
  d = np.linalg.norm(tubes.b[leaves][:, None] - pts[None], axis=-1)
  assert np.all(d.min(axis=0) < 1e-9)


def test_affine_axis_codes_and_zooms():
  aff = phantom.affine_for(64, 350.0, 5.0)
  assert nib.aff2axcodes(aff) == ("L", "A", "S")
  np.testing.assert_allclose(nib.affines.voxel_sizes(aff), [350 / 64, 350 / 64, 5.0])
  # The image centre maps to x = y = 0.
  np.testing.assert_allclose(nib.affines.apply_affine(aff, [31.5, 31.5, 0])[:2], [0, 0])


# ---------------------------------------------------------------------------------------------
# Writing the MedSeg layout.
# ---------------------------------------------------------------------------------------------


def test_written_layout_shapes_dtypes_and_headers(written):
  out, summary = written
  tr = nib.load(out / phantom.TR_IMAGE)
  assert tr.shape == (48, 48, 100)
  assert tr.get_data_dtype() == np.float32
  np.testing.assert_allclose(tr.header.get_zooms(), (350 / 48, 350 / 48, 5.0), rtol=1e-6)
  assert nib.aff2axcodes(tr.affine) == ("L", "A", "S")
  for name in (phantom.TR_MASK, phantom.TR_LUNG):
    img = nib.load(out / name)
    assert img.shape == (48, 48, 100) and img.get_data_dtype() == np.uint8
  for n in range(1, 10):
    imgs = [
      nib.load(out / d / f"{n}.nii.gz")
      for d in (phantom.RP_IMAGE_DIR, phantom.RP_MASK_DIR, phantom.RP_LUNG_DIR)
    ]
    shape = imgs[0].shape
    assert shape[:2] == (48, 48) and 20 <= shape[2] <= 40
    assert [i.shape for i in imgs] == [shape] * 3
    assert [i.get_data_dtype() for i in imgs] == [np.int16, np.uint8, np.uint8]
    zooms = imgs[0].header.get_zooms()
    assert 330 / 48 <= zooms[0] == zooms[1] <= 380 / 48 and zooms[2] == pytest.approx(5.0)
    np.testing.assert_allclose(imgs[0].affine, imgs[1].affine)
    labels = np.asanyarray(imgs[1].dataobj)
    lung = np.asanyarray(imgs[2].dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and set(np.unique(lung)) <= {0, 1, 2}
    assert np.all(lung[labels > 0] > 0)
  prov = json.loads((out / phantom.PROVENANCE).read_text())
  assert prov["params"]["seed"] == 3 and prov["params"]["tr_slices"] == 100
  assert prov["lesion_free_fraction"] == summary["lesion_free_fraction"]
  assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_written_files_are_stored_rotated(written):
  out, _ = written
  lung = phantom.from_storage(np.asanyarray(nib.load(out / phantom.TR_LUNG).dataobj))
  img = phantom.from_storage(np.asanyarray(nib.load(out / phantom.TR_IMAGE).dataobj))
  cols = np.broadcast_to(np.arange(48)[None, :, None], lung.shape)
  assert cols[lung == 1].mean() < 24 < cols[lung == 2].mean()
  # Bone at the midline sits in the bottom (posterior) half of the displayed slices.
  mid = img[:, 21:27, :]
  rows = np.broadcast_to(np.arange(48)[:, None, None], mid.shape)
  assert np.median(rows[mid > 300]) > 24


def test_lesion_free_fraction_of_a_default_shaped_set(written):
  out, summary = written
  masks = [np.asanyarray(nib.load(out / phantom.TR_MASK).dataobj)]
  masks += [
    np.asanyarray(nib.load(out / phantom.RP_MASK_DIR / f"{n}.nii.gz").dataobj) for n in range(1, 10)
  ]
  per_slice = np.concatenate([(m > 0).any(axis=(0, 1)) for m in masks])
  free = 1 - per_slice.mean()
  assert 0.3 <= free <= 0.7
  assert free == pytest.approx(summary["lesion_free_fraction"], abs=1e-4)
  tr_free = 1 - (masks[0] > 0).any(axis=(0, 1)).mean()
  assert tr_free == 0.5  # tr: exactly half of the single-slice patients carry lesions


def _tiny(out, **kw):
  return phantom.write_medseg_phantom(
    out, tr_slices=4, tr_size=40, rp_volumes=2, rp_size=40, rp_slices=(3, 4), **kw
  )


def _arrays(folder):
  found = {}
  for root, _, files in os.walk(folder):
    for f in files:
      if f.endswith(".nii.gz"):
        path = os.path.join(root, f)
        found[os.path.relpath(path, folder)] = np.asanyarray(nib.load(path).dataobj)
  return found


def test_write_is_deterministic(tmp_path):
  _tiny(tmp_path / "a", seed=5)
  _tiny(tmp_path / "b", seed=5)
  _tiny(tmp_path / "c", seed=6)
  a, b, c = _arrays(tmp_path / "a"), _arrays(tmp_path / "b"), _arrays(tmp_path / "c")
  assert sorted(a) == sorted(b) == sorted(c) and len(a) == 9
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  assert a["tr_im.nii.gz"].tobytes() != c["tr_im.nii.gz"].tobytes()


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
  out = tmp_path / "p"
  _tiny(out, seed=1)
  with pytest.raises(FileExistsError, match=str(out)):
    _tiny(out, seed=2)
  before = _arrays(out)
  # Overwrite with fewer volumes: the files of volume 2 must not survive as stale data.
  phantom.write_medseg_phantom(
    out, tr_slices=4, tr_size=40, rp_volumes=1, rp_size=40, rp_slices=(3, 4), seed=2, overwrite=True
  )
  after = _arrays(out)
  assert sorted(after) == sorted(k for k in before if "2.nii.gz" not in k)
  assert after["tr_im.nii.gz"].tobytes() != before["tr_im.nii.gz"].tobytes()
  assert json.loads((out / phantom.PROVENANCE).read_text())["params"]["seed"] == 2


def test_non_folder_and_bad_parameters(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(FileExistsError, match=str(f)):
    _tiny(f)
  with pytest.raises(ValueError, match="rp_slices"):
    phantom.write_medseg_phantom(tmp_path / "q", rp_slices=(5, 2))
  with pytest.raises(ValueError, match="tr_size"):
    phantom.write_medseg_phantom(tmp_path / "q", tr_size=8)
  assert not (tmp_path / "q").exists()


def test_crash_mid_write_leaves_no_complete_looking_set(tmp_path, monkeypatch):
  out = tmp_path / "p"
  _tiny(out, seed=1)
  calls = []
  real_save = nib.save

  def flaky_save(img, path):
    calls.append(path)
    if len(calls) == 4:  # the first volume's image, after the three tr files
      with open(path, "wb") as fh:
        fh.write(b"half a file")
      raise OSError("disk full")
    real_save(img, path)

  monkeypatch.setattr(nib, "save", flaky_save)
  with pytest.raises(OSError, match="disk full"):
    _tiny(out, seed=2, overwrite=True)
  # The completion marker of the old set is gone, the half-written file never got its final
  # name (the old complete file is still there) and no temporary file is left behind.
  assert not (out / phantom.PROVENANCE).exists()
  leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp")]
  assert not leftovers
  nib.load(out / phantom.RP_IMAGE_DIR / "1.nii.gz").get_fdata()  # still a valid file


def test_command_line(tmp_path, capsys):
  out = tmp_path / "cli"
  args = [
    "--out",
    str(out),
    "--tr-slices",
    "2",
    "--tr-size",
    "40",
    "--rp-volumes",
    "1",
    "--rp-size",
    "40",
    "--rp-min-slices",
    "2",
    "--rp-max-slices",
    "2",
    "--seed",
    "4",
  ]
  assert phantom.main(args) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["params"]["seed"] == 4
  assert nib.load(out / phantom.RP_IMAGE_DIR / "1.nii.gz").shape == (40, 40, 2)
  assert phantom.main(args) == 2  # non-empty folder without --overwrite
  assert str(out) in capsys.readouterr().err
  assert phantom.main(args + ["--overwrite"]) == 0
