"""CLIP-ReID details a reimplementation is likely to get wrong (spec section 9), each checked on
the pipeline's own code path against a hand-composed numpy reference.

The stages are captured, not trained: `trainer.run_stage` is replaced by a function that
returns what the pipeline hands it (init, loss_fn, rules, loader, make_tx), so the losses,
text features, optimizer and schedules below are exactly those a real run would use.
"""
from __future__ import annotations

import inspect
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from test_clipreid_pipeline import make_market, tiny_config  # noqa: E402

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import optim
from jaxprompt import tokenizer
from jaxprompt import trainer
from jaxprompt.convert.io import flatten
from jaxprompt.clipreid import transforms
from jaxprompt.clipreid.samplers import IdentitySampler, RandomSampler
from jaxprompt.models import layers
from jaxprompt.models.clip import CLIP
from jaxprompt.clipreid import train as clipreid

PERSON_TEMPLATE = "A photo of a X X X X person."
STAGE1_BATCH = 5  # does not divide the 24 training images: the last batch is partial


# ------------------------------------------------------------------------- numpy references

def _log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - x.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


def _ce_ls(logits, labels, eps):
  k = logits.shape[1]
  target = (1.0 - eps) * np.eye(k)[labels] + eps / k
  return float(np.mean(-(target * _log_softmax(logits)).sum(1)))


def _triplet(x, labels, margin=0.3):
  x = np.asarray(x, np.float64)
  d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 1e-12))
  same = labels[:, None] == labels[None]
  d_ap = np.where(same, d, -np.inf).max(1)
  d_an = np.where(same, np.inf, d).min(1)
  return float(np.mean(np.maximum(d_ap - d_an + margin, 0.0)))


def _supcon(a, c, la, lc):
  logp = _log_softmax(np.asarray(a, np.float64) @ np.asarray(c, np.float64).T)
  pos = la[:, None] == lc[None]
  return float(-np.mean((logp * pos).sum(1) / pos.sum(1)))


def _bn_train(x, scale, eps=1e-5):
  x = np.asarray(x, np.float64)
  return (x - x.mean(0)) / np.sqrt(x.var(0) + eps) * np.asarray(scale, np.float64)


def _l2n(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _hand_text_features(model, txt, cls_ctx):
  """Template tokens embedded, positions 5..8 replaced by the identity tokens, EOT output."""
  ids = np.asarray(tokenizer.tokenize([PERSON_TEMPLATE]))
  eot = int(ids[0].argmax())
  emb = np.asarray(model.apply({"params": {"txt": txt}}, jnp.asarray(ids),
                               method="embed_tokens"))[0]
  n = cls_ctx.shape[0]
  e = np.repeat(emb[None], n, 0)
  e[:, 5:9] = np.asarray(cls_ctx)
  out = model.apply({"params": {"txt": txt}}, jnp.asarray(e), jnp.full((n,), eot, jnp.int32),
                    method="encode_text_embeddings")
  return np.asarray(out, np.float64), eot


def _test_images(ctx, records):
  """The reference test transform, written out: PIL bilinear resize, [0, 1], normalise."""
  out = []
  for r in records:
    img = transforms.load_image(r.path).resize(ctx.size[::-1], resample=2)  # 2 = BILINEAR
    x = np.asarray(img, np.float32) / np.float32(255.0)
    out.append((x - np.float32(ctx.mean)) / np.float32(ctx.std))
  return np.stack(out)


# ------------------------------------------------------------------------- captured stages

@pytest.fixture(scope="module")
def market(tmp_path_factory):
  return make_market(str(tmp_path_factory.mktemp("market")))


def _capture(market, vision, workdir):
  """(ctx, stage-1 kwargs, stage-2 kwargs, cls_ctx, stage-2 params, stage-2 model state)."""
  cfg = tiny_config(market, vision)
  if vision == "resnet":
    cfg.model.tiny.width = 8
  # The paper's schedule lengths (tiny_config shortens the warmups).
  cfg.stage1.total_epochs, cfg.stage1.lr_schedule.warmup_t = 120 if vision == "vit" else 60, 5
  cfg.stage1.batch_size = STAGE1_BATCH
  cfg.stage2.total_epochs, cfg.stage2.lr_schedule.warmup_iters = 60 if vision == "vit" else 120, 10
  ctx = clipreid.Context(cfg, workdir)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "run_stage", lambda c, **kw: dict(kw, cfg=c))
    s1 = clipreid.run_stage1(ctx)
    width = ctx.clip[1]["params"]["txt"]["token_embedding"].shape[1]
    cls_ctx = 0.5 * np.random.default_rng(0).standard_normal(
        (ctx.dataset.num_train_pids, 4, width)).astype(np.float32)
    mp.setattr(ckpt_lib, "read_params",
               lambda wd, stage: ({"prompt": {"cls_ctx": cls_ctx}}, {}) if stage == "stage1"
               else pytest.fail(f"unexpected read of {stage}"))
    s2 = clipreid.run_stage2(ctx)
    params, state = s2["init"](jax.random.key(0))
  return ctx, s1, s2, cls_ctx, params, state


