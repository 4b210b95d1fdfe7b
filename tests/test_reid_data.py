"""ReID dataset readers and samplers, on tiny trees written in each dataset's real layout."""
from __future__ import annotations

import collections
import io
import os
import random

import numpy as np
import pytest
from PIL import Image

from jaxprompt.clipreid import data as reid
from jaxprompt.clipreid.data import IdentityMap, ReIDRecord, build_reid_dataset, check_num_ids
from jaxprompt.clipreid.samplers import IdentitySampler, RandomSampler


def _jpeg_bytes() -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 4, 3), 128, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


JPEG = _jpeg_bytes()


def _touch(folder, names):
  os.makedirs(folder, exist_ok=True)
  for n in names:
    with open(os.path.join(folder, n), "wb") as f:
      f.write(JPEG)


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))


def _basenames(records):
  return [os.path.basename(r.path) for r in records]


# ---------------------------------------------------------------------------------------------
# Market-1501, Duke, Occluded-Duke


def _market(tmp_path):
  base = tmp_path / "Market-1501-v15.09.15"
  _touch(base / "bounding_box_train", [
      "0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0002_c1s1_000801_02.jpg",
      "0007_c3s1_000101_01.jpg", "0007_c6s2_000201_01.jpg", "0015_c5s3_000301_04.jpg",
      "Thumbs.db.txt"])
  _touch(base / "query", ["0002_c3s1_000001_00.jpg", "0007_c1s1_000002_00.jpg"])
  _touch(base / "bounding_box_test", [
      "0002_c4s1_000003_01.jpg", "0007_c2s1_000004_01.jpg", "0000_c1s1_000005_01.jpg",
      "-1_c1s1_000006_01.jpg", "-1_c2s1_000007_01.jpg"])
  return base


def test_market1501(tmp_path):
  base = _market(tmp_path)
  ds = build_reid_dataset("market1501", str(tmp_path))
  assert ds.root == str(base)
  assert ds.num_train_pids == 3 and len(ds.train) == 6
  assert ds.id_map.orig_ids == (2, 7, 15)
  by_name = {os.path.basename(r.path): r for r in ds.train}
  path = str(base / "bounding_box_train" / "0007_c6s2_000201_01.jpg")
  assert by_name["0007_c6s2_000201_01.jpg"] == ReIDRecord(path, 1, 5, -1, 7)
  assert sorted({r.pid for r in ds.train}) == [0, 1, 2]
  assert ds.num_train_cams == 5 and ds.num_train_views == 1 and not ds.has_views
  # Query/gallery keep original ids; junk (-1) dropped, distractors (0) kept.
  assert [r.pid for r in ds.query] == [2, 7]
  assert sorted(r.pid for r in ds.gallery) == [0, 2, 7]
  assert all(0 <= r.camid <= 5 for r in ds.query + ds.gallery)
  s = ds.summary()
  assert "train    |     3 |        6 |         5" in s
  assert "gallery  |     3 |        3 |         3" in s
  # The dataset folder itself also works as root.
  assert _basenames(build_reid_dataset("Market1501", str(base)).train) == _basenames(ds.train)
  np.testing.assert_array_equal(ds.train_pids(), [r.pid for r in ds.train])


