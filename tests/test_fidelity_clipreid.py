"""Fidelity checks against Syliz517/CLIP-ReID (one section per defect of the comparison)."""
from __future__ import annotations

import os
import types

import jax
import numpy as np
import pytest

from jaxprompt.clipreid import data as reid_data
from jaxprompt.clipreid import evaluate as reid_eval
from jaxprompt.clipreid import model as m
from jaxprompt.clipreid import train as clipreid


def _jpeg(path):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 4, 3), 128, np.uint8)).save(path, format="JPEG")


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))


def _vehicleid(root, test_size=800):
  base = os.path.join(root, "VehicleID_V1.0")
  train = [("0001", 12), ("0002", 12), ("0003", 4)]
  test = [(f"1{i:03d}", 100 + i % 3) for i in range(9)]
  for n, _ in train + test:
    _jpeg(os.path.join(base, "image", n + ".jpg"))
  _write(os.path.join(base, "train_test_split", "train_list.txt"), [f"{n} {p}" for n, p in train])
  _write(os.path.join(base, "train_test_split", f"test_list_{test_size}.txt"),
         [f"{n} {p}" for n, p in test])
  return root


# ------------------------------------------------------------------------------------------
# Item 1: the template follows the dataset, including every name the readers produce.

PERSON, VEHICLE = m.TEMPLATES["person"], m.TEMPLATES["vehicle"]


@pytest.mark.parametrize("test_size", [800, 1600, 2400])
def test_vehicleid_reader_names_get_the_vehicle_template(tmp_path, test_size):
  # Syliz517/CLIP-ReID model/make_model_clipreid.py: "VehicleID" and "veri" use "vehicle".
  root = _vehicleid(str(tmp_path), test_size)
  ds = reid_data.read_vehicleid(root, test_size=test_size, check_counts=False)
  assert m.template_for(ds.name) == VEHICLE, ds.name


@pytest.mark.parametrize("name,template", [
    ("market1501", PERSON), ("dukemtmc", PERSON), ("occ_duke", PERSON), ("msmt17", PERSON),
    ("generic", PERSON), ("veri", VEHICLE), ("vehicleid", VEHICLE), ("VehicleID", VEHICLE)])
def test_template_of_every_reader_name(name, template):
  assert m.template_for(name) == template


def _text_ctx(workdir, dataset_name, clip):
  cfg = clipreid.base_config()
  cfg.stage2.batch_size = 4
  ctx = types.SimpleNamespace(config=cfg, clip=clip,
                              dataset=types.SimpleNamespace(name=dataset_name),
                              stage_dir=lambda s: os.path.join(workdir, s))
  return ctx


@pytest.fixture(scope="module")
def tiny_clip():
  cfg = clipreid.base_config()
  cfg.model.tiny_random = True
  cfg.model.stride = 8
  cfg.data.size = (32, 16)
  return clipreid.load_backbone(cfg)


def _fresh(clip, name, cls_ctx):
  model, variables = clip
  prompt = m.build_text_prompt(model, {"params": {"txt": variables["params"]["txt"]}},
                               m.template_for(name))
  return clipreid.text_features_all(model, variables["params"]["txt"], prompt, cls_ctx, chunk=4)


def test_stage2_text_cache_is_keyed_on_template_and_text_weights(tmp_path, tiny_clip):
  model, variables = tiny_clip
  width = variables["params"]["txt"]["token_embedding"].shape[1]
  cls_ctx = np.asarray(0.02 * np.random.default_rng(0).normal(size=(3, 4, width)), np.float32)
  wd = str(tmp_path)
  person = clipreid.stage2_text_cache(_text_ctx(wd, "market1501", tiny_clip), cls_ctx)
  np.testing.assert_allclose(person, _fresh(tiny_clip, "market1501", cls_ctx), rtol=1e-6)
  # Same tokens, other template: the cached person features must not be reused.
  vehicle = clipreid.stage2_text_cache(_text_ctx(wd, "vehicleid-800", tiny_clip), cls_ctx)
  np.testing.assert_allclose(vehicle, _fresh(tiny_clip, "vehicleid-800", cls_ctx), rtol=1e-6)
  assert np.abs(vehicle - person).max() > 1e-4
  # Same tokens and template, other text weights: recomputed too.
  txt = jax.tree.map(lambda x: np.asarray(x) * 1.01, variables["params"]["txt"])
  other = (model, {**variables, "params": {**variables["params"], "txt": txt}})
  again = clipreid.stage2_text_cache(_text_ctx(wd, "vehicleid-800", other), cls_ctx)
  np.testing.assert_allclose(again, _fresh(other, "vehicleid-800", cls_ctx), rtol=1e-6)
  assert np.abs(again - vehicle).max() > 1e-5
  # Unchanged inputs: the cache is read, not recomputed.
  calls = []
  orig = clipreid.text_features_all
  try:
    clipreid.text_features_all = lambda *a, **k: calls.append(1) or orig(*a, **k)
    clipreid.stage2_text_cache(_text_ctx(wd, "vehicleid-800", other), cls_ctx)
  finally:
    clipreid.text_features_all = orig
  assert not calls


