"""Every config in configs/: it loads, its model's parameter tree at the config's real size
(ViT-B/16, RN50; shapes only, no weights) is covered by every stage's rules, and the trainable
counts match the papers where they state them. Each family's `tiny` variant runs two steps of
every stage."""
from __future__ import annotations

import functools
import glob
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import methods, optim
from jaxprompt.clipreid import config as clipreid_config
from jaxprompt.clipreid import model as clipreid_model
from jaxprompt.clipreid import train as clipreid_train
from jaxprompt.clipreid.context import tiny_clip_config
from jaxprompt.coop import model as coop_model
from jaxprompt.coop import train as coop_train
from jaxprompt.lpt import config as lpt_config
from jaxprompt.lpt import model as lpt_model
from jaxprompt.lpt.context import prompt_spec
from jaxprompt.models.clip import CLIP, CLIPConfig
from jaxprompt.models.vit import ViT, ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in
                 glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))

# Training-split sizes of the datasets (identities, cameras, views; classes).
REID = {"market1501": (751, 6, 1), "msmt17": (1041, 15, 1), "dukemtmc": (702, 8, 1),
        "occ_duke": (702, 8, 1), "veri": (576, 20, 8), "vehicleid": (13164, 1, 1)}
CLASSES = {"places_lt": 365, "cifar100_lt": 100, "inat2018": 8142}
# LPT (ICLR 2023) Sec. 4: shared + group prompts of ViT-B/16, 12 x 10 + 20 x 6 x 10 tokens of
# 768; VPT-deep: 12 x 10 tokens of 768.
LPT_PROMPTS = 1_013_760
VPT_DEEP_PROMPTS = 92_160


def load(path: str):
  return runpy.run_path(os.path.join(ROOT, path))["get_config"]()


def families(config) -> list:
  """The family configs inside a config (the default job holds three)."""
  if config.pipeline == "default":
    return [config.clipreid, config.lpt, config.linear]
  return [config]


def test_every_config_is_listed():
  assert len(CONFIGS) > 40 and "configs/default.py" in CONFIGS


# ------------------------------------------------------------------------------ CLIP-ReID

@functools.lru_cache(maxsize=None)
def _clip_shapes(cfg: CLIPConfig):
  model = CLIP(cfg)
  h, w = cfg.input_size
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)),
                     jnp.zeros((1, 77), jnp.int32))
  return model, v, clipreid_train.feature_dims(model, (h, w))


def paper_clip(config) -> CLIPConfig:
  """OpenAI's ViT-B/16 or RN50 (openai/CLIP clip/model.py build_model), at the config's input."""
  if config.model.tiny_random:
    return tiny_clip_config(config)
  common = dict(context_length=77, vocab_size=49408, text_width=512, text_heads=8, text_layers=12)
  size = tuple(config.data.size)
  if clipreid_config._is_vit(config):
    return CLIPConfig(embed_dim=512, vision="vit", vision_width=768, vision_layers=12,
                      vision_heads=12, patch_size=16, pretrained_grid=14,
                      **common).with_input(size, patch_stride=int(config.model.stride))
  return CLIPConfig(embed_dim=1024, vision="resnet", vision_width=64, vision_layers=(3, 4, 6, 3),
                    vision_heads=32, patch_size=32, pretrained_grid=7,
                    **common).with_input(size, last_stride=int(config.model.last_stride))


def clipreid_trees(config) -> dict:
  """Abstract parameter trees each stage trains over, as the driver builds them."""
  ids, cams, views = REID.get(config.data.name, (20, 2, 1))
  model, v, dims = _clip_shapes(paper_clip(config))
  head = jax.eval_shape(clipreid_train.head_module(ids).init, jax.random.key(0),
                        jnp.zeros((2, dims["final"])), jnp.zeros((2, dims["proj"])))
  width = v["params"]["txt"]["token_embedding"].shape[1]
  cls_ctx = jax.eval_shape(lambda: clipreid_model.init_identity_tokens(jax.random.key(0), ids,
                                                                       width))
  stage2 = {"img": v["params"]["img"], "head": head["params"]}
  prompt = {}
  if not clipreid_config._baseline(config):
    stage2["txt"] = v["params"]["txt"]
    prompt = {"cls_ctx": cls_ctx, "text_feats": jax.ShapeDtypeStruct((ids, dims["proj"]),
                                                                       jnp.float32)}
  m = config.model
  if m.sie_camera or m.sie_view:
    rows = clipreid_model.sie_rows(cams, views if (m.sie_camera and m.sie_view) else 1,
                                   bool(m.sie_camera), bool(m.sie_view))
    prompt["sie"] = jax.ShapeDtypeStruct((rows, dims["final"]), jnp.float32)
  if prompt:
    stage2["prompt"] = prompt
  trees = {"stage2": stage2}
  if "stage1" in clipreid_train.stages_of(config):
    trees["stage1"] = {"txt": v["params"]["txt"], "prompt": {"cls_ctx": cls_ctx}}
  return trees