def test_market1501_bad_inputs(tmp_path):
  base = _market(tmp_path)
  _touch(base / "query", ["readme.jpg"])
  with pytest.raises(ValueError, match="readme.jpg"):
    reid.read_market1501(str(tmp_path))
  os.remove(base / "query" / "readme.jpg")
  _touch(base / "query", ["0002_c7s1_000001_00.jpg"])
  with pytest.raises(ValueError, match="0002_c7s1_000001_00.jpg"):
    reid.read_market1501(str(tmp_path))
  os.remove(base / "query" / "0002_c7s1_000001_00.jpg")
  os.rename(base / "query", base / "query_x")
  with pytest.raises(FileNotFoundError, match=r"query"):
    reid.read_market1501(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    reid.read_market1501(str(tmp_path / "does_not_exist"))
  with pytest.raises(ValueError, match="unknown ReID dataset 'cuhk03'"):
    build_reid_dataset("cuhk03", str(tmp_path))


def test_market1501_empty_split(tmp_path):
  base = _market(tmp_path)
  for n in os.listdir(base / "query"):
    os.remove(base / "query" / n)
  with pytest.raises(FileNotFoundError, match="no .jpg images found in folder: .*query"):
    reid.read_market1501(str(tmp_path))


@pytest.mark.parametrize("key,sub", [("dukemtmc", "DukeMTMC-reID"), ("occ_duke", "Occluded_Duke")])
def test_duke_layouts(tmp_path, key, sub):
  base = tmp_path / "dukemtmcreid" / sub
  _touch(base / "bounding_box_train",
         ["0001_c2_f0046182.jpg", "0001_c8_f0046302.jpg", "0005_c1_f0000001.jpg"])
  _touch(base / "query", ["0001_c5_f0000002.jpg"])
  _touch(base / "bounding_box_test", ["0001_c6_f0000003.jpg", "0009_c7_f0000004.jpg"])
  ds = build_reid_dataset(key, str(tmp_path))
  assert ds.num_train_pids == 2 and [r.pid for r in ds.train] == [0, 0, 1]
  assert [r.camid for r in ds.train] == [1, 7, 0]
  assert ds.num_train_cams == 3
  assert [r.pid for r in ds.gallery] == [1, 9]
  _touch(base / "query", ["0001_c9_f0000005.jpg"])
  with pytest.raises(ValueError, match="0001_c9_f0000005.jpg"):
    build_reid_dataset(key, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# MSMT17


def _msmt(tmp_path):
  base = tmp_path / "MSMT17"
  (base / "train").mkdir(parents=True)
  (base / "test").mkdir()
  _write(str(base / "list_train.txt"), [
      "0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303morning_0016_0.jpg 0",
      "0001/0001_000_15_0303noon_0001_1.jpg 1", "0002/0002_000_03_0303noon_0002_1.jpg 2"])
  _write(str(base / "list_val.txt"), [
      "0000/0000_002_02_0303morning_0017_0.jpg 0", "0001/0001_001_04_0303noon_0003_1.jpg 1"])
  _write(str(base / "list_query.txt"), ["0000/0000_000_07_0303morning_0001_0.jpg 0",
                                        "0001/0001_000_08_0303morning_0002_0.jpg 1"])
  _write(str(base / "list_gallery.txt"), ["0000/0000_001_09_0303morning_0003_0.jpg 0",
                                          "0001/0001_001_10_0303morning_0004_0.jpg 1",
                                          "0002/0002_001_11_0303morning_0004_0.jpg 2"])
  return base


def test_msmt17_train_val_merged(tmp_path):
  base = _msmt(tmp_path)
  ds = build_reid_dataset("msmt17", str(tmp_path))
  assert len(ds.train) == 6  # list_train + list_val
  assert ds.num_train_pids == 3 and ds.id_map.orig_ids == (0, 1, 2)
  assert [r.camid for r in ds.train] == [0, 4, 14, 2, 1, 3]
  assert [r.pid for r in ds.train] == [0, 0, 1, 2, 0, 1]
  assert ds.train[-1].path == str(base / "train" / "0001" / "0001_001_04_0303noon_0003_1.jpg")
  assert ds.query[0].path == str(base / "test" / "0000" / "0000_000_07_0303morning_0001_0.jpg")
  assert [r.camid for r in ds.gallery] == [8, 9, 10]
  assert ds.num_train_cams == 6


def test_msmt17_bad_inputs(tmp_path):
  base = _msmt(tmp_path)
  os.remove(base / "list_val.txt")
  with pytest.raises(FileNotFoundError, match="list_val.txt"):
    reid.read_msmt17(str(tmp_path))
  _write(str(base / "list_val.txt"), ["0000/badname.jpg 0"])
  with pytest.raises(ValueError, match=r"list_val.txt:1"):
    reid.read_msmt17(str(tmp_path))
  _write(str(base / "list_val.txt"), ["0000/0000_002_02_0303morning_0017_0.jpg 5"])
  with pytest.raises(ValueError, match="not 0..0"):
    reid.read_msmt17(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# VeRi-776


def _veri(tmp_path):
  base = tmp_path / "VeRi"
  train = ["0001_c001_00016450_0.jpg", "0001_c002_00016460_0.jpg", "0003_c004_00016470_0.jpg",
           "0003_c020_00016480_0.jpg", "0004_c001_00016490_0.jpg"]
  query = ["0002_c002_00030600_1.jpg", "0005_c003_00030610_1.jpg"]
  test = ["0002_c003_00030620_1.jpg", "0005_c004_00030630_1.jpg", "0005_c005_00030640_1.jpg"]
  _touch(base / "image_train", train)
  _touch(base / "image_query", query)
  _touch(base / "image_test", test)
  kp = " ".join(str(v) for v in range(40))
  # 0004_c001 has no viewpoint entry; neither does one gallery image.
  _write(str(base / "keypoint_train.txt"), [f"VeRi/image_train/{n} {kp} {v}"
                                           for n, v in zip(train[:4], [0, 3, 7, 3])])
  # The public test file repeats some lines; a repeat must not matter.
  labelled = zip(query + test[:2] + test[:1], [1, 2, 4, 5, 4])
  _write(str(base / "keypoint_test.txt"), [f"VeRi/image_test/{n} {kp} {v}" for n, v in labelled])
  return base


def test_veri_views_and_dropping(tmp_path):
  _veri(tmp_path)
  ds = build_reid_dataset("veri", str(tmp_path))
  assert ds.has_views
  assert _basenames(ds.train) == ["0001_c001_00016450_0.jpg", "0001_c002_00016460_0.jpg",
                                  "0003_c004_00016470_0.jpg", "0003_c020_00016480_0.jpg"]
  assert [r.viewid for r in ds.train] == [0, 3, 7, 3]
  assert [r.camid for r in ds.train] == [0, 1, 3, 19]
  assert ds.num_train_pids == 2 and ds.id_map.orig_ids == (1, 3)  # 0004 lost its only image
  assert ds.num_train_views == 3 and ds.num_train_cams == 4
  assert [r.viewid for r in ds.query] == [1, 2]  # query labels come from the test file
  assert [r.viewid for r in ds.gallery] == [4, 5]
  assert ds.dropped == {"train": 1, "query": 0, "gallery": 1}
  assert "train: 1 images dropped (no viewpoint label)" in ds.summary()
  assert "gallery: 1 images dropped" in ds.summary()


def test_veri_keypoint_files(tmp_path):
  base = _veri(tmp_path)
  os.rename(base / "keypoint_train.txt", tmp_path / "kp_train.txt")
  with pytest.raises(FileNotFoundError, match="keypoint_train.txt"):
    reid.read_veri(str(tmp_path))
  ds = reid.read_veri(str(tmp_path), keypoint_train=str(tmp_path / "kp_train.txt"))
  assert len(ds.train) == 4
  _write(str(base / "keypoint_test.txt"), ["VeRi/image_test/x.jpg 1 2 front"])
  with pytest.raises(ValueError, match="keypoint_test.txt:1"):
    reid.read_veri(str(tmp_path), keypoint_train=str(tmp_path / "kp_train.txt"))


# ---------------------------------------------------------------------------------------------
# VehicleID


def _vehicleid(tmp_path):
  base = tmp_path / "VehicleID_V1.0"
  train = [("0001", 12), ("0002", 12), ("0003", 4), ("0004", 7), ("0005", 4)]
  test = [(f"1{i:03d}", 100 + i % 5) for i in range(23)]  # 5 ids, 4-5 images each
  _touch(base / "image", [n + ".jpg" for n, _ in train + test])
  _write(str(base / "train_test_split" / "train_list.txt"), [f"{n} {p}" for n, p in train])
  _write(str(base / "train_test_split" / "test_list_800.txt"), [f"{n} {p}" for n, p in test])
  return base, train, test


def test_vehicleid_train_and_trials(tmp_path):
  base, train, test = _vehicleid(tmp_path)
  ds = build_reid_dataset("VehicleID", str(tmp_path), test_size=800, check_counts=False)
  # Train grouped by sorted id, file order within an id, labels in sorted id order.
  assert _basenames(ds.train) == ["0003.jpg", "0005.jpg", "0004.jpg", "0001.jpg", "0002.jpg"]
  assert [r.pid for r in ds.train] == [0, 0, 1, 2, 2]
  assert ds.id_map.orig_ids == (4, 7, 12)
  assert {r.camid for r in ds.train} == {0}
  trials = reid.vehicleid_trials(str(tmp_path), 800, seed=3, check_counts=False)
  assert len(trials) == 10
  all_test = sorted(str(base / "image" / (n + ".jpg")) for n, _ in test)
  galleries = set()
  for query, gallery in trials:
    assert sorted(r.pid for r in gallery) == [100, 101, 102, 103, 104]  # one per id
    assert sorted(r.path for r in query + gallery) == all_test
    assert {r.camid for r in query} == {0} and {r.camid for r in gallery} == {1}
    galleries.add(tuple(r.path for r in gallery))
  assert len(galleries) > 5  # trials draw different galleries
  assert reid.vehicleid_trials(str(tmp_path), 800, seed=3, check_counts=False) == trials
  ds3 = reid.read_vehicleid(str(tmp_path), seed=3, trial=4, check_counts=False)
  assert (ds3.query, ds3.gallery) == trials[4]


def test_vehicleid_bad_inputs(tmp_path):
  base, _, _ = _vehicleid(tmp_path)
  with pytest.raises(ValueError, match=r"train_list.txt should list 13164"):
    reid.read_vehicleid(str(tmp_path))
  with pytest.raises(ValueError, match="test_size"):
    reid.read_vehicleid(str(tmp_path), test_size=700, check_counts=False)
  with pytest.raises(FileNotFoundError, match="test_list_1600.txt"):
    reid.read_vehicleid(str(tmp_path), test_size=1600, check_counts=False)
  _write(str(base / "train_test_split" / "train_list.txt"), ["0001 12", "0002"])
  with pytest.raises(ValueError, match=r"train_list.txt:2"):
    reid.read_vehicleid(str(tmp_path), check_counts=False)


# ---------------------------------------------------------------------------------------------
# Generic


def test_generic_folders(tmp_path):
  _touch(tmp_path / "train" / "17", ["3_a.jpg", "3_b.png", "5_c.jpg"])
  _touch(tmp_path / "train" / "4", ["c1_a.jpg"])
  _touch(tmp_path / "query" / "100", ["1_q.jpg"])
  _touch(tmp_path / "gallery" / "100", ["9_g.jpg"])
  _touch(tmp_path / "gallery" / "200", ["3_g.jpg"])
  ds = build_reid_dataset("generic", str(tmp_path))
  assert ds.id_map.orig_ids == (4, 17)
  assert [r.pid for r in ds.train] == [1, 1, 1, 0]  # folders listed in name order: '17' < '4'
  # Cameras {1, 3, 5, 9} relabelled over all splits.
  assert [r.camid for r in ds.train] == [1, 1, 2, 0]
  assert [r.camid for r in ds.query + ds.gallery] == [0, 3, 1]
  assert [r.pid for r in ds.gallery] == [100, 200]
  assert all(r.viewid == -1 for r in ds.train) and not ds.has_views
  _touch(tmp_path / "query" / "100", ["noprefix.jpg"])
  with pytest.raises(ValueError, match="noprefix.jpg"):
    build_reid_dataset("generic", str(tmp_path))
  os.remove(tmp_path / "query" / "100" / "noprefix.jpg")
  _touch(tmp_path / "query" / "alice", ["1_q.jpg"])
  with pytest.raises(ValueError, match="alice"):
    build_reid_dataset("generic", str(tmp_path))


def test_generic_lists(tmp_path):
  _write(str(tmp_path / "train.txt"), ["# path pid camid viewid", "imgs/a.jpg 5 0 2",
                                       "imgs/b.jpg 5 1 0", "", "imgs/c.jpg 9 1 1"])
  _write(str(tmp_path / "query.txt"), ["imgs/q.jpg 5 0"])
  _write(str(tmp_path / "gallery.txt"), ["imgs/g.jpg 5 2", "imgs/h.jpg 11 1"])
  ds = reid.read_generic(str(tmp_path))
  assert [r.pid for r in ds.train] == [0, 0, 1] and ds.id_map.orig_ids == (5, 9)
  assert [r.viewid for r in ds.train] == [2, 0, 1] and ds.has_views and ds.num_train_views == 3
  assert ds.train[0].path == str(tmp_path / "imgs" / "a.jpg")
  assert [r.camid for r in ds.gallery] == [2, 1] and ds.query[0].viewid == -1
  _write(str(tmp_path / "gallery.txt"), ["imgs/g.jpg 5"])
  with pytest.raises(ValueError, match=r"gallery.txt:1"):
    reid.read_generic(str(tmp_path))
  os.remove(tmp_path / "gallery.txt")
  with pytest.raises(FileNotFoundError, match="gallery.txt"):
    reid.read_generic(str(tmp_path))


def test_generic_missing_splits(tmp_path):
  (tmp_path / "train").mkdir()
  with pytest.raises(FileNotFoundError, match="query"):
    reid.read_generic(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Identity map and the identity-count check


def test_identity_map_and_check(tmp_path):
  m = IdentityMap.from_ids([15, 2, 7, 2])
  assert m.orig_ids == (2, 7, 15) and m.num_ids == 3 and len(m) == 3
  assert m.label(7) == 1 and m.orig(2) == 15
  assert IdentityMap.from_json(m.to_json()) == m
  with pytest.raises(KeyError, match="99"):
    m.label(99)
  _market(tmp_path)
  ds = reid.read_market1501(str(tmp_path))
  check_num_ids(3, ds)
  check_num_ids(3, ds.id_map)
  with pytest.raises(ValueError, match=r"checkpoint has 751 identities.*'market1501' has 3"):
    check_num_ids(751, ds)
  with pytest.raises(ValueError, match="stage 1 must be rerun"):
    check_num_ids(2, 3)


# ---------------------------------------------------------------------------------------------
# Samplers


def _skewed_pids(num_ids=40, seed=0):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 15, num_ids)
  pids = np.repeat(np.arange(num_ids) * 3 + 1, counts)  # non-contiguous ids
  return pids[rng.permutation(len(pids))], counts


@pytest.mark.parametrize("bs,k", [(16, 4), (64, 4), (24, 8)])
def test_identity_sampler_invariants(bs, k):
  pids, counts = _skewed_pids(num_ids=60)
  s = IdentitySampler(pids, batch_size=bs, num_instances=k, seed=1)
  assert s.max_len == sum(max(c, k) - max(c, k) % k for c in counts)
  p = bs // k
  for epoch in range(3):
    idx = s.epoch_indices(epoch)
    assert idx.dtype == np.int64 and len(idx) % bs == 0 and 0 < len(idx) <= s.max_len
    for b in idx.reshape(-1, bs):
      groups = b.reshape(p, k)
      ids = pids[groups]
      assert (ids == ids[:, :1]).all()  # each group of K is one identity
      assert len(set(ids[:, 0])) == p  # P distinct identities per batch
    # No image twice in an epoch, except ids with fewer than K images (sampled with replacement).
    c = collections.Counter(idx.tolist())
    for i, n in c.items():
      assert n == 1 or counts[(pids[i] - 1) // 3] < k
    np.testing.assert_array_equal(idx, s.epoch_indices(epoch))
  assert not np.array_equal(s.epoch_indices(0), s.epoch_indices(1))
  other = IdentitySampler(pids, bs, k, seed=2)
  assert not np.array_equal(s.epoch_indices(0), other.epoch_indices(0))


def test_identity_sampler_length_when_every_id_has_one_chunk():
  pids = np.repeat(np.arange(50), 5)  # 5 images, K=4: one chunk each, one image left over
  s = IdentitySampler(pids, batch_size=16, num_instances=4, seed=0)
  assert s.max_len == 200
  for e in range(3):
    assert len(s.epoch_indices(e)) == (50 // 4) * 16
  with pytest.raises(ValueError, match="multiple"):
    IdentitySampler(pids, batch_size=18, num_instances=4)
  with pytest.raises(ValueError, match="at least 16 identities"):
    IdentitySampler(np.arange(10), batch_size=64, num_instances=4)


def _reference_logic_epoch(pids, bs, k, rnd: random.Random):
  """The reference sampler's per-epoch algorithm, restated with Python's `random`."""
  index = collections.defaultdict(list)
  for i, p in enumerate(pids):
    index[int(p)].append(i)
  chunks = {}
  for p, idxs in index.items():
    idxs = list(idxs) if len(idxs) >= k else [rnd.choice(idxs) for _ in range(k)]
    rnd.shuffle(idxs)
    chunks[p] = [idxs[j:j + k] for j in range(0, len(idxs) - k + 1, k)]
  avail, out = list(index), []
  while len(avail) >= bs // k:
    for p in rnd.sample(avail, bs // k):
      out.extend(chunks[p].pop(0))
      if not chunks[p]:
        avail.remove(p)
  return out


def test_identity_sampler_matches_reference_distribution():
  pids, counts = _skewed_pids(num_ids=80, seed=5)
  bs, k, epochs = 32, 4, 150
  s = IdentitySampler(pids, bs, k, seed=0)
  rnd = random.Random(0)
  ours_len, ref_len = [], []
  ours_use, ref_use = np.zeros(len(pids)), np.zeros(len(pids))
  for e in range(epochs):
    a = s.epoch_indices(e)
    b = np.asarray(_reference_logic_epoch(pids, bs, k, rnd))
    ours_len.append(len(a))
    ref_len.append(len(b))
    np.add.at(ours_use, a, 1)
    np.add.at(ref_use, b, 1)
  # Epoch length: same mean and spread.
  assert abs(np.mean(ours_len) - np.mean(ref_len)) < 0.02 * np.mean(ref_len)
  assert abs(np.std(ours_len) - np.std(ref_len)) < 0.5 * np.std(ref_len) + bs
  # How often each identity is used per epoch.
  ids = (pids - 1) // 3
  per_id = lambda use: np.bincount(ids, weights=use, minlength=len(counts)) / epochs
  o, r = per_id(ours_use), per_id(ref_use)
  assert np.corrcoef(o, r)[0, 1] > 0.98
  assert np.abs(o - r).max() < 0.15 * r.max()


def test_random_sampler():
  s = RandomSampler(100, seed=0)
  a = s.epoch_indices(0)
  assert sorted(a.tolist()) == list(range(100))
  np.testing.assert_array_equal(a, s.epoch_indices(0))
  assert not np.array_equal(a, s.epoch_indices(1))
  w = RandomSampler(100, seed=0, wrap_to=32).epoch_indices(0)
  assert len(w) == 128 and set(w.tolist()) == set(range(100))
  np.testing.assert_array_equal(w[:100], a)
  np.testing.assert_array_equal(w[100:], a[:28])
  assert len(RandomSampler(96, wrap_to=32).epoch_indices(3)) == 96


def test_sampler_and_decode_through_the_loader(tmp_path):
  loader_mod = pytest.importorskip("jaxprompt.data.loader")
  from jaxprompt.clipreid.transforms import make_reid_decode
  for pid in range(6):
    _touch(tmp_path / "train" / str(pid), [f"{pid % 3}_{j}.jpg" for j in range(3)])
  _touch(tmp_path / "query" / "0", ["0_q.jpg"])
  _touch(tmp_path / "gallery" / "0", ["1_g.jpg"])
  ds = reid.read_generic(str(tmp_path))
  sampler = IdentitySampler(ds.train_pids(), batch_size=8, num_instances=2, seed=0)
  loader = loader_mod.Loader(ds.train, make_reid_decode(True, size=(32, 16)), sampler, 8,
                             seed=0, process_index=0, process_count=1)
  batches = list(loader.iterate(0))
  assert len(batches) == loader.steps_per_epoch(0) > 0
  for b in batches:
    assert b["image"].shape == (8, 32, 16, 3) and b["image"].dtype == np.float32
    assert b["pid"].shape == (8,) and len(set(b["pid"].tolist())) == 4
    assert (b["pid"].reshape(4, 2) == b["pid"].reshape(4, 2)[:, :1]).all()
  again = list(loader.iterate(0))
  np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])
