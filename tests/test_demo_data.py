"""The demo's self-built data (synthetic Market-1501, long-tailed digits) and ViT pretraining."""
from __future__ import annotations

import hashlib
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from jaxprompt.clipreid.data import read_market1501
from jaxprompt.demo import lt_data, pretrain, reid_data
from jaxprompt.lpt.evaluate import shot_buckets
from jaxprompt.convert.timm_vit import load_vit
from jaxprompt.models.vit import ViT

MARKET_NAME = re.compile(r"^(-1|\d{4})_c([1-6])s\d_\d{6}_\d{2}\.jpg$")
SMALL = dict(num_train_ids=8, num_test_ids=6, cams=4, images_per_id_cam=3, cams_per_id=(2, 3),
             num_distractors=4, num_junk=3)


def _tree_digest(base: str) -> dict[str, str]:
  out = {}
  for d in reid_data.SPLIT_DIRS.values():
    for n in sorted(os.listdir(os.path.join(base, d))):
      with open(os.path.join(base, d, n), "rb") as f:
        out[f"{d}/{n}"] = hashlib.sha1(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def market(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("market"))
  return root, reid_data.write_synthetic_market(root, seed=3, **SMALL)


def test_market_layout_and_read_back(market):
  root, base = market
  assert base == os.path.join(root, "Market-1501-v15.09.15")
  manifest = reid_data.read_manifest(root)
  counts = manifest["counts"]
  for d in ("bounding_box_train", "query", "bounding_box_test"):
    names = os.listdir(os.path.join(base, d))
    assert names and all(MARKET_NAME.match(n) for n in names), names[:5]
  with Image.open(os.path.join(base, "query", os.listdir(os.path.join(base, "query"))[0])) as im:
    assert im.format == "JPEG" and im.size == (32, 64) and im.mode == "RGB"

  for source in (root, base):  # the parent folder or the dataset folder
    ds = read_market1501(source)
    assert ds.num_train_pids == 8
    assert len(ds.train) == counts["train"] == sum(1 for _ in ds.train)
    assert len(ds.query) == counts["query"]
    # Junk (-1) is on disk but skipped by the reader; distractors (0) are kept in the gallery.
    assert len(ds.gallery) == counts["gallery"] + counts["distractors"]
  gallery_names = os.listdir(os.path.join(base, "bounding_box_test"))
  assert sum(n.startswith("-1_") for n in gallery_names) == 3
  assert sum(r.pid == 0 for r in ds.gallery) == 4
  assert not any(r.pid <= 0 for r in ds.query)

  test_ids = {r.pid for r in ds.query} | {r.pid for r in ds.gallery if r.pid > 0}
  assert len({r.pid for r in ds.query}) == 6 and len(test_ids) == 6
  assert not test_ids & {r.orig_pid for r in ds.train}
  assert sorted(test_ids) == manifest["test_ids"]
  assert sorted({r.orig_pid for r in ds.train}) == manifest["train_ids"]

  all_cams = {r.camid for split in (ds.train, ds.query, ds.gallery) for r in split}
  assert all_cams <= set(range(4)) and len(all_cams) >= 3
  # Each train identity is seen by 2..3 cameras with 3 images each.
  for pid in range(ds.num_train_pids):
    recs = [r for r in ds.train if r.pid == pid]
    cams = {r.camid for r in recs}
    assert 2 <= len(cams) <= 3 and len(recs) == 3 * len(cams)
  # Market's split: at most one query per identity and camera, and each query has a
  # cross-camera match in the gallery.
  q_keys = [(r.pid, r.camid) for r in ds.query]
  assert len(q_keys) == len(set(q_keys))
  for r in ds.query:
    assert any(g.pid == r.pid and g.camid != r.camid for g in ds.gallery)


def test_market_deterministic_and_cached(market, tmp_path):
  root, base = market
  again = reid_data.write_synthetic_market(str(tmp_path / "a"), seed=3, **SMALL)
  assert _tree_digest(again) == _tree_digest(base)
  other = reid_data.write_synthetic_market(str(tmp_path / "b"), seed=4, **SMALL)
  assert _tree_digest(other) != _tree_digest(base)
  # Same settings: returned as is; other settings: rebuilt in place.
  stamp = os.path.getmtime(os.path.join(again, reid_data.MANIFEST))
  assert reid_data.write_synthetic_market(str(tmp_path / "a"), seed=3, **SMALL) == again
  assert os.path.getmtime(os.path.join(again, reid_data.MANIFEST)) == stamp
  reid_data.write_synthetic_market(str(tmp_path / "a"), seed=4, **SMALL)
  assert _tree_digest(again) == _tree_digest(other)
  # A folder we did not write is never touched.
  os.makedirs(tmp_path / "c" / "Market-1501-v15.09.15")
  with pytest.raises(FileExistsError):
    reid_data.write_synthetic_market(str(tmp_path / "c"), **SMALL)
  with pytest.raises(ValueError):
    reid_data.write_synthetic_market(str(tmp_path / "d"), cams=7)


def test_digits_longtail_buckets_and_disjoint():
  s = lt_data.digits_longtail(imbalance=30, seed=0, size=16)
  counts = s.class_counts
  assert counts.tolist() == lt_data.longtail_counts(10, 150, 30)
  assert np.array_equal(s.train.class_counts(), counts)
  buckets = shot_buckets(counts, "lpt")
  assert all(buckets[b].sum() >= 2 for b in ("many", "medium", "few")), counts
  assert np.all(np.diff(counts) <= 0)
  assert np.array_equal(s.test.class_counts(), np.full(10, 20))
  assert not set(s.train_source.tolist()) & set(s.test_source.tolist())
  assert len(set(s.train_source.tolist())) == len(s.train)
  assert s.class_names[0] == "zero" and s.num_classes == 10 == s.train.num_classes
  img = s.train[0].image
  assert img.shape == (16, 16, 3) and img.dtype == np.uint8
  assert lt_data.digits_longtail(size=32, seed=0).test[0].image.shape == (32, 32, 3)
  again = lt_data.digits_longtail(imbalance=30, seed=0, size=16)
  assert all(np.array_equal(a.image, b.image) and a.label == b.label
             for a, b in zip(again.train.records, s.train.records))
  other = lt_data.digits_longtail(imbalance=30, seed=1, size=16)
  assert not np.array_equal(other.train_source, s.train_source)
  with pytest.raises(ValueError):
    lt_data.digits_longtail(max_per_class=170, test_per_class=20)


TINY = dict(steps=80, seed=0, width=32, depth=2, heads=2, patch=4, image_size=16, batch_size=32,
            learning_rate=5e-3, warmup_steps=8, log_every=16)


def test_pretrain_lowers_loss_and_saves_loadable(tmp_path):
  data = pretrain.GlyphData(num_classes=8, image_size=16, seed=0)
  out = str(tmp_path / "vit.npz")
  assert pretrain.pretrain_tiny_vit(out, data=data, **TINY) == out
  with open(pretrain.sidecar_path(out)) as f:
    meta = json.load(f)
  losses = [l for _, l in meta["losses"]]
  assert losses[-1] < losses[0] - 0.1, losses
  assert meta["eval_accuracy"] > 1.4 * meta["chance"], meta["eval_accuracy"]

  # load_vit reads the file (heads from the AugReg shapes) and gives the trained features:
  # the run is deterministic, so a second in-memory run holds the same parameters.
  model, variables = load_vit(out)
  assert model.img.config.heads == 2 and model.img.config.depth == 2
  ref = pretrain.pretrain_params(data=data, **TINY)
  x = pretrain.normalize(data.sample(np.random.default_rng(7), 4)[0])
  want = ViT(ref["config"]).apply({"params": ref["params"]["img"]}, x)
  got = model.apply(variables, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.asarray(got).std() > 0.1

  # The same settings are not trained again.
  stamp = os.path.getmtime(out)
  pretrain.pretrain_tiny_vit(out, data=data, **TINY)
  assert os.path.getmtime(out) == stamp
  assert jax.tree.structure(variables["params"]["img"]) == jax.tree.structure(
      ref["params"]["img"])
