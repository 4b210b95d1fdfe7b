"""Evaluating the authors' released checkpoints through the pipelines (`--stage eval`).

Tiny checkpoints in the authors' naming (see torch_fixtures) are saved as `.pth`,
evaluated by `clipreid.run` / `lpt.run` with `model.released_checkpoint`, and the
reported numbers are checked against features and predictions computed directly
from the converted params.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip.model")
pytest.importorskip("timm.models.vision_transformer")

import torch_fixtures  # noqa: E402
from test_clipreid_pipeline import TRAIN_IDS, make_market  # noqa: E402

from jaxprompt.clipreid import released as clipreid_ckpt
from jaxprompt.lpt import released as lpt_ckpt  # noqa: E402
from jaxprompt.clipreid import data as reid_data  # noqa: E402
from jaxprompt.clipreid import transforms  # noqa: E402
from jaxprompt.lpt import evaluate as lt_eval  # noqa: E402
from jaxprompt.clipreid import ranking as reid_eval  # noqa: E402
from jaxprompt.clipreid import model as clipreid_model  # noqa: E402
from jaxprompt.clipreid import train as clipreid
from jaxprompt.lpt import config as lpt_recipe
from jaxprompt.lpt import data as lpt_data
from jaxprompt.lpt import context as cls_common
from jaxprompt.lpt import train as lpt
from jaxprompt.lpt import baselines as vpt  # noqa: E402

# -- CLIP-ReID -----------------------------------------------------------------------------------

SIZE, STRIDE, NUM_CAMS = (64, 32), 12, 2  # make_market's train set: cameras 1 and 2


@pytest.fixture(scope="module")
def market(tmp_path_factory):
  return make_market(str(tmp_path_factory.mktemp("market")))


@pytest.fixture(scope="module")
def clipreid_pth(tmp_path_factory):
  sd, _ = torch_fixtures.clipreid_vit_state_dict(image_size=SIZE, stride=STRIDE,
                                                   num_ids=len(TRAIN_IDS), num_cams=NUM_CAMS)
  path = tmp_path_factory.mktemp("ckpt") / "Market1501_clipreid_12x12sie_ViT-B-16_60.pth"
  # Saved from DataParallel, as the released files are.
  torch.save({f"module.{k}": v for k, v in sd.items()}, path)
  return str(path)


def clipreid_config(root: str, path: str):
  """Market-1501 SIE + OLP recipe (stride 12, camera SIE, lambda 1) at a tiny input size."""
  c = clipreid.paper_config("market1501", "vit_b16", "sie_olp", root=root)
  c.model.released_checkpoint = path
  # make_market's test cameras are outside its train cameras (and the 2-row table).
  c.model.sie_clamp = True
  c.data.size = tuple(SIZE)
  c.data.workers = 2
  c.eval.batch_size = 8
  c.eval.grid_queries = 2
  c.eval.grid_topk = 3
  return c


def _direct_reid_features(path, records, coe):
  """Test embeddings from the converted params, no pipeline code involved."""
  model, params, _, _ = clipreid_ckpt.convert(path, image_size=SIZE, patch_stride=STRIDE)
  mean, std = transforms.norm_constants("vit_b16")
  decode = transforms.make_reid_decode(False, SIZE, mean, std)
  x = np.stack([decode(r, None)["image"] for r in records])
  table = np.asarray(params["prompt"]["sie"])
  # Cameras absent from training (make_market's gallery camera 3) use the last row.
  cams = np.minimum([r.camid for r in records], table.shape[0] - 1)
  feats = model.apply({"params": params}, x, coe * table[cams], method="image_features")
  return np.asarray(clipreid_model.test_embedding(feats))


def test_clipreid_released_eval_matches_direct(market, clipreid_pth, tmp_path):
  cfg = clipreid_config(market, clipreid_pth)
  wd = str(tmp_path / "run")
  res = clipreid.run(cfg, wd, stage="eval")["eval"]
  for f in ("results.json", "cmc.png", "ranked.png"):
    assert os.path.isfile(os.path.join(wd, "eval", f)), f
  with open(os.path.join(wd, "eval", "results.json")) as f:
    saved = json.load(f)
  assert saved["weights"] == clipreid_pth and saved["mAP"] == pytest.approx(res["mAP"], abs=0)

  ds = reid_data.build_reid_dataset("market1501", market)
  feats = _direct_reid_features(clipreid_pth, ds.query + ds.gallery, float(cfg.model.sie_coe))
  nq = len(ds.query)
  pid_cam = lambda rs: (np.array([r.pid for r in rs]), np.array([r.camid for r in rs]))  # noqa
  (qp, qc), (gp, gc) = pid_cam(ds.query), pid_cam(ds.gallery)
  cmc, m_ap = reid_eval.evaluate_features(feats[:nq], feats[nq:], qp, gp, qc, gc)
  assert abs(saved["mAP"] - float(m_ap)) <= 1e-6
  assert abs(saved["R1"] - float(cmc[0])) <= 1e-6
  np.testing.assert_allclose(saved["cmc"], cmc, atol=1e-6)

  # SIE is really applied: without it the features differ.
  plain = _direct_reid_features(clipreid_pth, ds.query, 0.0)
  assert np.abs(plain - feats[:nq]).max() > 1e-3

  # Extraction of a folder uses the released model too (SIE camera from extract.camid).
  cfg.extract.images = os.path.join(market, "Market-1501-v15.09.15", "query")
  cfg.extract.out = str(tmp_path / "query.npz")
  cfg.extract.camid = 0
  cfg.extract.batch_size = 8
  out = clipreid.run(cfg, wd, stage="extract")["extract"]
  assert out["weights"] == clipreid_pth
  with np.load(cfg.extract.out) as f:
    row = {os.path.basename(str(p)): i for i, p in enumerate(f["paths"])}
    got = f["features"][[row[os.path.basename(r.path)] for r in ds.query]]
  np.testing.assert_allclose(got, feats[:nq], atol=1e-5)  # every query image is camera 0


def test_clipreid_released_refusals(market, clipreid_pth, tmp_path):
  wd = str(tmp_path / "run")
  cfg = clipreid_config(market, clipreid_pth)
  with pytest.raises(ValueError, match="--stage eval"):
    clipreid.run(cfg, wd)
  with pytest.raises(ValueError, match="--stage eval"):
    clipreid.run(cfg, wd, stage="stage2")

  cfg = clipreid_config(market, clipreid_pth)
  cfg.model.stride = 16
  with pytest.raises(ValueError, match=r"model\.stride"):
    clipreid.run(cfg, wd, stage="eval")

  cfg = clipreid_config(market, clipreid_pth)
  cfg.data.size = (96, 40)
  with pytest.raises(ValueError, match=r"data\.size"):
    clipreid.run(cfg, wd, stage="eval")

  cfg = clipreid_config(market, clipreid_pth)
  cfg.model.sie_camera = False
  with pytest.raises(ValueError, match=r"set model\.sie_camera=True"):
    clipreid.run(cfg, wd, stage="eval")

  cfg = clipreid_config(market, clipreid_pth)
  cfg.model.sie_camera, cfg.model.sie_view = False, True  # 1 view (Market) != 2 stored rows
  with pytest.raises(ValueError, match=r"model\.sie_camera=True, model\.sie_view=False"):
    clipreid.run(cfg, wd, stage="eval")

  cfg = clipreid_config(market, clipreid_pth)
  cfg.backbone = "rn50"
  cfg.model.sie_camera = False
  with pytest.raises(ValueError, match=r"backbone='vit_b16'"):
    clipreid.run(cfg, wd, stage="eval")

  # Another dataset's identities: a cross-dataset evaluation, which runs (with a warning).
  other = make_market(str(tmp_path / "other"), train_ids=TRAIN_IDS[:4])
  cfg = clipreid_config(other, clipreid_pth)
  other_wd = str(tmp_path / "cross")
  clipreid.run(cfg, other_wd, stage="eval")
  assert os.path.exists(os.path.join(other_wd, "eval", "results.json"))


# -- LPT -----------------------------------------------------------------------------------------

DEPTH, T, POOL, G, C, WIDTH, IMG, PATCH = 3, 2, 4, 2, 5, 64, 32, 8
TRAIN_COUNTS = (130, 60, 25, 8, 2)  # many / medium / medium / few / few (LPT buckets)


@pytest.fixture(scope="module")
def lpt_pth(tmp_path_factory):
  _, _, sd = torch_fixtures.lpt_torch(depth=DEPTH, prompt_length=T, pool=POOL,
                                        group_layers=G, num_classes=C, width=WIDTH,
                                        img_size=IMG, patch=PATCH, heads=1)
  path = tmp_path_factory.mktemp("lpt_ckpt") / "LPT_places.pth"
  torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
  return str(path)


@pytest.fixture(scope="module")
def lt_lists(tmp_path_factory):
  """Train list only (its images need not exist for evaluation) + a test list with images."""
  root = tmp_path_factory.mktemp("lt")
  rng = np.random.default_rng(0)
  os.makedirs(root / "test")
  with open(root / "train.txt", "w") as f:
    for y, n in enumerate(TRAIN_COUNTS):
      f.writelines(f"train/{y}_{i}.jpg {y}\n" for i in range(n))
  with open(root / "test.txt", "w") as f:
    for y in range(C):
      for i in range(4):
        x = rng.integers(0, 256, size=(40, 44, 3), dtype=np.uint8)
        Image.fromarray(x).save(root / "test" / f"{y}_{i}.png")
        f.write(f"test/{y}_{i}.png {y}\n")
  return str(root)


def lpt_config(root: str, path: str, method: str = "lpt"):
  c = lpt_recipe.paper_config("list", method, root=root)
  c.data.train_file = os.path.join(root, "train.txt")
  c.data.test_file = os.path.join(root, "test.txt")
  c.eval.batch_size = 8
  c.data.workers = 2
  c.model.image_size = IMG
  c.model.prompt_length = T
  c.model.pool_size = POOL
  c.model.group_layers = G
  c.model.released_checkpoint = path
  return c


def test_lpt_released_eval_matches_direct(lt_lists, lpt_pth, tmp_path):
  cfg = lpt_config(lt_lists, lpt_pth)
  wd = str(tmp_path / "run")
  res = lpt.run(cfg, wd, stage="eval")["eval"]
  assert set(res) == {"phase2"}
  out = os.path.join(wd, "eval", "phase2")
  for f in ("results.json", "predictions.npy", "per_class_accuracy.png", "bucket_accuracy.png"):
    assert os.path.isfile(os.path.join(out, f)), f
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert saved["weights"] == lpt_pth and saved["num_test"] == 4 * C

  # LPT inference written out by hand on the converted params: query pass, top-2 keys,
  # mean group prompt in the last G blocks, cosine head.
  model, params, _ = lpt_ckpt.convert(lpt_pth)
  _, test = lpt_data.load_datasets(cfg, check_train_files=False)
  decode = cls_common.decode_fn(cfg, train=False)
  x = np.stack([decode(r, None)["image"] for r in test.records])
  pr = params["prompt"]
  nrm = lambda a, axis=-1: a / jnp.linalg.norm(a, axis=axis, keepdims=True)  # noqa: E731
  q = model.apply({"params": params}, x, pr["shared"])
  sel = jax.lax.top_k(nrm(q) @ nrm(pr["keys"]).T, 2)[1]
  feat = model.apply({"params": params}, x, (pr["shared"], pr["group"][sel].mean(axis=1)),
                     prompt_start=(0, -G))
  pred = np.asarray(jnp.argmax(nrm(feat) @ nrm(params["head"]["kernel"], 0), -1))
  np.testing.assert_array_equal(np.load(os.path.join(out, "predictions.npy")), pred)
  acc = lt_eval.shot_accuracy(pred, test.labels, np.asarray(TRAIN_COUNTS), "lpt")
  for k in ("overall", "many", "medium", "few"):
    assert abs(saved[k] - 100.0 * acc[k]) <= 1e-6, k
  assert saved["classes_per_bucket"] == {"many": 1, "medium": 2, "few": 2}


def test_lpt_released_refusals(lt_lists, lpt_pth, tmp_path):
  wd = str(tmp_path / "run")
  with pytest.raises(ValueError, match="--stage eval"):
    lpt.run(lpt_config(lt_lists, lpt_pth), wd)
  with pytest.raises(ValueError, match="--stage eval"):
    lpt.run(lpt_config(lt_lists, lpt_pth), wd, stage="phase2")

  for field, value, msg in (("image_size", 48, r"model\.image_size=32"),
                            ("prompt_length", 10, r"model\.prompt_length=2"),
                            ("pool_size", 20, r"model\.pool_size=4"),
                            ("group_layers", 1, r"model\.group_layers=2")):
    cfg = lpt_config(lt_lists, lpt_pth)
    cfg.model[field] = value
    with pytest.raises(ValueError, match=msg):
      lpt.run(cfg, wd, stage="eval")

  cfg = lpt_config(lt_lists, lpt_pth)
  cfg.data.num_classes = C + 3
  with pytest.raises(ValueError, match=rf"classifies {C} classes[\s\S]*data\.num_classes={C}"):
    lpt.run(cfg, wd, stage="eval")

  cfg = lpt_config(lt_lists, lpt_pth, method="vpt_deep")
  with pytest.raises(ValueError, match=r"model\.released_checkpoint is supported for LPT"):
    vpt.run(cfg, wd, stage="eval")
