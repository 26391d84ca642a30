"""Input pipeline: targets, intensity, sharded global batches, seeded epochs, exact resume."""

import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tfds_builder.covid19_ct_seg import build
from tvunet_jax import input_pipeline as ip

DUMMY = os.path.join(
  os.path.dirname(__file__), "..", "tfds_builder", "covid19_ct_seg", "dummy_data"
)


def _fake_source(n, size=8):
  """A list of examples whose image is filled with the example's index: identifiable rows."""
  return [
    {
      "image": np.full((size, size), i, np.float32),
      "mask": (np.arange(size * size).reshape(size, size) % 4).astype(np.uint8),
      "volume_id": f"v{i}".encode(),
      "slice_index": np.int32(i),
      "spacing": np.ones(3, np.float32),
    }
    for i in range(n)
  ]


def _ids(batch):
  return [int(v) for v in np.asarray(batch["image"])[:, 0, 0, 0]]


def test_preprocess_targets_and_window():
  mask = np.array([[0, 1], [2, 3]], np.uint8)
  image = np.array([[-2000.0, -1350.0], [-600.0, 500.0]], np.float32)
  ex = {"image": image, "mask": mask}
  out = ip.preprocess(ex, target="ground_glass", intensity="raw_hu")
  assert out["image"].shape == (2, 2, 1) and out["label"].dtype == np.float32
  np.testing.assert_array_equal(out["image"][..., 0], image)
  np.testing.assert_array_equal(out["label"][..., 0], [[0, 1], [0, 0]])
  np.testing.assert_array_equal(
    ip.preprocess(ex, target="lesion")["label"][..., 0], [[0, 1], [1, 0]]
  )
  np.testing.assert_array_equal(ip.preprocess(ex, target="any")["label"][..., 0], [[0, 1], [1, 1]])
  # Lung window W1500 L-600: -1350 -> 0, -600 -> 0.5, 150 -> 1, clipped outside.
  win = ip.preprocess(ex, intensity="lung_window")["image"][..., 0]
  np.testing.assert_allclose(win, [[0.0, 0.0], [0.5, 1.0]])
  with pytest.raises(ValueError, match="unknown target"):
    ip.preprocess(ex, target="nodules")


def test_epochs_are_permutations_reshuffled_per_epoch():
  src = _fake_source(12)
  it = ip.TrainIterator(src, local_batch_size=4, seed=3)
  assert it.steps_per_epoch == 3
  epoch1 = sum((_ids(next(it)) for _ in range(3)), [])
  epoch2 = sum((_ids(next(it)) for _ in range(3)), [])
  assert sorted(epoch1) == list(range(12)) and sorted(epoch2) == list(range(12))
  assert epoch1 != epoch2 and epoch1 != list(range(12))


def test_same_seed_same_stream_other_seed_differs():
  src = _fake_source(16)
  it1, it2 = (ip.TrainIterator(src, local_batch_size=4, seed=1) for _ in range(2))
  it3 = ip.TrainIterator(src, local_batch_size=4, seed=2)
  s1 = [_ids(next(it1)) for _ in range(6)]
  assert s1 == [_ids(next(it2)) for _ in range(6)]
  assert s1 != [_ids(next(it3)) for _ in range(6)]


def test_resume_replays_exactly():
  src = _fake_source(10)
  straight = ip.TrainIterator(src, local_batch_size=3, seed=0)
  ref = [_ids(next(straight)) for _ in range(9)]
  first = ip.TrainIterator(src, local_batch_size=3, seed=0)
  for _ in range(4):
    next(first)
  state = first.get_state()
  assert state == {"step": 4}
  resumed = ip.TrainIterator(src, local_batch_size=3, seed=0)
  resumed.set_state(state)
  assert [_ids(next(resumed)) for _ in range(5)] == ref[4:]


def test_processes_get_disjoint_equal_shards():
  src = _fake_source(11)
  seen = []
  for pi in range(2):
    it = ip.TrainIterator(src, local_batch_size=5, seed=0, process_index=pi, process_count=2)
    assert it.steps_per_epoch == 1
    seen.append(set(_ids(next(it))))
  assert not seen[0] & seen[1]
  assert seen[0] <= set(range(0, 11, 2)) and seen[1] <= set(range(1, 11, 2))
  with pytest.raises(ValueError, match="fewer than the per-process batch"):
    ip.TrainIterator(src, local_batch_size=6, seed=0, process_index=0, process_count=2)