# ------------------------------------------------------------------------------------------
# Item 2: view-only SIE has one row per view, indexed by the view; out-of-range is an error.


def _sie_ctx(tmp_path, camera, view, cams=4, views=8, ids=3):
  cfg = clipreid.base_config()
  cfg.model.sie_camera, cfg.model.sie_view = camera, view
  ctx = clipreid.Context(cfg, str(tmp_path))
  ctx._dataset = types.SimpleNamespace(num_train_cams=cams, num_train_views=views,
                                       num_train_pids=ids)
  return ctx


def test_view_only_sie_has_one_row_per_view(tmp_path):
  # Syliz517/CLIP-ReID model/make_model_clipreid.py: view-only cv_embed is view_num x width.
  ctx = _sie_ctx(tmp_path, camera=False, view=True, views=8)
  spec = ctx.sie_spec()
  assert m.sie_rows(4, spec.num_views, spec.camera, spec.view) == 8
  table = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  cams, views = np.zeros(3, np.int32), np.asarray([0, 3, 7], np.int32)
  out = np.asarray(spec.vectors(table, cams, views))
  np.testing.assert_array_equal(out, spec.coefficient * table[[0, 3, 7]])
  # Camera x view: cam * num_views + view.
  both = _sie_ctx(tmp_path, camera=True, view=True, cams=4, views=8).sie_spec()
  assert both.num_views == 8


def test_check_released_sizes_view_only_tables_by_views(tmp_path):
  ctx = _sie_ctx(tmp_path, camera=False, view=True, views=8)
  ctx.config.model.released_checkpoint = "released.pth"
  ctx._clip = (None, {"params": {"prompt": {"sie": np.zeros((8, 4), np.float32)}}})
  ctx.released_info = {"num_ids": 3}
  reid_eval.check_released(ctx)  # 8 views -> 8 rows fits
  ctx._clip = (None, {"params": {"prompt": {"sie": np.zeros((1, 4), np.float32)}}})
  with pytest.raises(ValueError, match="1 rows .* need 8"):
    reid_eval.check_released(ctx)


@pytest.mark.parametrize("camera,view,cam,vw,index,rows", [
    (True, False, 6, 0, 6, 6), (False, True, 0, 8, 8, 8), (True, True, 3, 0, 24, 24)])
def test_out_of_range_sie_index_is_an_error(camera, view, cam, vw, index, rows):
  spec = clipreid.SIESpec(camera, view, 1.0, 8)
  recs = [reid_data.ReIDRecord("a.jpg", 0, 0, 0, 0), reid_data.ReIDRecord("b.jpg", 0, cam, vw, 0)]
  with pytest.raises(ValueError, match=rf"SIE index {index}\b.*b\.jpg.*{rows} rows"):
    spec.check_indices(recs, rows, "the gallery")
  spec.check_indices(recs[:1], rows, "the gallery")  # in range: no error


