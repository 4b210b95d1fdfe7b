"""Long-tail evaluation, datasets and samplers (tiny files written by the tests)."""
from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from jaxprompt.lpt import data as lt
from jaxprompt.lpt import samplers as ls
from jaxprompt.lpt import evaluate as ev

# ----------------------------------------------------------------------------- evaluation

BOUNDARY_COUNTS = np.array([19, 20, 21, 100, 101])


def _boundary_case():
  # class c has 4 test images of which c are predicted correctly
  labels = np.repeat(np.arange(5), 4)
  preds = labels.copy()
  for c in range(5):
    wrong = 4 - c
    preds[c * 4:c * 4 + wrong] = (c + 1) % 5
  return preds, labels


def test_shot_buckets_at_boundaries():
  lpt_b = ev.shot_buckets(BOUNDARY_COUNTS, "lpt")
  oltr_b = ev.shot_buckets(BOUNDARY_COUNTS, "oltr")
  assert lpt_b["few"].tolist() == [True, True, False, False, False]
  assert lpt_b["medium"].tolist() == [False, False, True, True, False]
  assert lpt_b["many"].tolist() == [False, False, False, False, True]
  assert oltr_b["few"].tolist() == [True, False, False, False, False]
  assert oltr_b["medium"].tolist() == [False, True, True, True, False]
  assert oltr_b["many"].tolist() == [False, False, False, False, True]


def test_shot_accuracy_boundaries_both_conventions():
  preds, labels = _boundary_case()  # per-class accuracy 0, .25, .5, .75, 1
  r = ev.shot_accuracy(preds, labels, BOUNDARY_COUNTS, "lpt")
  assert r == pytest.approx({"overall": 0.5, "few": 1 / 8, "medium": 5 / 8, "many": 1.0})
  r = ev.shot_accuracy(preds, labels, BOUNDARY_COUNTS, convention="oltr")
  assert r == pytest.approx({"overall": 0.5, "few": 0.0, "medium": 0.5, "many": 1.0})
  # (N, C) scores are reduced by argmax
  scores = np.eye(5)[preds]
  assert ev.shot_accuracy(scores, labels, BOUNDARY_COUNTS)["medium"] == pytest.approx(5 / 8)


def test_shot_accuracy_is_micro_within_bucket():
  # two medium classes: 1/1 correct and 0/3 correct -> micro 1/4 (per-class mean would be 1/2)
  counts = np.array([50, 60])
  labels = np.array([0, 1, 1, 1])
  preds = np.array([0, 0, 0, 0])
  assert ev.shot_accuracy(preds, labels, counts)["medium"] == pytest.approx(0.25)


def test_empty_bucket_is_nan():
  r = ev.shot_accuracy([0, 1], [0, 1], [500, 300])
  assert r["many"] == 1.0 and math.isnan(r["medium"]) and math.isnan(r["few"])


def test_bad_inputs():
  with pytest.raises(ValueError, match="length mismatch"):
    ev.shot_accuracy([0, 1, 1], [0, 1], [5, 5])
  with pytest.raises(ValueError, match=r"labels\[1\] = 2 is outside"):
    ev.shot_accuracy([0, 1], [0, 2], [5, 5])
  with pytest.raises(ValueError, match="outside"):
    ev.shot_accuracy([0, 1], [-1, 1], [5, 5])
  with pytest.raises(ValueError, match="predictions"):
    ev.shot_accuracy([0, 7], [0, 1], [5, 5])
  with pytest.raises(ValueError, match="convention"):
    ev.shot_accuracy([0], [0], [5, 5], convention="foo")


def test_cifar_lt_shot_groups():
  for ratio, lpt_groups, oltr_groups in [(100, (35, 34, 31), (35, 35, 30)),
                                         (50, (41, 40, 19), (41, 41, 18)),
                                         (200, (30, 30, 40), (30, 31, 39)),
                                         (10, (69, 31, 0), (69, 31, 0))]:
    counts = np.array(lt.cifar_lt_img_num_per_cls(ratio))
    for conv, groups in (("lpt", lpt_groups), ("oltr", oltr_groups)):
      b = ev.shot_buckets(counts, conv)
      assert (b["many"].sum(), b["medium"].sum(), b["few"].sum()) == groups