def test_augment_flip_and_identity():
  ex = _fake_source(1, size=6)[0]
  ex["image"] = np.arange(36, dtype=np.float32).reshape(6, 6)
  rng = np.random.default_rng(0)
  flipped = ip.augment_example(ex, rng, ip.Augment(flip=1.0))
  np.testing.assert_array_equal(flipped["image"], ex["image"][:, ::-1])
  np.testing.assert_array_equal(flipped["mask"], ex["mask"][:, ::-1])
  moved = ip.augment_example(ex, rng, ip.Augment(rotate_deg=20, shift_px=2, hu_jitter=50))
  assert set(np.unique(moved["mask"])) <= set(np.unique(ex["mask"]))  # labels stay integers
  assert moved["image"].shape == (6, 6)
  # Everything off is the identity (the paper-faithful setting).
  same = ip.augment_example(ex, np.random.default_rng(0), ip.Augment())
  np.testing.assert_array_equal(same["image"], ex["image"])


def test_augmented_stream_is_reproducible():
  src = _fake_source(8)
  aug = ip.Augment(flip=0.5, rotate_deg=10, shift_px=1, hu_jitter=20)
  a = ip.TrainIterator(src, local_batch_size=4, seed=5, augment=aug)
  b = ip.TrainIterator(src, local_batch_size=4, seed=5, augment=aug)
  for _ in range(3):
    np.testing.assert_array_equal(next(a)["image"], next(b)["image"])


@pytest.fixture(scope="module")
def built_dummy(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  build(DUMMY, data_dir, "paper_128")
  return data_dir


def test_batches_sharded_over_8_devices(built_dummy):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  src = ip.load_split(built_dummy, "paper_128", "train")
  it = ip.TrainIterator(src, local_batch_size=8, seed=0, sharding=sharding)
  batch = next(it)
  assert batch["image"].shape == (8, 128, 128, 1) and batch["label"].shape == (8, 128, 128, 1)
  assert batch["image"].sharding.is_equivalent_to(sharding, 4)
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(1, 128, 128, 1)}
  assert sorted(s.device.id for s in batch["image"].addressable_shards) == list(range(8))


def test_eval_batches_cover_split_once_with_padding(built_dummy):
  src = ip.load_split(built_dummy, "paper_128", "test")  # 8 slices
  seen = []
  n_valid = 0
  for batch, meta in ip.eval_batches(src, local_batch_size=3):
    assert batch["image"].shape == (3, 128, 128, 1)
    n_valid += int(batch["valid"].sum())
    np.testing.assert_array_equal(np.asarray(batch["image"])[~meta["valid"]], 0.0)
    seen += [
      (v, s) for v, s, ok in zip(meta["volume_id"], meta["slice_index"], meta["valid"]) if ok
    ]
  assert n_valid == 8 and len(set(seen)) == 8
  assert {v for v, _ in seen} == {"rp7", "rp8", "rp9"}


def test_prepare_dataset_fills_only_empty_folders(tmp_path):
  phantom = {"tr_slices": 2, "tr_size": 32, "rp_size": 32, "rp_slices": (2, 2)}
  empty = tmp_path / "empty"
  empty.mkdir()
  ip.prepare_dataset(empty, tmp_path / "tfds_a", "paper_128", phantom=phantom)
  assert (empty / "phantom.json").exists()
  assert [p.name for p in tmp_path.iterdir() if ".incomplete-" in p.name] == []
  # A folder that already holds data (here the hand-made MedSeg-shaped set) is never replaced.
  real = tmp_path / "real"
  shutil.copytree(DUMMY, real)
  ip.prepare_dataset(real, tmp_path / "tfds_b", "paper_128", phantom=phantom)
  assert not (real / "phantom.json").exists()
  assert len(ip.load_split(tmp_path / "tfds_b", "paper_128", "validation")) == 3