def test_extract_with_out_of_range_camera_names_index_and_table(tmp_path, tiny_clip):
  from jaxprompt.convert import io as cio
  _, variables = tiny_clip
  params = {"img": variables["params"]["img"], "prompt": {"sie": np.zeros((2, 32), np.float32)}}
  path = str(tmp_path / "trained.npz")
  cio.write_arrays(path, cio.flatten(jax.device_get(params)))
  _jpeg(str(tmp_path / "imgs" / "x.jpg"))
  cfg = clipreid.base_config()
  cfg.model.tiny_random = True
  cfg.model.stride = 8
  cfg.data.size = (32, 16)
  cfg.model.sie_camera = True
  cfg.model.trained_params = path
  cfg.extract.images, cfg.extract.out = str(tmp_path / "imgs"), str(tmp_path / "out.npz")
  cfg.extract.camid = 5
  with pytest.raises(ValueError, match=r"SIE index 5\b.*2 rows"):
    clipreid.run(cfg, str(tmp_path / "wd"), stage="extract")
  cfg.extract.camid = 1
  clipreid.run(cfg, str(tmp_path / "wd"), stage="extract")
  assert os.path.isfile(cfg.extract.out)


# ------------------------------------------------------------------------------------------
# Item 8: VehicleID SIE + OLP clamps (the only runnable reading); VeRi is camera x view.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_module(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs",
                                                                        "clipreid", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_vehicleid_sie_olp_clamps_and_says_so():
  mod = _config_module("vehicleid_vit_b16_sie_olp.py")
  c = mod.get_config()
  assert c.model.sie_camera and not c.model.sie_view and c.model.sie_clamp
  doc = " ".join(mod.__doc__.split())
  for phrase in ("camera 0", "camera 1", "cannot index", "constant offset"):
    assert phrase in doc, phrase
  # Train images are camera 0 (a 1-row table); gallery images camera 1 use that row.
  spec = clipreid.SIESpec(True, False, 1.0, 1, clamp=True)
  table = np.asarray([[1.0, 2.0]], np.float32)
  gallery = [reid_data.ReIDRecord("g.jpg", 5, 1, -1, 5)]
  spec.check_indices(gallery, 1, "the gallery")
  out = np.asarray(spec.vectors(table, np.asarray([1, 0]), np.asarray([-1, -1])))
  np.testing.assert_array_equal(out, [[1.0, 2.0], [1.0, 2.0]])
  # Nowhere else: every other recipe keeps the error.
  for ds in ("market1501", "msmt17", "dukemtmc", "occ_duke", "veri"):
    assert not clipreid.paper_config(ds, "vit_b16", "sie_olp").model.sie_clamp, ds


def test_veri_sie_docstrings_say_camera_x_view():
  mod = _config_module("veri_vit_b16_sie_olp.py")
  c = mod.get_config()
  assert c.model.sie_camera and c.model.sie_view
  first = mod.__doc__.splitlines()[0]
  assert "camera x view SIE" in first, first


# ------------------------------------------------------------------------------------------
# Item 10: MSMT17 V1 vs V2, and VehicleID's 10-trial evaluation.


def _msmt_lists(base, rel=lambda pid, i: f"{pid:04d}/{pid:04d}_{i:03d}_01_0303morning_0015_0.jpg"):
  _write(os.path.join(base, "list_train.txt"), [f"{rel(0, 0)} 0", f"{rel(1, 0)} 1"])
  _write(os.path.join(base, "list_val.txt"), [f"{rel(0, 1)} 0"])
  _write(os.path.join(base, "list_query.txt"), [f"{rel(5, 0)} 5"])
  _write(os.path.join(base, "list_gallery.txt"), [f"{rel(5, 1)} 5"])


def _msmt_v2(root):
  base = os.path.join(root, "MSMT17_V2")
  os.makedirs(os.path.join(base, "mask_train_v2"))
  os.makedirs(os.path.join(base, "mask_test_v2"))
  _msmt_lists(base)
  return base


def _msmt_v1(root, name="MSMT17_V1"):
  base = os.path.join(root, name)
  os.makedirs(os.path.join(base, "train"))
  os.makedirs(os.path.join(base, "test"))
  _msmt_lists(base)
  return base


def test_msmt17_v2_layout_is_an_error_naming_v1(tmp_path):
  base = _msmt_v2(str(tmp_path))
  with pytest.raises(ValueError, match=r"MSMT17 V2.*mask_train_v2.*V1") as e:
    reid_data.build_reid_dataset("msmt17", str(tmp_path))
  assert base in str(e.value)
  # Pointing the root at the V2 folder itself is caught too.
  with pytest.raises(ValueError, match=r"MSMT17 V2"):
    reid_data.read_msmt17(base)