@pytest.fixture(scope="module")
def vit_run(market, tmp_path_factory):
  return _capture(market, "vit", str(tmp_path_factory.mktemp("vit_run")))


@pytest.fixture(scope="module")
def rn_run(market, tmp_path_factory):
  return _capture(market, "resnet", str(tmp_path_factory.mktemp("rn_run")))


def _batch(loader, epoch=0):
  return {k: jnp.asarray(v) for k, v in next(loader.iterate(epoch)).items()}


# ------------------------------------------------------------------------- item 1: stage-1 loss

def test_stage1_loss_is_supcon_tau1_on_raw_features(vit_run):
  ctx, s1, _, _, _, _ = vit_run
  model, v = ctx.clip
  params, state = s1["init"](jax.random.key(3))
  cls_ctx = np.asarray(params["prompt"]["cls_ctx"])
  assert cls_ctx.shape == (6, 4, 32) and 0.015 < cls_ctx.std() < 0.025  # N(0, 0.02)
  batch = _batch(s1["loader"])
  loss, (_, met) = jax.jit(s1["loss_fn"])(params, state, batch, jax.random.key(0))

  y = np.asarray(batch["pid"])
  text, _ = _hand_text_features(model, v["params"]["txt"], cls_ctx)
  text = text[y]
  img = np.asarray(batch["feat"], np.float64)
  i2t, t2i = _supcon(img, text, y, y), _supcon(text, img, y, y)
  assert float(met["loss_i2t"]) == pytest.approx(i2t, rel=1e-4)
  assert float(met["loss_t2i"]) == pytest.approx(t2i, rel=1e-4)
  assert float(loss) == pytest.approx(i2t + t2i, rel=1e-4)
  # The check can tell: CLIP-style normalisation or a logit scale give other values.
  assert not np.allclose(np.linalg.norm(img, axis=1), 1.0, atol=0.05)
  for other in (_supcon(_l2n(img), _l2n(text), y, y) + _supcon(_l2n(text), _l2n(img), y, y),
                _supcon(100 * img, text, y, y) + _supcon(100 * text, img, y, y)):
    assert abs(other - float(loss)) > 1e-3


# ------------------------------------------------------------------------- item 2: stage-1 cache

def test_stage1_cache_is_pretrained_test_transform_vit(vit_run):
  ctx, _, _, _, _, _ = vit_run
  model, v = ctx.clip
  with np.load(os.path.join(ctx.workdir, "stage1", "image_features.npz")) as f:
    cached = f["features"]
  assert cached.dtype == np.float32 and cached.shape == (len(ctx.dataset.train), 32)
  x = _test_images(ctx, ctx.dataset.train)
  want = model.apply({"params": {"img": v["params"]["img"]}}, x, method="image_features")["proj"]
  np.testing.assert_allclose(cached, want, atol=1e-5, rtol=1e-5)