# ------------------------------------------------------------------------------ LPT family

@functools.lru_cache(maxsize=None)
def _vit(cfg: ViTConfig, ln_eps: float, exact_gelu: bool) -> ViT:
  return ViT(cfg, ln_eps=ln_eps, exact_gelu=exact_gelu)


def paper_vit(config, job=None) -> ViTConfig:
  """ViT-B/16 (the AugReg IN-21k tower) at model.image_size, or the config's small tower."""
  m = config.model
  if m.tiny_random:
    t = m.tiny
    g = int(m.image_size) // int(t.patch)
    return ViTConfig(patch=int(t.patch), width=int(t.width), depth=int(t.depth),
                     heads=int(t.heads), mlp_dim=int(t.mlp_dim), grid=(g, g))
  if job is not None:  # the default job's pretrained tiny ViT (configs/default.py `pretrain`)
    p = job.pretrain
    g = int(p.image_size) // int(p.patch)
    return ViTConfig(patch=int(p.patch), width=int(p.width), depth=int(p.depth),
                     heads=int(p.heads), mlp_dim=int(p.width) * int(p.mlp_ratio), grid=(g, g))
  g = int(m.image_size) // 16
  return ViTConfig(patch=16, width=768, depth=12, heads=12, mlp_dim=3072, grid=(g, g))


def lpt_tree(config, job=None):
  d = config.data
  n = (CLASSES.get(d.name) or int(d.num_classes)
       or int(d.synthetic.num_classes))
  spec = prompt_spec(config, n)
  vit = _vit(paper_vit(config, job), float(config.model.ln_eps), bool(config.model.exact_gelu))
  return lpt_model.param_shapes(vit, spec), spec


# ------------------------------------------------------------------------------ CoOp / CoCoOp

# Classes of the CoOp datasets' label spaces (KaiyangZhou/CoOp DATASETS.md), for CSC contexts.
COOP_CLASSES = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196,
                "oxford_flowers": 102, "food101": 101, "fgvc_aircraft": 100, "sun397": 397,
                "dtd": 47, "eurosat": 10, "ucf101": 101}
# CoOp (IJCV 2022) Sec. 4.1: M=16 unified tokens of RN50's 512-d text width; CoCoOp (CVPR 2022)
# Sec. 4: M=4 tokens of 512 plus the Meta-Net 512 -> 32 -> 512 of ViT-B/16.
COOP_M16 = 8_192
COCOOP_VIT_B16 = 35_360


def coop_tree(config) -> dict:
  """{'img', 'txt', 'prompt'} shapes of OpenAI's RN50 / ViT-B/16 with the config's prompt."""
  common = dict(context_length=77, vocab_size=49408, text_width=512, text_heads=8, text_layers=12)
  if config.backbone == "RN50":
    cfg = CLIPConfig(embed_dim=1024, vision="resnet", vision_width=64, vision_layers=(3, 4, 6, 3),
                     vision_heads=32, patch_size=32, pretrained_grid=7, **common)
  else:
    cfg = CLIPConfig(embed_dim=512, vision="vit", vision_width=768, vision_layers=12,
                     vision_heads=12, patch_size=16, pretrained_grid=14, **common)
  cfg = cfg.with_input((224, 224))
  clip = jax.eval_shape(CLIP(cfg).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                        jnp.zeros((1, 77), jnp.int32))["params"]
  spec = coop_train.spec_of(config)
  emb = clip["txt"]["token_embedding"]
  prompt = jax.eval_shape(
      lambda r: coop_model.init_prompt(r, spec, width=512, embed_dim=cfg.embed_dim,
                                       num_classes=COOP_CLASSES[config.data.name],
                                       token_embedding=jnp.zeros(emb.shape, emb.dtype)),
      jax.random.key(0))
  return {**clip, "prompt": prompt}


# ------------------------------------------------------------------------------ the checks