def test_msmt17_v1_is_read_even_beside_v2(tmp_path):
  _msmt_v2(str(tmp_path))
  v1 = _msmt_v1(str(tmp_path))
  ds = reid_data.read_msmt17(str(tmp_path))
  assert ds.root == v1 and len(ds.train) == 3 and len(ds.gallery) == 1


def _vehicleid_images(root, n_test_ids=6, per_id=3):
  from PIL import Image
  base = os.path.join(root, "VehicleID_V1.0")
  rng = np.random.default_rng(0)
  train = [(f"0{i:03d}", 10 + i % 3) for i in range(6)]
  test = [(f"1{i:03d}", 200 + i // per_id) for i in range(n_test_ids * per_id)]
  os.makedirs(os.path.join(base, "image"), exist_ok=True)
  for n, pid in train + test:
    colour = np.random.default_rng(pid).integers(30, 220, size=3)
    x = np.clip(colour + rng.normal(0, 30, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(x).save(os.path.join(base, "image", n + ".jpg"), quality=95)
  _write(os.path.join(base, "train_test_split", "train_list.txt"), [f"{n} {p}" for n, p in train])
  _write(os.path.join(base, "train_test_split", "test_list_800.txt"), [f"{n} {p}" for n, p in test])
  return root


def test_vehicleid_eval_averages_its_random_gallery_trials(tmp_path, tiny_clip, monkeypatch):
  import functools
  from jaxprompt.convert import io as cio
  from jaxprompt.clipreid import ranking
  from jaxprompt.clipreid import transforms
  # The tiny set has neither 13,164 train nor 800 test vehicles: skip the count checks.
  monkeypatch.setitem(reid_data.READERS, "vehicleid",
                      functools.partial(reid_data.read_vehicleid, check_counts=False))
  monkeypatch.setattr(reid_data, "vehicleid_trials",
                      functools.partial(reid_data.vehicleid_trials, check_counts=False))
  root = _vehicleid_images(str(tmp_path / "data"))
  model, variables = tiny_clip
  path = str(tmp_path / "trained.npz")
  cio.write_arrays(path, cio.flatten(jax.device_get({"img": variables["params"]["img"]})))
  cfg = clipreid.paper_config("vehicleid", "vit_b16", "clipreid", root=root)
  cfg.model.tiny_random = True
  cfg.model.stride = 8
  cfg.data.size = (32, 16)
  cfg.data.workers = 2
  cfg.data.vehicleid_trials = 4
  cfg.model.trained_params = path
  cfg.eval.batch_size = 8
  cfg.eval.plots = False
  res = clipreid.run(cfg, str(tmp_path / "wd"), stage="eval")["eval"]
  trials = reid_data.vehicleid_trials(root, 800, int(cfg.seed), 4, check_counts=False)
  assert len(res["trials"]) == 4 and len({tuple(r.path for r in g) for _, g in trials}) > 1
  # Each trial scored on its own draw, from features computed here without the pipeline.
  mean, std = transforms.norm_constants("vit_b16")
  decode = transforms.make_reid_decode(False, (32, 16), mean, std)
  want = []
  for q, g in trials:
    x = np.stack([decode(r, None)["image"] for r in q + g])
    feats = np.asarray(m.test_embedding(model.apply({"params": {"img": variables["params"]["img"]}},
                                                    x, None, False, method="image_features")))
    pc = lambda rs: (np.array([r.pid for r in rs]), np.array([r.camid for r in rs]))  # noqa
    (qp, qc), (gp, gc) = pc(q), pc(g)
    cmc, m_ap = ranking.evaluate_features(feats[:len(q)], feats[len(q):], qp, gp, qc, gc)
    want.append({"mAP": float(m_ap), "R1": float(cmc[0]), "R5": float(cmc[4])})
  for got, exp in zip(res["trials"], want):
    for k in ("mAP", "R1", "R5"):
      assert got[k] == pytest.approx(exp[k], abs=1e-6), k
  for k in ("mAP", "R1", "R5"):
    assert res[k] == pytest.approx(np.mean([w[k] for w in want]), abs=1e-6), k
