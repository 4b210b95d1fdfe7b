"""CLIP-ReID pipeline end to end on a tiny Market-1501-layout dataset with a tiny random CLIP.

The dataset is written by the test in Market-1501's real layout and naming
(`Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/0002_c1s1_000451_03.jpg`),
with a distractor (pid 0) and a junk image (pid -1) in the gallery.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxprompt import optim
from jaxprompt import trainer
from jaxprompt.clipreid import config as clipreid_config
from jaxprompt.clipreid import train as clipreid
from jaxprompt.clipreid import context as reid_common

TRAIN_IDS = (2, 7, 11, 15, 23, 42)
TEST_IDS = (101, 102, 103, 104)


def _image(rng, pid: int, size=(32, 16)) -> Image.Image:
  # An identity colour plus noise, so identities are (weakly) separable.
  base = np.random.default_rng(pid + 1).integers(40, 215, size=3)
  x = base[None, None, :] + rng.normal(0, 25, size=(*size, 3))
  return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def make_market(root: str, train_ids=TRAIN_IDS, per_cam: int = 2) -> str:
  """A tiny Market-1501 (folder layout and file names as released); returns `root`."""
  base = os.path.join(root, "Market-1501-v15.09.15")
  if os.path.isdir(base):
    return root
  rng = np.random.default_rng(0)
  dirs = {s: os.path.join(base, s) for s in ("bounding_box_train", "query", "bounding_box_test")}
  for d in dirs.values():
    os.makedirs(d)

  def save(split, pid, cam, i):
    name = f"{pid:04d}_c{cam}s1_{1000 + i:06d}_0{i % 3 + 1}.jpg" if pid >= 0 else \
        f"-1_c{cam}s1_{1000 + i:06d}_01.jpg"
    _image(rng, pid).save(os.path.join(dirs[split], name), quality=95)

  for pid in train_ids:
    for cam in (1, 2):
      for i in range(per_cam):
        save("bounding_box_train", pid, cam, i)
  for pid in TEST_IDS:
    save("query", pid, 1, 0)
    for i in range(2):
      save("bounding_box_test", pid, 2 + i, i)
  save("bounding_box_test", 0, 3, 7)   # distractor, stays in the gallery
  save("bounding_box_test", -1, 3, 8)  # junk, skipped by the reader
  return root


def tiny_config(root: str, vision: str = "vit", variant: str = "clipreid"):
  """The paper recipe for Market-1501 shrunk by `clipreid_config.tiny`, trained by epochs
  (2 per stage)."""
  c = clipreid_config.tiny(
      clipreid.paper_config("market1501", "vit_b16" if vision == "vit" else "rn50", variant),
      root)
  for s in (c.stage1, c.stage2):
    s.total_steps = 0
    s.total_epochs = 2
    s.log_every_steps = 2
  c.eval.grid_queries = 2
  c.eval.grid_topk = 3
  return c


@pytest.fixture(scope="module")
def market(tmp_path_factory):
  return make_market(str(tmp_path_factory.mktemp("market")))


def _final_steps(workdir):
  from jaxprompt import checkpoint as ck
  return {s: ck.final_step(ck.checkpoint_dir(workdir, s)) for s in ("stage1", "stage2")}


def test_vit_sie_end_to_end_resume_extract_and_refusal(market, tmp_path, monkeypatch, capsys):
  cfg = tiny_config(market, "vit")
  cfg.eval.plots = True
  cfg.model.sie_camera = True
  cfg.model.sie_coe = 1.0
  # The tiny set's test cameras (3, 4) are not train cameras: out of the 2-row table.
  cfg.model.sie_clamp = True
  wd = str(tmp_path / "run")
  res = clipreid.run(cfg, wd)
  out = capsys.readouterr().out
  assert "Dataset market1501 statistics" in out and "gallery" in out
  steps = _final_steps(wd)
  assert steps["stage1"] == 6 and steps["stage2"] is not None and steps["stage2"] > 0
  assert os.path.isfile(os.path.join(wd, "stage1", "image_features.npz"))
  assert json.load(open(os.path.join(wd, "stage1", "identity_map.json")))["orig_ids"] == \
      list(TRAIN_IDS)
  r = res["eval"]
  assert 0.0 <= r["mAP"] <= 1.0 and 0.0 <= r["R1"] <= 1.0
  assert r["num_query"] == 4 and r["num_gallery"] == 9  # 8 + the distractor; junk skipped
  for f in ("results.json", "cmc.png", "ranked.png"):
    assert os.path.isfile(os.path.join(wd, "eval", f))
  assert res["stage2"].params["prompt"]["sie"].shape == (2, 32)  # 2 train cameras x width

  # Rerun: nothing recomputed, nothing retrained.
  monkeypatch.setattr(reid_common.BatchedApply, "__call__",
                      lambda *a, **k: pytest.fail("features recomputed on resume"))
  monkeypatch.setattr(trainer, "jit_train_step",
                      lambda *a, **k: pytest.fail("a finished stage was retrained"))
  res2 = clipreid.run(cfg, wd)
  assert res2["eval"]["mAP"] == r["mAP"]
  assert _final_steps(wd) == steps
  monkeypatch.undo()

  # Extraction from the trained run.
  cfg.extract.images = os.path.join(market, "Market-1501-v15.09.15", "query")
  cfg.extract.out = str(tmp_path / "emb.npz")
  clipreid.run(cfg, wd, stage="extract")
  with np.load(cfg.extract.out) as f:
    assert f["features"].shape == (4, 32 + 32)  # final (ViT width) + proj (embed dim)
    np.testing.assert_allclose(np.linalg.norm(f["features"], axis=1), 1.0, rtol=1e-5)
    assert len(f["paths"]) == 4

  # Stage 2 refuses a stage-1 checkpoint trained on another set of identities.
  other = make_market(str(tmp_path / "other"), train_ids=TRAIN_IDS[:-1])
  cfg2 = tiny_config(other, "vit")
  cfg2.model.sie_camera = True
  with pytest.raises(ValueError, match="identity count mismatch"):
    clipreid.run(cfg2, wd, stage="stage2")


def test_rn_end_to_end(market, tmp_path):
  cfg = tiny_config(market, "resnet")
  cfg.model.tiny.width = 8
  cfg.stage1.total_epochs = 1
  cfg.stage2.total_epochs = 1
  wd = str(tmp_path / "rn")
  res = clipreid.run(cfg, wd)
  assert 0.0 <= res["eval"]["mAP"] <= 1.0
  ms = res["stage2"].state["model_state"]["batch_stats"]
  assert set(ms) == {"img", "head"}
  # The tower's BatchNorms ran in train mode: running statistics moved from the pretrained.
  _, v = clipreid.load_backbone(cfg)
  before = v["batch_stats"]["img"]["bn1"]["mean"]
  assert not np.allclose(np.asarray(ms["img"]["bn1"]["mean"]), before)


def test_baseline_runs(market, tmp_path):
  cfg = tiny_config(market, "vit", "baseline")
  cfg.stage2.total_epochs = 1
  wd = str(tmp_path / "base")
  res = clipreid.run(cfg, wd)
  assert "stage1" not in res and 0.0 <= res["eval"]["mAP"] <= 1.0
  assert set(res["stage2"].params) == {"img", "head"}
  with pytest.raises(ValueError, match="unknown stage"):
    clipreid.run(cfg, wd, stage="stage1")


def _fixed_batch(ctx, n=8):
  ds = ctx.dataset
  dec = ctx.decode(True)
  recs = [r for pid in range(4) for r in [x for x in ds.train if x.pid == pid][:2]]
  samples = [dec(r, np.random.default_rng(i)) for i, r in enumerate(recs[:n])]
  return {k: jnp.asarray(np.stack([s[k] for s in samples])) for k in samples[0]}


def _descend(loss_fn, params, model_state, rules, batch, lr, steps=6):
  trainable, frozen = optim.split(params, rules)
  tx = optim.make_optimizer(trainable, rules, name="adam", learning_rate=lr, weight_decay=1e-4)
  state = dict(params=trainable, model_state=model_state, opt=tx.init(trainable),
               step=jnp.zeros((), jnp.int32))
  step = jax.jit(lambda s, b: trainer.train_step(s, frozen, b, jax.random.key(0),
                                                 loss_fn=loss_fn, tx=tx))
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return losses


def test_losses_go_down_on_a_fixed_batch(market):
  cfg = tiny_config(market, "vit")
  ctx = clipreid.Context(cfg, "/nonexistent")
  model, v = ctx.clip
  ds = ctx.dataset
  batch = _fixed_batch(ctx)

  # Stage 1: cls_ctx only, on cached-style features.
  from jaxprompt.clipreid import model as m
  prompt = m.build_text_prompt(model, {"params": {"txt": v["params"]["txt"]}},
                               m.template_for("market1501"))
  feats = model.apply({"params": {"img": v["params"]["img"]}}, batch["image"],
                      method="image_features")["proj"]
  params = {"txt": v["params"]["txt"],
            "prompt": {"cls_ctx": m.init_identity_tokens(jax.random.key(0), ds.num_train_pids, 32)}}
  l1 = _descend(clipreid.make_stage1_loss_fn(model, prompt), params, {}, clipreid.STAGE1_RULES,
                {"feat": feats, "pid": batch["pid"]}, lr=3e-2)
  assert l1[-1] < l1[0]

  # Stage 2: full loss (ID + triplet + i2t) with the pipeline's rules.
  head = clipreid.head_module(ds.num_train_pids)
  hv = head.init(jax.random.key(1), jnp.zeros((2, 32)), jnp.zeros((2, 32)))
  cls_ctx = params["prompt"]["cls_ctx"]
  text = clipreid.text_features_all(model, v["params"]["txt"], prompt, np.asarray(cls_ctx), 8)
  full = {"img": v["params"]["img"], "txt": v["params"]["txt"], "head": hv["params"],
          "prompt": {"cls_ctx": cls_ctx, "text_feats": text}}
  loss_fn = clipreid.make_stage2_loss_fn(model, head, cfg, ctx.sie_spec())
  l2 = _descend(loss_fn, full, {"batch_stats": {"head": hv["batch_stats"]}},
                clipreid.stage2_rules(cfg), batch, lr=1e-3)
  assert l2[-1] < l2[0]