@pytest.mark.parametrize("path", CONFIGS)
def test_config_rules_cover_the_real_tree(path):
  config = load(path)
  for c in families(config):
    job = config if config.pipeline == "default" else None
    if c.pipeline == "clipreid":
      for stage, tree in clipreid_trees(c).items():
        res = optim.resolve(tree, optim.rules_from_config(c[stage].rules, f"{stage}.rules"))
        assert any(r.train for r in res.values()), (path, stage)
      continue
    if c.pipeline == "coop":
      if c.method not in ("coop", "cocoop"):
        continue  # zero-shot and linear-probe CLIP train no prompt
      tree = coop_tree(c)
      res = optim.resolve(tree, optim.rules_from_config(c.train.rules, "train.rules"))
      trained = {n for n, r in res.items() if r.train}
      assert trained and all(n.startswith("prompt/") for n in trained), path
      assert trained == {n for n in optim.param_names(tree) if n.startswith("prompt/")}, path
      n = coop_model.count(tree["prompt"])
      if c.method == "cocoop" and c.backbone == "ViT-B/16" and int(c.prompt.n_ctx) == 4:
        assert n == COCOOP_VIT_B16, path
      if c.method == "coop" and not c.prompt.csc and int(c.prompt.n_ctx) == 16:
        assert n == COOP_M16, path
      continue
    assert c.pipeline in ("lpt", "vpt"), path
    tree, spec = lpt_tree(c, job)
    trained = set()
    for stage in lpt_config.stage_names(c.method):
      res = optim.resolve(tree, optim.rules_from_config(c[stage].rules, f"{stage}.rules"))
      assert not any(r.train for n, r in res.items() if n.startswith("img/")), (path, stage)
      trained |= {n for n, r in res.items() if r.train}
    counts = lpt_model.parameter_counts(tree, spec)
    if job is None and c.method == "lpt":
      assert counts["shared"] + counts["group"] == LPT_PROMPTS, path
    if job is None and c.method == "vpt_deep":
      assert counts["prompts"] == VPT_DEEP_PROMPTS, path
    if job is None and c.method == "linear":
      assert "prompt" not in tree, path
    # Every prompt and head leaf trains in some stage.
    assert {n for n in optim.param_names(tree) if not n.startswith("img/")} == trained, path


def test_config_rules_override_from_command_line_form():
  c = clipreid_config.paper_config("market1501")
  c.stage2.rules = (("txt/.*", "freeze"), ("prompt/.*", "freeze"), (".*", {"lr_mult": 3.0}))
  rules = clipreid_train.stage2_rules(c)
  assert rules[-1] == (".*", optim.Rule(lr_mult=3.0))
  with pytest.raises(ValueError, match="stage2.rules|rules"):
    optim.rules_from_config([(".*", "thaw")], "stage2.rules")


# ------------------------------------------------------------------------------ tiny runs

@pytest.fixture(scope="module")
def market(tmp_path_factory):
  from jaxprompt.demo.reid_data import write_synthetic_market
  return write_synthetic_market(str(tmp_path_factory.mktemp("market")), num_train_ids=6,
                                num_test_ids=4, cams=2, images_per_id_cam=2, cams_per_id=(2, 2),
                                num_distractors=1, num_junk=1, size=(32, 16), supersample=1)


def _steps(res: dict, stages) -> dict:
  return {s: int(jax.device_get(res[s].state["step"])) for s in stages}


def test_clipreid_tiny_runs_every_stage(market, tmp_path):
  c = clipreid_config.tiny(load("configs/clipreid/market1501_vit_b16_sie_olp.py"), market)
  res = methods.get(c.pipeline).run(c, str(tmp_path / "run"))
  assert _steps(res, ("stage1", "stage2")) == {"stage1": 2, "stage2": 2}
  assert 0.0 <= res["eval"]["mAP"] <= 1.0


@pytest.mark.parametrize("row", ["configs/lpt/places_lt_lpt.py", "configs/lpt/places_lt_vpt_balanced.py"])
def test_lpt_tiny_runs_every_stage(row, tmp_path):
  c = lpt_config.tiny(load(row))
  res = methods.get(c.pipeline).run(c, str(tmp_path / "run"))
  stages = lpt_config.stage_names(c.method)
  assert _steps(res, stages) == {s: 2 for s in stages}
  assert set(res["eval"]) == set(c.eval.stages)
  assert np.isfinite(res["eval"][stages[-1]]["overall"])