def test_plots(tmp_path):
  preds, labels = _boundary_case()
  order = ev.plot_per_class_accuracy(preds, labels, BOUNDARY_COUNTS, tmp_path / "pc.png")
  assert order.tolist() == [4, 3, 2, 1, 0]
  r = ev.shot_accuracy(preds, labels, BOUNDARY_COUNTS)
  ev.plot_bucket_accuracy(r, tmp_path / "b1.png")
  ev.plot_bucket_accuracy({"a": r, "b": r}, tmp_path / "b2.png", title="t")
  for f in ("pc.png", "b1.png", "b2.png"):
    assert (tmp_path / f).stat().st_size > 1000
  np.testing.assert_allclose(ev.per_class_accuracy(preds, labels, 6),
                             [0, .25, .5, .75, 1, np.nan])


# ----------------------------------------------------------------------------- CIFAR-100-LT


@pytest.mark.parametrize("ratio,total,smallest", [(200, 9502, 2), (100, 10847, 5),
                                                   (50, 12608, 10), (10, 19573, 50)])
def test_cifar_lt_counts(ratio, total, smallest):
  counts = lt.cifar_lt_img_num_per_cls(ratio)
  assert sum(counts) == total and counts[0] == 500 and counts[-1] == smallest
  assert all(a >= b for a, b in zip(counts, counts[1:]))
  # selection on a full-size label vector (original order is not sorted by class)
  labels = np.random.default_rng(7).permutation(np.repeat(np.arange(100), 500))
  idx = lt.cifar_lt_select(labels, ratio)
  assert idx.size == total and np.unique(idx).size == total
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=100), counts)


def test_cifar_lt_select_uses_seeded_per_class_shuffle():
  labels = np.random.default_rng(1).permutation(np.repeat(np.arange(100), 500))
  idx = lt.cifar_lt_select(labels, 100, seed=42)
  rs = np.random.RandomState(42)  # the reference: np.random.seed(42), then shuffle per class
  expected = []
  for c, n in zip(range(100), lt.cifar_lt_img_num_per_cls(100)):
    cls_idx = np.where(labels == c)[0]
    rs.shuffle(cls_idx)
    expected.append(cls_idx[:n])
  np.testing.assert_array_equal(idx, np.concatenate(expected))
  assert not np.array_equal(idx, lt.cifar_lt_select(labels, 100, seed=0))


def _write_fake_cifar(root, per_class=10, test_per_class=2):
  folder = root / "cifar-100-python"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for split, n in (("train", per_class), ("test", test_per_class)):
    labels = rng.permutation(np.repeat(np.arange(100), n))
    data = np.zeros((labels.size, 3072), np.uint8)
    data[:, 0] = labels            # red channel, pixel (0, 0)
    data[:, 1024] = 255 - labels   # green channel, pixel (0, 0)
    entry = {"data": data, "fine_labels": labels.tolist(),
             "coarse_labels": (labels // 5).tolist(),
             "filenames": [f"img_{i}.png" for i in range(labels.size)]}
    with open(folder / split, "wb") as f:
      pickle.dump(entry, f)
  with open(folder / "meta", "wb") as f:
    pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)


def test_cifar100_lt_from_python_files(tmp_path):
  _write_fake_cifar(tmp_path)
  images, labels, names = lt.read_cifar100_python(tmp_path, "train")
  assert images.shape == (1000, 32, 32, 3) and names[3] == "class3"
  np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
  np.testing.assert_array_equal(images[:, 0, 0, 1], 255 - labels)
  ds = lt.load_cifar100_lt(tmp_path, 10)
  expected = lt.cifar_lt_img_num_per_cls(10, img_max=10.0)
  np.testing.assert_array_equal(ds.class_counts(), expected)
  assert all(int(r.image[0, 0, 0]) == r.label for r in ds.records)
  np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(100), expected))
  test = lt.load_cifar100_lt(tmp_path / "cifar-100-python", 10, "test")
  assert len(test) == 200 and test.class_counts().tolist() == [2] * 100
  with pytest.raises(FileNotFoundError, match="cifar"):
    lt.load_cifar100_lt(tmp_path / "nowhere", 10)


