"""CoOp data: split-file / ImageNet / variant / folder readers on files the tests write,
Dassl-identical few-shot picks, the base/new split, and the transforms against torchvision."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from jaxprompt.coop import data as D


def _img(path, w=40, h=30, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rs = np.random.RandomState(seed)
  Image.fromarray(rs.randint(0, 255, (h, w, 3), np.uint8)).save(path)


def _split_dataset(root, n_classes=5, per_class=6):
  base = os.path.join(root, "oxford_pets")
  rows = {"train": [], "val": [], "test": []}
  k = 0
  for c in range(n_classes):
    for i in range(per_class):
      for split in rows:
        rel = f"{split}_{c}_{i}.jpg"
        rows[split].append([rel, c, f"breed_{c}"])
        _img(os.path.join(base, "images", rel), seed=k)
        k += 1
  # Interleave classes so first-appearance order differs from label order.
  for split in rows:
    rows[split] = sorted(rows[split], key=lambda r: (int(r[0][:-4].split("_")[2]), -r[1]))
  with open(os.path.join(base, "split_zhou_OxfordPets.json"), "w") as f:
    json.dump(rows, f)
  return rows


def test_split_json_and_fewshot_match_dassl(tmp_path):
  rows = _split_dataset(str(tmp_path))
  s = D.build("oxford_pets", str(tmp_path), shots=2, seed=3)
  # The reference: set_random_seed(seed), then generate_fewshot_dataset(train, K) and
  # generate_fewshot_dataset(val, min(K, 4)) with the module-level random.sample per class,
  # classes in first-appearance order (here 4, 3, 2, 1, 0).
  random.seed(3)
  expect = {}
  for split, k in (("train", 2), ("val", 2)):
    groups = {}
    for r in rows[split]:
      groups.setdefault(r[1], []).append(r[0])
    expect[split] = [p for g in groups.values() for p in random.sample(g, k)]
  assert [os.path.basename(d.impath) for d in s.train] == expect["train"]
  assert [os.path.basename(d.impath) for d in s.val] == expect["val"]
  assert [d.label for d in s.train][:2] == [4, 4]
  assert len(s.test) == 30 and s.classnames == [f"breed_{c}" for c in range(5)]
  # Same seed, same picks; another seed, other picks.
  assert D.build("oxford_pets", str(tmp_path), shots=2, seed=3).train == s.train
  assert D.build("oxford_pets", str(tmp_path), shots=2, seed=1).train != s.train


def test_fewshot_hand_worked():
  """Two classes, appearing b then a; 1 shot each from one seeded stream."""
  items = [D.Datum(f"{n}", lab, "x") for n, lab in
           [("b0", 1), ("a0", 0), ("b1", 1), ("a1", 0), ("a2", 0)]]
  r = random.Random(0)
  # One stream: class b's draw, then class a's continues it.
  first = random.Random(0)
  i = first.sample([0, 1], 1)[0]
  j = first.sample([0, 1, 2], 1)[0]
  got = D.fewshot(items, 1, r)
  assert [d.impath for d in got] == [["b0", "b1"][i], ["a0", "a1", "a2"][j]]
  assert D.fewshot(items, 4, random.Random(0)) == [items[0], items[2], items[1], items[3],
                                                  items[4]]  # fewer than K: all kept


@pytest.mark.parametrize("n,base", [(37, 19), (397, 199), (101, 51), (10, 5), (47, 24)])
def test_base_new_counts(n, base):
  items = [D.Datum(str(i), i, f"c{i}") for i in reversed(range(n))]
  b, = D.subsample_classes(items, subsample="base")
  nw, = D.subsample_classes(items, subsample="new")
  assert len({d.label for d in b}) == base and len({d.label for d in nw}) == n - base
  assert sorted(d.label for d in b) == list(range(base))
  assert sorted(d.label for d in nw) == list(range(n - base))
  assert {d.classname for d in nw} == {f"c{i}" for i in range(base, n)}


def test_base_new_after_fewshot(tmp_path):
  _split_dataset(str(tmp_path))
  full = D.build("oxford_pets", str(tmp_path), shots=2, seed=2)
  base = D.build("oxford_pets", str(tmp_path), shots=2, seed=2, subsample="base")
  new = D.build("oxford_pets", str(tmp_path), shots=2, seed=2, subsample="new")
  assert base.classnames == full.classnames[:3] and new.classnames == full.classnames[3:]
  # The base images are those of the all-class run with the same seed.
  assert [d.impath for d in base.train] == [d.impath for d in full.train if d.label < 3]
  assert [d.label for d in new.test] == [d.label - 3 for d in full.test if d.label >= 3]


def test_imagenet_and_variants(tmp_path):
  root = str(tmp_path)
  wnids = ["n03", "n01", "n02"]
  with open(os.path.join(root, "classnames.txt"), "w") as f:
    f.write("n01 tench\nn02 goldfish\nn03 great white shark\n")
  os.makedirs(os.path.join(root, "imagenet"))
  os.replace(os.path.join(root, "classnames.txt"), os.path.join(root, "imagenet", "classnames.txt"))
  for split in ("train", "val"):
    for w in wnids:
      for i in range(3):
        _img(os.path.join(root, "imagenet", "images", split, w, f"{i}.jpg"))
  s = D.build("imagenet", root, shots=2, seed=1)
  assert s.classnames == ["tench", "goldfish", "great white shark"]
  assert len(s.train) == 6 and len(s.test) == 9
  assert {d.label for d in s.train if "n02" in d.impath} == {1}
  for i in range(3):
    _img(os.path.join(root, "imagenetv2", "imagenetv2-matched-frequency-format-val", str(i),
                      "a.jpg"))
    _img(os.path.join(root, "imagenet-sketch", "images", f"n0{i + 1}", "a.jpg"))
  for w in ("n03", "n01"):  # A/R: their own subset of wnids, labels by sorted wnid
    _img(os.path.join(root, "imagenet-adversarial", "imagenet-a", w, "a.jpg"))
  v2 = D.build("imagenetv2", root)
  assert v2.classnames == s.classnames and [d.label for d in v2.test] == [0, 1, 2]
  a = D.build("imagenet_a", root)
  assert a.classnames == ["tench", "great white shark"]
  assert [(os.path.basename(os.path.dirname(d.impath)), d.label) for d in a.test] == [
      ("n01", 0), ("n03", 1)]
  assert D.build("imagenet_sketch", root).classnames == s.classnames


def test_folder_reader_and_errors(tmp_path):
  for c in ("zebra", "ant"):
    for i in range(2):
      _img(os.path.join(tmp_path, "mine", c, f"{i}.png"))
  s = D.build("folder", os.path.join(tmp_path, "mine"), shots=1, seed=1)
  assert s.classnames == ["ant", "zebra"] and len(s.train) == 2 and len(s.test) == 4
  with pytest.raises(ValueError, match="unknown dataset"):
    D.build("cifar", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="split_zhou_DescribableTextures.json"):
    D.build("dtd", str(tmp_path))
  bad = tmp_path / "split.json"
  bad.write_text(json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}))
  with pytest.raises(ValueError, match=r"train\[0\]"):
    D.read_split_json(str(bad), str(tmp_path))


def test_transforms_match_torchvision(tmp_path):
  tvt = pytest.importorskip("torchvision.transforms")
  torch = pytest.importorskip("torch")
  img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 257, 3), np.uint8))
  ref = tvt.Compose([tvt.Resize(224, interpolation=tvt.InterpolationMode.BICUBIC),
                     tvt.CenterCrop(224), tvt.ToTensor(), tvt.Normalize(D.CLIP_MEAN, D.CLIP_STD)])
  np.testing.assert_allclose(D.test_transform(img), ref(img).numpy().transpose(1, 2, 0), atol=1e-5)
  # The same crop box through torchvision's resized_crop gives the same pixels.
  rng = np.random.default_rng(0)
  top, left, h, w = D.random_resized_crop_box(np.random.default_rng(0), *img.size)
  x = D.train_transform(img, rng)
  crop = tvt.functional.resized_crop(img, top, left, h, w, [224, 224],
                                     tvt.InterpolationMode.BICUBIC)
  y = tvt.Normalize(D.CLIP_MEAN, D.CLIP_STD)(tvt.ToTensor()(crop)).numpy().transpose(1, 2, 0)
  assert x.shape == (224, 224, 3)
  assert np.allclose(x, y, atol=1e-5) or np.allclose(x, y[:, ::-1], atol=1e-5)
  del torch
  # Crop areas follow scale (0.08, 1).
  areas = [np.prod(D.random_resized_crop_box(np.random.default_rng(s), 200, 200)[2:]) / 4e4
           for s in range(200)]
  assert 0.07 < min(areas) and max(areas) <= 1.0