def test_stage1_cache_rn_uses_eval_mode_batchnorm(rn_run):
  ctx, _, _, _, _, _ = rn_run
  model, v = ctx.clip
  with np.load(os.path.join(ctx.workdir, "stage1", "image_features.npz")) as f:
    cached = f["features"]
  x = _test_images(ctx, ctx.dataset.train)
  assert ctx.mean == transforms.IMAGENET_MEAN and ctx.std == transforms.IMAGENET_STD
  variables = {"params": {"img": v["params"]["img"]}, "batch_stats": {"img": v["batch_stats"]["img"]}}
  apply = jax.jit(model.apply, static_argnames=("method", "train", "mutable"))
  want = apply(variables, x, method="image_features")["proj"]
  np.testing.assert_allclose(cached, want, atol=1e-5, rtol=1e-5)
  train_mode, _ = apply(variables, x, train=True, method="image_features",
                        mutable=("batch_stats",))
  assert np.abs(np.asarray(train_mode["proj"]) - cached).max() > 1e-3


# ------------------------------------------------------------------------- item 3: stage-1 batches

def test_stage1_batches_are_random_shuffles_of_every_image(vit_run):
  ctx, s1, _, _, _, _ = vit_run
  loader, n = s1["loader"], len(ctx.dataset.train)
  assert isinstance(loader.sampler, RandomSampler) and n % STAGE1_BATCH
  orders = [np.asarray(loader.sampler.epoch_indices(e)) for e in range(3)]
  for e, order in enumerate(orders):
    # Every image is used each epoch: the partial last batch is not dropped (it is topped up
    # from the same permutation so all batches have one shape).
    assert set(order.tolist()) == set(range(n))
    assert loader.steps_per_epoch(e) == -(-n // STAGE1_BATCH)
  assert not np.array_equal(orders[0], orders[1])
  with np.load(os.path.join(ctx.workdir, "stage1", "image_features.npz")) as f:
    cached = f["features"]
  pids = np.asarray([r.pid for r in ctx.dataset.train])
  batches = list(loader.iterate(0))
  for b, batch in enumerate(batches):
    idx = orders[0][b * STAGE1_BATCH:(b + 1) * STAGE1_BATCH]
    np.testing.assert_array_equal(batch["feat"], cached[idx])
    np.testing.assert_array_equal(batch["pid"], pids[idx])
  # Not an identity (P x K) sampler: the batches' identity counts are not all K.
  counts = [np.unique(b["pid"], return_counts=True)[1] for b in batches]
  assert any(len(set(c.tolist())) > 1 or c[0] != ctx.config.data.num_instances for c in counts)


# ------------------------------------------------------------------------- item 4: text features

def test_stage2_text_features_all_ids_raw_once_and_frozen(vit_run):
  ctx, _, s2, cls_ctx, params, _ = vit_run
  model, v = ctx.clip
  text = np.asarray(params["prompt"]["text_feats"])
  hand, eot = _hand_text_features(model, v["params"]["txt"], cls_ctx)
  assert eot == 11
  assert text.shape == (ctx.dataset.num_train_pids, 32) and text.dtype == np.float32
  np.testing.assert_allclose(text, hand, rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=0.05)  # not normalised
  with np.load(os.path.join(ctx.workdir, "stage2", "text_features.npz")) as f:
    np.testing.assert_array_equal(f["features"], text)
  res = optim.resolve(params, s2["rules"])
  assert not res["prompt/text_feats"].train and not res["prompt/cls_ctx"].train
  assert all(not r.train for n, r in res.items() if n.startswith("txt/"))
  assert all(r.train for n, r in res.items() if n.startswith(("img/", "head/")))


# ------------------------------------------------------------------------- items 8, 9, 15, 18: stage-2 loss

def _hand_stage2(ctx, params, state, batch, w_id):
  model, _ = ctx.clip
  variables = {"params": {"img": params["img"]}}
  if "img" in state["batch_stats"]:
    variables["batch_stats"] = {"img": state["batch_stats"]["img"]}
  feats, _ = model.apply(variables, batch["image"], None, True, method="image_features",
                         mutable=["batch_stats"])
  f = {k: np.asarray(feats[k], np.float64) for k in ("last", "final", "proj")}
  y = np.asarray(batch["pid"])
  h = params["head"]
  logits = _bn_train(f["final"], h["bottleneck"]["scale"]) @ np.asarray(h["classifier"]["kernel"])
  logits_p = (_bn_train(f["proj"], h["bottleneck_proj"]["scale"])
              @ np.asarray(h["classifier_proj"]["kernel"]))
  l_id = _ce_ls(logits, y, 0.1) + _ce_ls(logits_p, y, 0.1)
  tri = {k: _triplet(f[k], y) for k in ("last", "final", "proj")}
  l_i2t = _ce_ls(f["proj"] @ np.asarray(params["prompt"]["text_feats"], np.float64).T, y, 0.1)
  return dict(loss=w_id * l_id + sum(tri.values()) + l_i2t, loss_id=l_id,
              loss_triplet=sum(tri.values()), loss_i2t=l_i2t, tri=tri, feats=f, y=y)


@pytest.mark.parametrize("vision,w_id", [("vit", 0.25), ("resnet", 1.0)])
def test_stage2_loss_is_the_hand_composed_sum(vision, w_id, request):
  ctx, _, s2, _, params, state = request.getfixturevalue(f"{'vit' if vision == 'vit' else 'rn'}_run")
  assert ctx.config.loss.id_weight == w_id and ctx.config.loss.label_smoothing == 0.1
  batch = _batch(s2["loader"])
  y = np.asarray(batch["pid"])
  k = ctx.config.data.num_instances
  assert (y.reshape(-1, k) == y.reshape(-1, k)[:, :1]).all()  # P x K
  loss, (new_state, met) = jax.jit(s2["loss_fn"])(params, state, batch, jax.random.key(0))
  want = _hand_stage2(ctx, params, state, batch, w_id)
  for key in ("loss_id", "loss_triplet", "loss_i2t"):
    assert float(met[key]) == pytest.approx(want[key], rel=1e-4), key
  assert float(loss) == pytest.approx(want["loss"], rel=1e-4)
  # The three triplet features are distinct (layer-11 / layer3 feature included).
  tri = list(want["tri"].values())
  assert min(abs(a - b) for i, a in enumerate(tri) for b in tri[i + 1:]) > 1e-4

  # BNNecks: torch momentum 0.1 and the unbiased batch variance; beta does not exist.
  f = want["feats"]
  for name, feat in (("bottleneck", f["final"]), ("bottleneck_proj", f["proj"])):
    st = new_state["batch_stats"]["head"][name]
    np.testing.assert_allclose(st["mean"], 0.1 * feat.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(st["var"], 0.9 + 0.1 * feat.var(0, ddof=1), rtol=1e-4)
    assert set(params["head"][name]) == {"scale"}
  # Bias-free classifiers from N(0, 0.001).
  for name in ("classifier", "classifier_proj"):
    assert set(params["head"][name]) == {"kernel"}
    assert 7e-4 < float(np.std(params["head"][name]["kernel"])) < 1.3e-3
  if vision == "resnet":  # the tower's BatchNorms ran on batch statistics
    assert not np.allclose(new_state["batch_stats"]["img"]["bn1"]["mean"],
                           state["batch_stats"]["img"]["bn1"]["mean"])


def test_stage2_loss_sharded_batch_has_single_device_statistics(vit_run):
  ctx, _, s2, _, params, state = vit_run
  devices = jax.devices()
  batch = _batch(s2["loader"])
  if len(devices) < 2 or batch["pid"].shape[0] % len(devices):
    pytest.skip("needs a batch that splits over several devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
  loss, (new_state, _) = jax.jit(s2["loss_fn"])(params, state, sharded, jax.random.key(0))
  want = _hand_stage2(ctx, params, state, batch, 0.25)
  assert float(loss) == pytest.approx(want["loss"], rel=1e-4)
  st = new_state["batch_stats"]["head"]["bottleneck"]
  np.testing.assert_allclose(st["var"], 0.9 + 0.1 * want["feats"]["final"].var(0, ddof=1),
                             rtol=1e-4)


def test_test_embedding_is_normalised_pre_bn_concat(vit_run):
  ctx, _, _, _, params, _ = vit_run
  model, _ = ctx.clip
  fn = ctx.embed_fn("test", ctx.sie_spec(), int(ctx.config.eval.batch_size))
  records = ctx.dataset.query + ctx.dataset.gallery
  got = fn(fn.place({"img": params["img"], "sie": None, "batch_stats": None}), records,
           ctx.decode(False))
  f = model.apply({"params": {"img": params["img"]}}, _test_images(ctx, records),
                  method="image_features")
  cat = np.concatenate([np.asarray(f["final"]), np.asarray(f["proj"])], axis=1)
  assert got.shape == (len(records), 64)
  np.testing.assert_allclose(got, _l2n(cat), atol=2e-5)
  # Normalised as a whole, not per part.
  parts = np.concatenate([_l2n(f["final"]), _l2n(f["proj"])], axis=1) / np.sqrt(2)
  assert np.abs(parts - got).max() > 1e-3


# ------------------------------------------------------------------------- items 10-12: optimizer

def test_stage1_schedule_and_coupled_decay(vit_run):
  _, s1, _, _, _, _ = vit_run
  params, _ = s1["init"](jax.random.key(3))
  trainable, _ = optim.split(params, s1["rules"])
  assert optim.param_names(trainable) == ["prompt/cls_ctx"]
  spe = s1["loader"].steps_per_epoch(0)
  total = 120 * spe
  tx, lr = s1["make_tx"](trainable, s1["rules"], total)
  cos = lambda e: 1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + np.cos(np.pi * e / 120))  # noqa: E731
  for step, want in ((0, 7.8e-5), (spe - 1, 7.8e-5), (spe, 1.46e-4), (4 * spe, cos(5)),
                     (59 * spe, cos(60)), (total - spe - 1, cos(119)), (total - 1, 1e-6)):
    assert float(lr(step)) == pytest.approx(want, rel=1e-5), step
  # Coupled L2 (torch Adam): with a zero loss gradient the first step is -lr * sign(wd * p),
  # not AdamW's -lr * wd * p.
  p = np.asarray(trainable["prompt"]["cls_ctx"], np.float64)
  upd, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, trainable), tx.init(trainable),
                              trainable)
  g = 1e-4 * p
  np.testing.assert_allclose(upd["prompt"]["cls_ctx"], -7.8e-5 * g / (np.abs(g) + 1e-8),
                             rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_stage2_epoch_lr_bias_2x_and_coupled_decay(vision, request):
  ctx, _, s2, _, params, _ = request.getfixturevalue(f"{'vit' if vision == 'vit' else 'rn'}_run")
  vit = vision == "vit"
  base, wd, factor = (5e-6, 1e-4, 0.1) if vit else (3.5e-4, 5e-4, 0.01)
  trainable, _ = optim.split(params, s2["rules"])
  loader = s2["loader"]
  assert isinstance(loader.sampler, IdentitySampler)
  lens = [loader.steps_per_epoch(e) for e in range(ctx.config.stage2.total_epochs)]
  starts = np.concatenate([[0], np.cumsum(lens)])
  tx, lr = s2["make_tx"](trainable, s2["rules"], int(starts[-1]))
  m1 = factor * (1 - 0.1) + 0.1  # 0.19 (ViT) or 0.109 (CNN) in epoch 1, not the factor
  assert m1 == pytest.approx(0.19 if vit else 0.109)
  first, second = (30, 50) if vit else (40, 70)
  for epoch, mult in ((1, m1), (2, factor * 0.8 + 0.2), (9, factor * 0.1 + 0.9), (10, 1.0),
                      (first - 1, 1.0), (first, 0.1), (second, 0.01)):
    s = int(starts[epoch - 1])
    assert float(lr(s)) == pytest.approx(mult * base, rel=1e-5), epoch
    assert float(lr(int(starts[epoch]) - 1)) == pytest.approx(mult * base, rel=1e-5), epoch

  step = jax.jit(tx.update)
  state = tx.init(trainable)
  ones, _ = step(jax.tree.map(jnp.ones_like, trainable), state, trainable)
  zeros, _ = step(jax.tree.map(jnp.zeros_like, trainable), state, trainable)
  flat_p, flat_1, flat_0 = (flatten(jax.device_get(t)) for t in (trainable, ones, zeros))
  lr1 = m1 * base
  n_bias = 0
  for name, p in flat_p.items():
    p = np.asarray(p, np.float64)
    mult = 2.0 if "bias" in name else 1.0
    n_bias += "bias" in name
    g = 1.0 + wd * p
    np.testing.assert_allclose(flat_1[name], -mult * lr1 * g / (np.abs(g) + 1e-8), rtol=1e-4,
                               err_msg=name)
    # Decay reaches every trained parameter (norm scales, embeddings, SIE, classifiers).
    g = wd * p
    np.testing.assert_allclose(flat_0[name], -mult * lr1 * g / (np.abs(g) + 1e-8), rtol=1e-3,
                               atol=1e-15, err_msg=name)
  assert n_bias > 5
  names = set(flat_p)
  if vit:
    assert {"img/class_embedding", "img/positional_embedding", "img/ln_pre/scale",
            "img/blocks_0/attn/qkv/bias"} <= names
  else:
    assert {"img/bn1/scale", "img/bn1/bias", "img/attnpool/positional_embedding"} <= names


# ------------------------------------------------------------------------- items 5, 6, 7: geometry

def _grid_after(cfg):
  return tuple(clipreid.tiny_clip_config(cfg).grid)


def test_grids_last_stride_and_sie_placement(market):
  vit = tiny_config(market, "vit")
  vit.model.tiny.patch_size = 16
  vit.data.size = (256, 128)
  vit.model.stride = 16
  assert _grid_after(vit) == (16, 8)
  vit.model.stride = 12
  assert _grid_after(vit) == (21, 10)
  rn = clipreid.paper_config("market1501", "rn50")
  assert rn.model.last_stride == 1
  rn.model.tiny_random, rn.model.tiny.vision = True, "resnet"
  assert _grid_after(rn) == (16, 8)  # 256x128 / 16 with last stride 1
  rn.model.last_stride = 2
  assert _grid_after(rn) == (8, 4)
  # SIE is a ViT-only option.
  rn.model.sie_camera = True
  with pytest.raises(ValueError, match="ViT towers only"):
    clipreid.run(rn, "/nonexistent")


def test_position_embedding_resize_is_torch_bilinear_without_antialias():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for old, new in (((14, 14), (16, 8)), ((14, 14), (21, 10)), ((7, 7), (16, 8))):
    pe = rng.standard_normal((1 + old[0] * old[1], 6)).astype(np.float32)
    got = np.asarray(layers.resize_grid_embedding(jnp.asarray(pe), old, new))
    grid = torch.from_numpy(pe[1:].reshape(1, *old, 6)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=new, mode="bilinear", align_corners=False,
                                          antialias=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    np.testing.assert_array_equal(got[0], pe[0])  # class row kept
    np.testing.assert_allclose(got[1:], ref, atol=1e-5)
    if new[1] < old[1]:  # width 14 -> 8 is a downsample, where antialiasing would differ
      aa = torch.nn.functional.interpolate(grid, size=new, mode="bilinear", align_corners=False,
                                           antialias=True).permute(0, 2, 3, 1).reshape(-1, 6)
      assert np.abs(aa.numpy() - got[1:]).max() > 1e-2


# ------------------------------------------------------------------------- item 13: precision

def test_precision_defaults(vit_run):
  ctx, _, _, _, params, _ = vit_run
  assert clipreid.base_config().precision == "float32"
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------- item 14: preprocessing

def test_pipeline_preprocessing(vit_run, rn_run):
  ctx, _, _, _, _, _ = vit_run
  assert (ctx.mean, ctx.std) == ((0.5,) * 3, (0.5,) * 3)
  assert (rn_run[0].mean, rn_run[0].std) == (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  rec = ctx.dataset.train[0]
  np.testing.assert_allclose(ctx.decode(False)(rec, None)["image"], _test_images(ctx, [rec])[0],
                             atol=1e-6)
  # Training decode: bicubic resize, flip 0.5, pad 10 (black), crop, erasing 0.5.
  sig = inspect.signature(transforms.reid_train_transform).parameters
  assert (sig["flip_p"].default, sig["pad"].default, sig["erase_p"].default) == (0.5, 10, 0.5)
  img = transforms.load_image(rec.path)
  for seed in range(4):
    got = ctx.decode(True)(rec, np.random.default_rng(seed))["image"]
    want = transforms.reid_train_transform(img, np.random.default_rng(seed), ctx.size, ctx.mean,
                                           ctx.std)
    np.testing.assert_array_equal(got, want)
  # No erasing, no flip: what remains is a bicubic resize then a crop of the 10-px black pad.
  x = transforms.reid_train_transform(img, np.random.default_rng(0), ctx.size, ctx.mean,
                                      ctx.std, flip_p=0.0, erase_p=0.0)
  big = np.asarray(img.resize(ctx.size[::-1], resample=3), np.float32) / 255.0  # 3 = BICUBIC
  big = np.pad((big - 0.5) / 0.5, ((10, 10), (10, 10), (0, 0)), constant_values=-1.0)
  h, w = ctx.size
  hits = [(t, l) for t in range(21) for l in range(21)
          if np.allclose(big[t:t + h, l:l + w], x, atol=1e-6)]
  assert hits


# ------------------------------------------------------------------------- item 15: Flax defaults

def test_layer_norm_eps_quick_gelu_and_batchnorm_momentum(vit_run, rn_run):
  seen = {"ln": set(), "act": set(), "bn": set()}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.LayerNorm):
      seen["ln"].add(mod.epsilon)
    elif isinstance(mod, layers.Block):
      seen["act"].add(mod.act)
    elif isinstance(mod, layers.BatchNorm):
      seen["bn"].add((mod.momentum, mod.epsilon))
    return next_fun(*args, **kwargs)

  for run in (vit_run, rn_run):
    ctx, _, _, _, params, state = run
    model, v = ctx.clip
    h, w = ctx.size
    with nn.intercept_methods(interceptor):
      model.apply(v, jnp.zeros((1, h, w, 3)), jnp.zeros((1, 77), jnp.int32))
      d, dp = (params["head"][k]["kernel"].shape[0] for k in ("classifier", "classifier_proj"))
      clipreid.head_module(6).apply({"params": params["head"],
                                     "batch_stats": state["batch_stats"]["head"]},
                                    jnp.ones((2, d)), jnp.ones((2, dp)))
  assert seen["ln"] == {1e-5}
  assert seen["act"] == {"quick_gelu"}
  assert seen["bn"] == {(0.1, 1e-5)}
  assert isinstance(vit_run[0].clip[0], CLIP)
