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
  cfg.model.tiny_random.enabled = True
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
  cfg.model.tiny_random.enabled = True
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
