"""CLIP-ReID recipe values, per-parameter rules on real model trees, SIE plumbing, schedules."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import optim
from jaxprompt import schedules
from jaxprompt.clipreid import model as m
from jaxprompt.models.clip import CLIP, CLIPConfig
from jaxprompt.clipreid import train as clipreid

PERSON = ("market1501", "msmt17", "dukemtmc", "occ_duke")


# ------------------------------------------------------------------------- recipe values

@pytest.mark.parametrize("dataset,backbone,variant", [
    (d, b, v) for d, b, v in itertools.product(
        PERSON + ("veri", "vehicleid"), ("vit_b16", "rn50"), ("clipreid", "sie_olp", "baseline"))
    if not (v == "sie_olp" and b == "rn50")])
def test_paper_config_values(dataset, backbone, variant):
  c = clipreid.paper_config(dataset, backbone, variant)
  vit, vid = backbone == "vit_b16", dataset == "vehicleid"
  assert c.pipeline == "clipreid" and c.seed == 1234
  assert tuple(c.data.size) == ((256, 128) if dataset in PERSON else (256, 256))
  # Stage 1 (spec 3.5).
  assert c.stage1.total_epochs == (120 if vit and dataset in PERSON else 60)
  assert c.stage1.batch_size == (256 if vid else 64)
  assert c.stage1.optimizer.lr == 3.5e-4 and c.stage1.optimizer.weight_decay == 1e-4
  assert c.stage1.optimizer.name == "adam" and c.stage1.optimizer.coupled_decay
  assert dict(c.stage1.lr_schedule) == dict(warmup_t=5, warmup_lr_init=1e-5, lr_min=1e-6)
  # Stage 2 (spec 4.7 / 4.8).
  s2 = c.stage2
  assert s2.batch_size == 64 and c.data.num_instances == 4 and dict(s2.rules)[".*bias.*"] == {"lr_mult": 2.0}
  if vit:
    assert s2.optimizer.lr == (5e-5 if vid else 5e-6)
    assert (s2.total_epochs, s2.optimizer.weight_decay) == (60, 1e-4)
    assert (s2.lr_schedule.warmup_factor, list(s2.lr_schedule.milestones)) == (0.1, [30, 50])
    assert c.loss.id_weight == (1.0 if variant == "baseline" else 0.25)
  else:
    assert (s2.optimizer.lr, s2.total_epochs, s2.optimizer.weight_decay) == (3.5e-4, 120, 5e-4)
    assert (s2.lr_schedule.warmup_factor, list(s2.lr_schedule.milestones)) == (0.01, [40, 70])
    assert c.loss.id_weight == 1.0
  assert s2.lr_schedule.warmup_iters == 10 and s2.lr_schedule.gamma == 0.1
  assert c.loss.triplet_weight == 1.0 and c.loss.margin == 0.3
  assert c.loss.i2t_weight == (0.0 if variant == "baseline" else 1.0)
  ls_off = vid and (not vit or variant == "baseline")
  assert c.loss.label_smoothing == (0.0 if ls_off else 0.1)
  # SIE + OLP (README command): stride 12, camera SIE with lambda 1, view SIE on VeRi.
  if variant == "sie_olp":
    assert (c.model.stride, c.model.sie_camera, c.model.sie_coe) == (12, True, 1.0)
    assert c.model.sie_view == (dataset == "veri")
  else:
    assert c.model.stride == 16 and not c.model.sie_camera and not c.model.sie_view
  assert c.eval.max_rank == 50 and not c.eval.rerank
  assert (c.eval.k1, c.eval.k2, c.eval.lambda_value) == (50, 15, 0.3)


def test_paper_config_rejects_and_aliases():
  with pytest.raises(ValueError, match="ViT"):
    clipreid.paper_config("market1501", "rn50", "sie_olp")
  with pytest.raises(ValueError, match="unknown dataset"):
    clipreid.paper_config("cuhk03")
  assert clipreid.paper_config("VehicleID", "ViT-B-16").data.name == "vehicleid"
  c = clipreid.base_config()
  c.lock()
  with pytest.raises(AttributeError):
    c.stage1.typo = 1


# ------------------------------------------------------------------------- rules on real trees

def _tree(vision: str, sie_rows: int = 6, num_ids: int = 5, real: bool = False):
  """Abstract full params tree of the pipeline (shapes only) and model state."""
  if real:  # ViT-B/16 / RN50 as CLIP-ReID builds them (256x128, stride 16, last stride 1)
    common = dict(context_length=77, vocab_size=49408, text_width=512, text_heads=8,
                  text_layers=12, pretrained_grid=14 if vision == "vit" else 7)
    cfg = (CLIPConfig(embed_dim=512, vision="vit", vision_width=768, vision_layers=12,
                      vision_heads=12, patch_size=16, **common).with_input((256, 128), 16)
           if vision == "vit" else
           CLIPConfig(embed_dim=1024, vision="resnet", vision_width=64,
                      vision_layers=(3, 4, 6, 3), vision_heads=32, patch_size=32,
                      **common).with_input((256, 128), last_stride=1))
  else:
    cfg = CLIPConfig(embed_dim=32, vision="vit" if vision == "vit" else "resnet",
                     vision_width=32 if vision == "vit" else 8,
                     vision_layers=2 if vision == "vit" else (1, 1, 1, 1),
                     vision_heads=2 if vision == "vit" else 4, patch_size=8 if vision == "vit"
                     else 32, pretrained_grid=4, context_length=77, vocab_size=49408,
                     text_width=32, text_heads=2, text_layers=1)
    cfg = cfg.with_input((64, 32), 8) if vision == "vit" else cfg.with_input((64, 32), None, 1)
  model = CLIP(cfg)
  h, w = cfg.input_size
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)),
                     jnp.zeros((1, 77), jnp.int32))
  dims = clipreid.feature_dims(model, (h, w))
  head = jax.eval_shape(clipreid.head_module(num_ids).init, jax.random.key(0),
                        jnp.zeros((2, dims["final"])), jnp.zeros((2, dims["proj"])))
  prompt = {"cls_ctx": jnp.zeros((num_ids, 4, cfg.text_width)),
            "text_feats": jnp.zeros((num_ids, dims["proj"]))}
  if vision == "vit":
    prompt["sie"] = jnp.zeros((sie_rows, dims["final"]))
  params = {"img": v["params"]["img"], "txt": v["params"]["txt"], "prompt": prompt,
            "head": head["params"]}
  return params, dims


@pytest.mark.parametrize("vision,real", [("vit", False), ("resnet", False), ("vit", True),
                                         ("resnet", True)])
def test_stage_rules_on_model_tree(vision, real):
  params, _ = _tree(vision, real=real)
  cfg = clipreid.paper_config("market1501", "vit_b16" if vision == "vit" else "rn50")

  # Stage 1: only the identity tokens train (on the stage-1 subset and on the full tree).
  for tree in ({"txt": params["txt"], "prompt": {"cls_ctx": params["prompt"]["cls_ctx"]}},
               params):
    res = optim.resolve(tree, clipreid.STAGE1_RULES)
    assert [n for n, r in res.items() if r.train] == ["prompt/cls_ctx"]

  # Stage 2.
  res = optim.resolve(params, clipreid.stage2_rules(cfg))
  for name, rule in res.items():
    if name.startswith("txt/") or name in ("prompt/cls_ctx", "prompt/text_feats"):
      assert not rule.train, name
    elif "bias" in name:
      assert rule.train and rule.lr_mult == 2.0 and rule.wd_mult == 1.0, name
    else:
      assert rule.train and rule.lr_mult == 1.0 and rule.wd_mult == 1.0, name
  biases = [n for n, r in res.items() if r.train and r.lr_mult == 2.0]
  if vision == "vit":
    for n in ("img/ln_pre/bias", "img/ln_post/bias", "img/blocks_0/attn/qkv/bias",
              "img/blocks_0/attn/out/bias", "img/blocks_0/mlp/fc1/bias", "img/blocks_0/ln_1/bias"):
      assert n in biases
    assert res["prompt/sie"].train and res["img/class_embedding"].lr_mult == 1.0
    assert res["img/positional_embedding"].train
  else:  # BatchNorm biases and the attention-pool biases
    for n in ("img/bn1/bias", "img/layer1_0/bn3/bias", "img/layer1_0/downsample_bn/bias",
              "img/attnpool/q_proj/bias", "img/attnpool/c_proj/bias"):
      assert n in biases
    assert res["img/attnpool/positional_embedding"].lr_mult == 1.0
  # BNNeck biases do not exist (fixed at 0); classifiers have no bias.
  assert set(optim.param_names(params["head"])) == {
      "bottleneck/scale", "bottleneck_proj/scale", "classifier/kernel", "classifier_proj/kernel"}
  table = optim.rule_table(params, clipreid.stage2_rules(cfg), base_lr=5e-6, weight_decay=1e-4)
  assert "FROZEN" in table and "'.*bias.*': train lr_mult=2" in table

  # Baseline: no text side at all, the same image/head rules.
  base = clipreid.paper_config("market1501", "vit_b16" if vision == "vit" else "rn50", "baseline")
  bparams = {k: v for k, v in params.items() if k != "txt"}
  bparams["prompt"] = {k: v for k, v in params["prompt"].items() if k == "sie"}
  bres = optim.resolve(bparams, clipreid.stage2_rules(base))
  assert all(r.train for r in bres.values())


def test_bias_gets_twice_the_update():
  params, _ = _tree("vit")
  rules = clipreid.stage2_rules(clipreid.paper_config("market1501"))
  trainable, _ = optim.split(params, rules)
  trainable = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), trainable)
  tx = optim.make_optimizer(trainable, rules, name="adam", learning_rate=1e-3, weight_decay=0.0)
  grads = jax.tree.map(jnp.ones_like, trainable)
  upd, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
  np.testing.assert_allclose(upd["img"]["ln_pre"]["bias"], -2e-3, rtol=1e-4)
  np.testing.assert_allclose(upd["img"]["ln_pre"]["scale"], -1e-3, rtol=1e-4)
  # Coupled decay: wd * param joins the gradient before Adam (update sign flips for g < -wd*p).
  tx = optim.make_optimizer(trainable, rules, name="adam", learning_rate=1e-3, weight_decay=0.5)
  upd, _ = jax.jit(tx.update)(jax.tree.map(lambda g: -0.25 * g, grads), tx.init(trainable),
                              trainable)
  np.testing.assert_allclose(upd["img"]["ln_pre"]["scale"], -1e-3, rtol=1e-4)


# ------------------------------------------------------------------------- SIE

def test_sie_changes_the_output_only_through_the_class_token():
  cfg = CLIPConfig(embed_dim=16, vision="vit", vision_width=16, vision_layers=2, vision_heads=2,
                   patch_size=8, pretrained_grid=4, context_length=77, vocab_size=49408,
                   text_width=16, text_heads=2, text_layers=1).with_input((32, 16), 8)
  model = CLIP(cfg)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 16, 3)),
                          jnp.zeros((1, 77), jnp.int32))
  img = {"params": {"img": v["params"]["img"]}}
  images = jax.random.normal(jax.random.key(1), (4, 32, 16, 3))
  table = jax.random.normal(jax.random.key(2), (6, 16))
  sie = clipreid.SIESpec(camera=True, view=True, coefficient=1.5, num_views=3)
  cams, views = jnp.array([0, 1, 0, 1]), jnp.array([2, 0, -1, 1])  # -1: no view label -> 0
  cv = sie.vectors(table, cams, views)
  np.testing.assert_allclose(cv, 1.5 * table[jnp.array([2, 3, 0, 4])], rtol=1e-6)

  feats = jax.jit(lambda p, x, c: model.apply(p, x, c, method="image_features"))
  with_sie = feats(img, images, cv)
  plain = feats(img, images, None)
  assert not np.allclose(with_sie["final"], plain["final"])
  # Same as shifting each image's class embedding by its SIE vector, nothing else.
  for i in range(4):
    shifted = jax.tree.map(lambda x: x, img)
    shifted["params"]["img"] = dict(img["params"]["img"])
    shifted["params"]["img"]["class_embedding"] = img["params"]["img"]["class_embedding"] + cv[i]
    ref = feats(shifted, images[i:i + 1], None)
    for k in ("last", "final", "proj", "final_tokens"):
      np.testing.assert_allclose(with_sie[k][i:i + 1], ref[k], rtol=1e-5, atol=1e-5)
  # Off: no vectors at all.
  assert clipreid.SIESpec(False, False, 1.0, 1).vectors(table, cams, views) is None


# ------------------------------------------------------------------------- schedules

class _Loader:
  def __init__(self, lengths):
    self.lengths = lengths

  def steps_per_epoch(self, e):
    return self.lengths[e]


def test_epoch_schedule_follows_uneven_epochs():
  fn = lambda e: float(e)  # noqa: E731
  sched = schedules.per_epoch(fn, _Loader([3, 2, 4, 3]).steps_per_epoch, total_steps=10)
  got = [float(sched(s)) for s in range(10)]
  assert got == [1, 1, 1, 2, 2, 3, 3, 3, 3, 4]
  # Stage-1 cosine on the 1-based epoch (spec 3.4 values).
  f = lambda e: schedules.timm_cosine(e, base_lr=3.5e-4, t_initial=60, lr_min=1e-6,  # noqa: E731
                                      warmup_t=5, warmup_lr_init=1e-5)
  sched = schedules.per_epoch(f, _Loader([2] * 60).steps_per_epoch, total_steps=120)
  np.testing.assert_allclose([sched(0), sched(2), sched(119)], [7.8e-5, 1.46e-4, 1e-6],
                             rtol=1e-3)