def test_cifar100_tfds_restores_original_order(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  _write_fake_cifar(tmp_path)
  images, labels, _ = lt.read_cifar100_python(tmp_path, "train")
  perm = np.random.default_rng(5).permutation(labels.size)  # TFDS stores shuffled
  fake = [{"id": f"train_{i:05d}".encode(), "image": images[i], "label": labels[i],
           "coarse_label": labels[i] // 5} for i in perm]
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: fake)
  ds_tfds = lt.load_cifar100_lt(None, 10, source="tfds")
  ds_py = lt.load_cifar100_lt(tmp_path, 10)
  assert [r.label for r in ds_tfds.records] == [r.label for r in ds_py.records]
  assert all(np.array_equal(a.image, b.image) for a, b in zip(ds_tfds.records, ds_py.records))


# ----------------------------------------------------------------------------- Places-LT / iNat


def _img(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((6, 5, 3), 120, np.uint8)).save(path)


def test_places_lt_lists(tmp_path):
  root = tmp_path / "places365_standard"
  rel = ["train/airfield/00000001.jpg", "train/airfield/00000002.jpg",
         "train/zen_garden/00000003.jpg", "val/zen_garden/Places365_val_00000001.jpg"]
  for r in rel:
    _img(root / r)
  (root / "Places_LT_train.txt").write_text(
      f"{rel[0]} 0\n{rel[1]} 0\n{rel[2]} 364\n\n")
  (root / "Places_LT_test.txt").write_text(f"{rel[3]} 364\n")
  ds = lt.load_places_lt(root, "train")
  assert len(ds) == 3 and ds.num_classes == 365
  assert ds.records[2] == lt.LTRecord(os.path.join(root, rel[2]), 364)
  counts = ds.class_counts()
  assert counts[0] == 2 and counts[364] == 1 and counts.sum() == 3
  assert lt.load_image(ds.records[0]).shape == (6, 5, 3)
  assert len(lt.load_places_lt(root, "test")) == 1

  lists = tmp_path / "lists"
  lists.mkdir()
  (lists / "Places_LT_train.txt").write_text(f"{rel[0]} 0\n{rel[1]} 0\nbroken_line_without_label\n")
  with pytest.raises(ValueError, match=r"Places_LT_train.txt:3"):
    lt.load_places_lt(root, "train", lists_dir=lists)
  (lists / "Places_LT_train.txt").write_text(f"{rel[0]} zero\n")
  with pytest.raises(ValueError, match=r"Places_LT_train.txt:1: label 'zero'"):
    lt.load_places_lt(root, "train", lists_dir=lists)
  (lists / "Places_LT_train.txt").write_text(f"{rel[0]} 365\n")
  with pytest.raises(ValueError, match=r"Places_LT_train.txt:1: label 365"):
    lt.load_places_lt(root, "train", lists_dir=lists)
  (lists / "Places_LT_train.txt").write_text(f"{rel[0]} 0\ntrain/airfield/missing.jpg 0\n")
  with pytest.raises(FileNotFoundError, match=r"Places_LT_train.txt:2: .*missing.jpg"):
    lt.load_places_lt(root, "train", lists_dir=lists)
  assert len(lt.load_places_lt(root, "train", lists_dir=lists, check_files=False)) == 2
  with pytest.raises(FileNotFoundError, match="Places_LT_val.txt"):
    lt.load_places_lt(root, "val")


def test_inat2018_json_and_list(tmp_path):
  root = tmp_path / "inat"
  files = [f"train_val2018/Plantae/{c}/{i}.jpg" for i, c in enumerate([2, 0, 2, 1, 2])]
  for f in files:
    _img(root / f)
  ann = {
      "info": {}, "licenses": [],
      "categories": [{"id": i, "name": f"sp{i}", "supercategory": "Plantae"} for i in (2, 0, 1)],
      "images": [{"id": 100 + i, "file_name": f, "width": 5, "height": 6}
                 for i, f in enumerate(files)],
      "annotations": [{"id": i, "image_id": 100 + i, "category_id": c}
                      for i, c in reversed(list(enumerate([2, 0, 2, 1, 2])))],
  }
  (root / "train2018.json").write_text(json.dumps(ann))
  ds = lt.load_inat2018_json(root / "train2018.json", root)
  assert ds.num_classes == 3 and ds.class_names == ("sp0", "sp1", "sp2")
  assert ds.labels.tolist() == [2, 0, 2, 1, 2]
  assert ds.class_counts().tolist() == [1, 1, 3]
  assert ds.records[0].image == os.path.join(root, files[0])

  bad = dict(ann, annotations=ann["annotations"][1:])
  (root / "bad.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="no annotation"):
    lt.load_inat2018_json(root / "bad.json", root)
  (root / "nokey.json").write_text(json.dumps({"images": []}))
  with pytest.raises(ValueError, match="annotations"):
    lt.load_inat2018_json(root / "nokey.json", root)

  (root / "iNaturalist18_train.txt").write_text(
      "".join(f"{f} {c}\n" for f, c in zip(files, [2, 0, 2, 1, 2])))
  ds_txt = lt.load_inat2018_list(root / "iNaturalist18_train.txt", root)
  assert ds_txt.num_classes == 8142 and ds_txt.labels.tolist() == [2, 0, 2, 1, 2]


def test_class_counts_validation():
  assert lt.class_counts([lt.LTRecord("a", 1), lt.LTRecord("b", 1)], 3).tolist() == [0, 2, 0]
  with pytest.raises(ValueError):
    lt.class_counts([lt.LTRecord("a", 3)], 3)


# ----------------------------------------------------------------------------- samplers


def _lt_labels(ratio=100):
  return np.repeat(np.arange(100), lt.cifar_lt_img_num_per_cls(ratio))


def test_class_aware_sampler_balance():
  labels = _lt_labels()
  steps = ls.lpt_steps_per_epoch(labels.size, 256)
  assert steps == 43  # floor(10847 / 256) + 1
  s = ls.ClassAwareSampler(labels, num_samples_cls=4, seed=42, num_samples=steps * 256)
  idx = s.epoch_indices(0)
  assert idx.shape == (steps * 256,) and idx.min() >= 0 and idx.max() < labels.size
  groups = labels[idx].reshape(-1, 4)
  assert np.all(groups == groups[:, :1])  # 4 consecutive images per class visit
  visits = np.bincount(groups[:, 0], minlength=100)
  assert visits.max() - visits.min() <= 1  # classes cycle in passes
  # a batch of 256 spans 64 visits inside (at most) two class passes of 100
  per_batch = [np.unique(b).size for b in labels[idx].reshape(-1, 256)]
  assert min(per_batch) >= 28 and np.mean(per_batch) > 55
  # within a class, images cycle without repeats before the class's pass is exhausted
  for c in (0, 99):  # 500 images, 5 images
    drawn = idx[labels[idx] == c]
    n = (labels == c).sum()
    for start in range(0, drawn.size - n + 1, n):
      assert np.unique(drawn[start:start + n]).size == n
  # uniform over classes, unlike the data (500 vs 5 images)
  assert abs(np.bincount(labels[idx], minlength=100)[0] -
             np.bincount(labels[idx], minlength=100)[99]) <= 4
  np.testing.assert_array_equal(idx, s.epoch_indices(0))
  assert not np.array_equal(idx, s.epoch_indices(1))
  assert len(ls.ClassAwareSampler(labels)) == 500 * 100  # reference nominal length


def test_instance_balanced_and_dual():
  labels = _lt_labels()
  dual = ls.DualSampler(labels, batch_size=256, total_epochs=90, seed=3)
  steps = list(dual.epoch(0))
  assert len(steps) == 43
  for st in steps:
    assert st.cb.shape == st.ib.shape == (256,)
    assert np.unique(st.ib).size == 256  # no duplicates within an IB batch
    assert st.ib_weight == 0.5
  ib_all = np.concatenate([st.ib for st in steps])
  # IB draws follow the data distribution: class 0 holds 500/10847 of the images
  assert 0.025 < np.mean(labels[ib_all] == 0) < 0.07
  assert np.array_equal(np.concatenate([st.cb for st in steps]), dual.cb.epoch_indices(0))
  assert list(dual.epoch(89))[0].ib_weight == pytest.approx(0.5 / 90)
  with pytest.raises(ValueError):
    ls.InstanceBalancedSampler(10, 256, 1)
  assert ls.lpt_steps_per_epoch(62500, 256) == 245  # Places-LT
  assert ls.lpt_steps_per_epoch(437513, 256) == 1710  # iNaturalist 2018


def test_ib_loss_weight_schedule():
  assert ls.ib_loss_weight(0, 90) == 0.5
  assert ls.ib_loss_weight(45, 90) == pytest.approx(0.25)
  assert ls.ib_loss_weight(89, 90) == pytest.approx(0.5 / 90)
  assert ls.ib_loss_weight(90, 90) == 0.0 and ls.ib_loss_weight(120, 90) == 0.0
  assert ls.ib_loss_weight_at_step(245 * 45 + 7, 245, 90) == pytest.approx(0.25)
  import jax
  import jax.numpy as jnp
  w = jax.jit(lambda s: ls.ib_loss_weight_at_step(s, 245, 90))(jnp.int32(245 * 89))
  assert float(w) == pytest.approx(0.5 / 90)
