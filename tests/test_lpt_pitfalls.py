"""lpt.md 9 ("subtle details a reimplementation is likely to get wrong") and 7 (VPT), each
checked on the code path the `lpt` / `vpt` pipelines actually run, numerically where the
detail is numeric. Tiny towers and a generated long-tailed set keep it fast."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.special import erf

from jaxprompt import optim
from jaxprompt import trainer as trainer_lib
from jaxprompt.lpt import samplers as ls
from jaxprompt.lpt import evaluate as lt_eval
from jaxprompt.lpt.losses import agcl_loss
from jaxprompt.lpt import model as lpt_model
from jaxprompt.lpt import config as lpt_config
from jaxprompt.lpt import data as lpt_data
from jaxprompt.lpt import evaluate as lpt_evaluate
from jaxprompt.lpt import context as cls_common
from jaxprompt.lpt import train as lpt
from jaxprompt.lpt import baselines as vpt

TINY = dict(width=64, depth=4, heads=2, mlp_dim=128, patch=4)
GROUP = 2


def tiny_config(method: str = "lpt", epochs: int = 4, **synthetic):
  c = lpt.paper_config("synthetic", method, tiny_random=TINY, image_size=16, batch_size=16,
                       epochs=epochs)
  c.model.prompt_length = 3
  c.model.pool_size = 5
  c.model.group_layers = GROUP
  c.data.workers = 0
  c.eval.batch_size = 16
  c.eval.plots = False
  for k, v in synthetic.items():
    c.data.synthetic[k] = v
  for s in lpt_config.stage_names(method):
    c[s].progress = False
  return c


@pytest.fixture(scope="module")
def lpt_setup():
  setup = cls_common.Setup(tiny_config("lpt"))
  params = jax.device_get(setup.init_params())
  # Prompts far above the 0.02 init so that every prompt visibly moves the features.
  params["prompt"] = jax.tree.map(lambda p: np.asarray(p) * 25.0, params["prompt"])
  images = np.asarray(jax.random.normal(jax.random.key(3), (8, 16, 16, 3)), np.float32)
  return setup, params, images


# ---------------------------------------------------------------- numpy references


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _gelu(x, exact):
  if exact:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_block(x, p, heads, eps=1e-5, exact=True):
  """timm's pre-LN block (torch nn.LayerNorm eps, nn.GELU) in float64 numpy."""
  b, n, d = x.shape
  hd = d // heads
  h = _ln(x, p["ln_1"], eps)
  qkv = _dense(h, p["attn"]["qkv"]).reshape(b, n, 3, heads, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  a = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
  a = np.exp(a - a.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, d)
  x = x + _dense(o, p["attn"]["out"])
  h = _ln(x, p["ln_2"], eps)
  return x + _dense(_gelu(_dense(h, p["mlp"]["fc1"]), exact), p["mlp"]["fc2"])


def np_features(setup, params, images, prompt_for_block):
  """Embed with the tower, then every block by hand: that block's prompt tokens appended
  at the end of the sequence, the block run, the prompt outputs dropped; final LN of CLS."""
  vit, img = setup.vit, params["img"]
  x = np.asarray(vit.apply({"params": img}, images, method="embed"), np.float64)
  n = x.shape[1]
  for i in range(vit.config.depth):
    extra = prompt_for_block(i)  # (B, T, D) or None
    toks = x if extra is None else np.concatenate([x, extra], axis=1)
    x = np_block(toks, img[f"blocks_{i}"], vit.config.heads)[:, :n]
  return _ln(x[:, 0], img["norm"], 1e-5)


def np_cosine(feature, kernel):
  f = feature / np.linalg.norm(feature, axis=-1, keepdims=True)
  w = np.asarray(kernel, np.float64)
  return f @ (w / np.linalg.norm(w, axis=0, keepdims=True))


# ---------------------------------------------------------------- 9.2 backbone numerics


def test_config_builds_ln_eps_1e5_and_exact_gelu(lpt_setup, monkeypatch):
  setup, params, _ = lpt_setup
  vit = setup.vit
  assert vit.ln_eps == 1e-5 and vit.exact_gelu
  img = params["img"]
  # Tokens with a tiny spread: there LayerNorm's eps is not negligible (var ~ 1e-6).
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 7, 64)), np.float64) * 1e-3
  x += np.linspace(-3, 3, 64)[None, None] * 1e-3
  got = np.asarray(vit.apply({"params": img}, jnp.asarray(x, jnp.float32), start=0, stop=1,
                             method="run_blocks"), np.float64)
  want = np_block(x, img["blocks_0"], vit.config.heads)
  err = np.abs(got - want).max()
  assert err < 5e-5
  # The reference is sensitive to both details, so the match above means something.
  assert np.abs(np_block(x, img["blocks_0"], vit.config.heads, eps=1e-6) - want).max() > 50 * err
  big = x * 3e3  # GELU inputs of order 1 -> erf and tanh GELU differ visibly
  got_big = np.asarray(vit.apply({"params": img}, jnp.asarray(big, jnp.float32), start=0, stop=1,
                                 method="run_blocks"), np.float64)
  want_big = np_block(big, img["blocks_0"], vit.config.heads)
  err_big = np.abs(got_big - want_big).max()
  assert err_big < 1e-4
  tanh_big = np_block(big, img["blocks_0"], vit.config.heads, exact=False)
  assert np.abs(tanh_big - want_big).max() > 5 * err_big
  # Final LayerNorm (timm's norm) with eps 1e-5 too.
  feat = np.asarray(vit.apply({"params": img}, jnp.asarray(x, jnp.float32),
                              method="head_feature"))
  np.testing.assert_allclose(feat, _ln(x[:, 0], img["norm"], 1e-5), atol=5e-5)

  # Real weights: the tower loader is asked for eps 1e-5 and exact GELU.
  seen = {}

  def fake_load_vit(path, **kw):
    seen.update(kw, path=path)
    raise RuntimeError("stop")

  monkeypatch.setattr(cls_common, "load_vit", fake_load_vit)
  with pytest.raises(RuntimeError, match="stop"):
    cls_common.build_vit(lpt.paper_config("places_lt", "lpt", weights="/w/augreg.npz"))
  assert seen["ln_eps"] == 1e-5 and seen["exact_gelu"] is True and seen["image_size"] == 224


def test_normalisation_and_square_eval_resize():
  c = lpt.paper_config("places_lt", "lpt", weights="/w.npz")
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)  # wide: aspect matters
  from jaxprompt.lpt.data import LTRecord
  out = cls_common.decode_fn(c, train=False)(LTRecord(img, 3), None)
  assert out["label"] == 3 and out["image"].shape == (224, 224, 3)
  sq = np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR), np.float32)
  want = (sq[16:240, 16:240] / 255.0 - 0.5) / 0.5
  np.testing.assert_allclose(out["image"], want, atol=1e-6)
  # Resizing the shorter side to 256 (aspect kept) would be a different image.
  short = np.asarray(Image.fromarray(img).resize((426, 256), Image.BILINEAR), np.float32)
  alt = (short[16:240, 101:325] / 255.0 - 0.5) / 0.5
  assert np.abs(alt - out["image"]).mean() > 0.05
  # Train decode: mean = std = 0.5, so 0 -> -1 and 255 -> +1 whatever the crop.
  train = cls_common.decode_fn(c, train=True)
  for v, target in ((0, -1.0), (255, 1.0), (51, 51 / 127.5 - 1.0)):
    x = train(LTRecord(np.full((40, 60, 3), v, np.uint8), 0), np.random.default_rng(v))["image"]
    np.testing.assert_allclose(x, target, atol=1e-6)


# ---------------------------------------------------------------- 9.4 prompt plumbing


def test_phase1_forward_prompts_appended_and_dropped_per_block(lpt_setup):
  setup, params, images = lpt_setup
  shared = np.asarray(params["prompt"]["shared"], np.float64)
  b = images.shape[0]
  fwd = jax.jit(lpt.phase1_forward(setup))
  got = np.asarray(fwd(params, images, None)["logits"])
  feat = np_features(setup, params, images,
                     lambda i: np.broadcast_to(shared[i], (b, *shared[i].shape)))
  want = np_cosine(feat, params["head"]["kernel"])
  err = np.abs(got - want).max()
  assert err < 5e-5
  # Without prompts, or with prompt outputs carried into the next block, the result differs.
  plain = np_cosine(np_features(setup, params, images, lambda i: None), params["head"]["kernel"])
  assert np.abs(plain - want).max() > 100 * err

  vit, img = setup.vit, params["img"]
  x = np.asarray(vit.apply({"params": img}, images, method="embed"), np.float64)
  x = np.concatenate([x, np.broadcast_to(shared[0], (b, *shared[0].shape))], axis=1)
  for i in range(vit.config.depth):  # prompts inserted once, kept (VPT-shallow-like)
    x = np_block(x, img[f"blocks_{i}"], vit.config.heads)
  carried = np_cosine(_ln(x[:, 0], img["norm"], 1e-5), params["head"]["kernel"])
  assert np.abs(carried - want).max() > 100 * err


def test_phase2_forward_group_prompts_only_in_last_layers(lpt_setup):
  setup, params, images = lpt_setup
  spec = setup.spec
  depth = setup.vit.config.depth
  first_group = depth - spec.group_layers
  assert spec.group_layers == GROUP and spec.top_k == 2
  shared = np.asarray(params["prompt"]["shared"], np.float64)
  group = np.asarray(params["prompt"]["group"], np.float64)
  keys = np.asarray(params["prompt"]["keys"], np.float64)
  b = images.shape[0]
  out = jax.jit(lpt.phase2_forward(setup))(params, images, None)

  sh = lambda i: np.broadcast_to(shared[i], (b, *shared[i].shape))  # noqa: E731
  query = np_features(setup, params, images, sh)
  np.testing.assert_allclose(out["query"], query, atol=5e-5)
  sim = np_cosine(query, keys.T)
  top2 = np.argsort(-sim, axis=1)[:, :2]
  np.testing.assert_array_equal(np.asarray(out["indices"]), top2)
  np.testing.assert_allclose(out["similarity"], sim, atol=5e-5)
  g = group[top2].mean(axis=1)  # (B, G, T, D): mean of the two selections

  def both(i):
    if i < first_group:
      return sh(i)
    return np.concatenate([sh(i), g[:, i - first_group]], axis=1)

  want = np_cosine(np_features(setup, params, images, both), params["head"]["kernel"])
  err = np.abs(np.asarray(out["logits"]) - want).max()
  assert err < 5e-5
  # Group prompts in the first G blocks instead, or substituted for the shared prompt,
  # or concatenated instead of averaged, would each be a different model.
  early = np_features(setup, params, images,
                      lambda i: np.concatenate([sh(i), g[:, i]], axis=1) if i < GROUP else sh(i))
  subst = np_features(setup, params, images,
                      lambda i: sh(i) if i < first_group else g[:, i - first_group])
  cat = np_features(setup, params, images, lambda i: sh(i) if i < first_group else np.concatenate(
      [sh(i), group[top2[:, 0], i - first_group], group[top2[:, 1], i - first_group]], axis=1))
  for alt in (early, subst, cat):
    assert np.abs(np_cosine(alt, params["head"]["kernel"]) - want).max() > 100 * err


# ---------------------------------------------------------------- 9.5 / 9.6 init and head


def _kurtosis(x):
  x = np.asarray(x, np.float64).ravel()
  x = x - x.mean()
  return float((x ** 4).mean() / (x ** 2).mean() ** 2)


def test_inits_from_the_pipeline():
  setup = cls_common.Setup(tiny_config("lpt"))
  p = jax.device_get(setup.init_params())
  for name in ("shared", "group", "keys"):
    v = np.asarray(p["prompt"][name])
    assert abs(v.std() - 0.02) < 0.002, name
    assert abs(v.mean()) < 0.003, name
    # Gaussian (kurtosis 3), not a uniform of the same std (1.8) or VPT's +-0.0625.
    assert 2.5 < _kurtosis(v) < 3.6, name
  k = np.asarray(p["head"]["kernel"])
  assert set(p["head"]) == {"kernel"}
  assert k.shape == (64, setup.train.num_classes)  # stored in x out
  np.testing.assert_allclose(np.linalg.norm(k, axis=0), 1.0, rtol=1e-5)

  # VPT baselines: uniform(-v, v) prompts, linear head N(0, 2 / C) with bias -log(99).
  vsetup = cls_common.Setup(tiny_config("vpt_deep", num_classes=40, max_count=40, min_count=2))
  vp = jax.device_get(vsetup.init_params())
  d = np.asarray(vp["prompt"]["deep"])
  bound = math.sqrt(6.0 / (3 * 4 * 4 + 64))
  assert np.abs(d).max() <= bound and np.abs(d).max() > 0.95 * bound
  assert abs(_kurtosis(d) - 1.8) < 0.2
  kern = np.asarray(vp["head"]["kernel"])
  assert abs(kern.std() - math.sqrt(2.0 / 40)) < 0.1 * math.sqrt(2.0 / 40)
  np.testing.assert_allclose(vp["head"]["bias"], -math.log(99.0), rtol=1e-6)


def test_cosine_head_is_scale_free_and_scale_20_is_in_the_loss(lpt_setup):
  setup, params, images = lpt_setup
  fwd = jax.jit(lpt.phase1_forward(setup))
  base = np.asarray(fwd(params, images, None)["logits"])
  assert np.abs(base).max() <= 1.0 + 1e-6
  # Rescaling any class column leaves the logits unchanged: per-column normalisation,
  # no bias, no learnable temperature.
  scaled = dict(params, head={"kernel": np.asarray(params["head"]["kernel"])
                              * np.linspace(0.1, 7.0, setup.train.num_classes)[None]})
  np.testing.assert_allclose(fwd(scaled, images, None)["logits"], base, atol=1e-5)
  # The pipeline loss applies s = 20 itself, to the raw cosines.
  counts = setup.counts
  labels = jnp.arange(images.shape[0]) % setup.train.num_classes
  loss_fn = cls_common.make_loss_fn(setup.config, lambda p, x, r: {"logits": jnp.asarray(base)},
                                    counts)
  key = jax.random.key(9)
  loss, _ = loss_fn({}, {}, {"image": images, "label": labels}, key)
  _, k_cb, _ = jax.random.split(key, 3)
  c = jnp.asarray(counts, jnp.float32)
  want = agcl_loss(jnp.asarray(base), labels, c, k_cb, scale=20.0)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  assert abs(float(agcl_loss(jnp.asarray(base), labels, c, k_cb, scale=1.0)) - float(want)) > 0.1
  # Fresh cloud noise for every step key.
  other, _ = loss_fn({}, {}, {"image": images, "label": labels}, jax.random.key(10))
  assert float(other) != float(loss)


# ---------------------------------------------------------------- 9.7 dropout


def _identity_head(params, width):
  return dict(params, head={"kernel": np.eye(width, dtype=np.float32)})


def test_dropout_on_the_feature_in_training_only(lpt_setup):
  setup, params, images = lpt_setup
  assert setup.spec.dropout == 0.1
  width = setup.vit.config.width
  # With an identity "head" the logits are feature / ||feature||: dropped entries are 0,
  # kept ones are proportional to the (pre-dropout) feature.
  p = _identity_head(params, width)
  imgs = np.concatenate([images, images[::-1]], axis=0)  # 16 rows -> 1024 feature entries
  for forward in (lpt.phase1_forward(setup), lpt.phase2_forward(setup)):
    fwd = jax.jit(forward)
    clean = np.asarray(fwd(p, imgs, None)["logits"])
    assert np.all(clean != 0)
    np.testing.assert_array_equal(clean, np.asarray(fwd(p, imgs, None)["logits"]))
    drops = []
    for seed in range(3):
      out = fwd(p, imgs, jax.random.key(seed))
      noisy = np.asarray(out["logits"])
      kept = noisy != 0
      drops.append(1.0 - kept.mean())
      ratio = noisy / clean
      for r, k in zip(ratio, kept):  # kept entries: one positive factor per row
        np.testing.assert_allclose(r[k], r[k][0], rtol=2e-4)
        assert r[k][0] > 0
      if "query" in out:  # phase 2: no dropout on the query path or the feature output
        ref = fwd(p, imgs, None)
        np.testing.assert_array_equal(np.asarray(out["query"]), np.asarray(ref["query"]))
        np.testing.assert_array_equal(np.asarray(out["indices"]), np.asarray(ref["indices"]))
        np.testing.assert_array_equal(np.asarray(out["feature"]), np.asarray(ref["feature"]))
    assert abs(np.mean(drops) - 0.1) < 0.025, drops
  # Evaluation (make_predict) never drops.
  pred = lpt_model.make_predict(setup.vit, setup.spec, phase=2)(p, imgs)
  np.testing.assert_array_equal(np.asarray(pred["logits"]), clean)


# ---------------------------------------------------------------- 9.14 / 9.6 optimiser


def _torch_sgd(params, grads, lrs, wd, momentum=0.9):
  """torch.optim.SGD(momentum, weight_decay) written out: d = g + wd p (coupled L2)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {}
  for lr in lrs:
    for k in p:
      d = grads[k] + wd * p[k]
      buf[k] = d if k not in buf else momentum * buf[k] + d
      p[k] = p[k] - lr * buf[k]
  return p


def _flat(tree):
  return {"/".join(str(getattr(q, "key", q)) for q in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_lpt_sgd_coupled_l2_per_epoch_schedule(lpt_setup):
  setup, params, _ = lpt_setup
  cfg = setup.config.phase2
  epochs, spe = int(cfg.total_epochs), 3
  lr = 0.02 * 16 / 256
  assert cfg.optimizer.lr == pytest.approx(lr)
  tr, _ = optim.split(params, lpt.PHASE2_RULES)
  tx, schedule = cls_common.make_tx(cfg, spe)(tr, lpt.PHASE2_RULES, epochs * spe)
  got = [float(schedule(s)) for s in range(epochs * spe)]
  want = [1e-6 if e == 0 else lr * 0.5 * (1 + math.cos(math.pi * e / epochs))
          for e in range(epochs) for _ in range(spe)]
  np.testing.assert_allclose(got, want, rtol=1e-6)

  rng = np.random.default_rng(0)
  flat = _flat(tr)
  assert set(flat) == {"head/kernel", "prompt/group", "prompt/keys"}
  grads = {k: rng.normal(size=v.shape) * (0.0 if k == "head/kernel" else 1.0)
           for k, v in flat.items()}
  g_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tr),
                                        [jnp.asarray(grads[k], jnp.float32) for k in flat])
  state = tx.init(tr)
  cur = tr
  n = spe + 2  # across the epoch boundary
  for _ in range(n):
    upd, state = tx.update(g_tree, state, cur)
    cur = jax.tree.map(lambda a, b: a + b, cur, upd)
  ref = _torch_sgd(flat, grads, want[:n], wd=0.01)
  for k, v in _flat(cur).items():
    np.testing.assert_allclose(v, ref[k], rtol=1e-5, atol=1e-9, err_msg=k)
  # Zero gradient on the head: it still shrinks (wd on the head weight too).
  assert np.linalg.norm(_flat(cur)["head/kernel"]) < np.linalg.norm(flat["head/kernel"])


def test_vpt_no_weight_decay_on_head_bias_and_warmup_cosine():
  c = tiny_config("vpt_deep", epochs=6)
  c.train.optimizer.warmup_epochs = 2
  setup = cls_common.Setup(c)
  params = jax.device_get(setup.init_params())
  cfg = c.train
  spe = 2
  tr, _ = optim.split(params, vpt.TRAIN_RULES)
  assert set(_flat(tr)) == {"head/bias", "head/kernel", "prompt/deep"}
  tx, schedule = cls_common.make_tx(cfg, spe)(tr, vpt.TRAIN_RULES, 6 * spe)
  base = 0.1 * 16 / 256
  assert cfg.optimizer.lr == pytest.approx(base) and cfg.optimizer.weight_decay == 0.01
  # VPT's WarmupCosineSchedule, stepped after each epoch: epoch 0 at lr 0.
  want = [base * (e / 2 if e < 2 else 0.5 * (1 + math.cos(math.pi * (e - 2) / 4)))
          for e in range(6) for _ in range(spe)]
  np.testing.assert_allclose([float(schedule(s)) for s in range(6 * spe)], want, rtol=1e-6,
                             atol=1e-12)
  # Zero gradients over steps with lr > 0: decay moves the prompt and the head weight,
  # never the head bias (VPT: no weight decay on last_layer.bias).
  zero = jax.tree.map(jnp.zeros_like, tr)
  state, cur = tx.init(tr), tr
  for _ in range(6):
    upd, state = tx.update(zero, state, cur)
    cur = jax.tree.map(lambda a, b: a + b, cur, upd)
  before, after = _flat(tr), _flat(cur)
  np.testing.assert_array_equal(after["head/bias"], before["head/bias"])
  for k in ("head/kernel", "prompt/deep"):
    assert np.abs(after[k] - before[k]).max() > 0, k


# ---------------------------------------------------------------- run wiring


def test_stage_wiring_counts_sampling_weights_epoch_length(tmp_path, monkeypatch):
  c = tiny_config("lpt", epochs=4)
  calls = []
  counts_seen = []
  real_loss_fn = cls_common.make_loss_fn

  def spy_loss_fn(config, forward, class_counts):
    counts_seen.append(np.asarray(class_counts).copy())
    return real_loss_fn(config, forward, class_counts)

  def fake_run_stage(cfg, **kw):
    calls.append(dict(kw, cfg=cfg))
    return None

  monkeypatch.setattr(cls_common, "make_loss_fn", spy_loss_fn)
  monkeypatch.setattr(trainer_lib, "run_stage", fake_run_stage)
  lpt.run(c, str(tmp_path), stage="phase1")
  lpt.run(c, str(tmp_path), stage="phase2")
  assert [k["stage"] for k in calls] == ["phase1", "phase2"]
  assert calls[0]["rules"] == lpt.PHASE1_RULES and calls[1]["rules"] == lpt.PHASE2_RULES

  train, _ = lpt_data.load_datasets(c)
  n, bsz, epochs = len(train), 16, 4
  labels = train.labels
  # Class counts of the A-GCL cloud come from the training data.
  for seen in counts_seen:
    np.testing.assert_array_equal(seen, np.bincount(labels, minlength=train.num_classes))
  assert counts_seen[0].max() == 60 and counts_seen[0].min() == 3

  for call in calls:
    loader = call["loader"]
    assert isinstance(loader, cls_common.DualLoader)
    steps = n // bsz + 1  # the reference loop length, not the sampler's
    assert loader.steps_per_epoch(0) == steps
    assert isinstance(loader.cb.sampler, ls.ClassAwareSampler)
    assert loader.cb.sampler.num_samples_cls == 4
    assert isinstance(loader.ib.sampler, ls.InstanceBalancedSampler)
    assert loader.cb.seed != loader.ib.seed
    for e in range(epochs):
      batch = next(iter(loader.iterate(e)))
      np.testing.assert_allclose(batch["ib_weight"], 0.5 * (epochs - e) / epochs, rtol=1e-6)
      cb = np.asarray(batch["cb"]["label"]).reshape(-1, 4)
      assert np.all(cb == cb[:, :1]) and np.unique(cb[:, 0]).size == bsz // 4
      assert np.unique(np.asarray(batch["ib"]["label"])).size > 1
    # The schedule holds the warm-up lr for the whole first epoch of `steps` steps.
    _, schedule = call["make_tx"]({"head": {"kernel": np.zeros((2, 2), np.float32)}},
                                  [(".*", optim.Rule())], epochs * steps)
    assert float(schedule(steps - 1)) == pytest.approx(1e-6)
    assert float(schedule(steps)) == pytest.approx(
        c.phase1.optimizer.lr * 0.5 * (1 + math.cos(math.pi / epochs)), rel=1e-6)
  assert calls[0]["loader"].cb.seed != calls[1]["loader"].cb.seed


def test_recipe_values():
  c = lpt.paper_config("places_lt", "lpt", weights="/w.npz")
  for stage in ("phase1", "phase2"):
    o = c[stage].optimizer
    assert (o.name, o.lr, o.weight_decay, o.coupled_decay) == ("sgd", 0.02, 0.01, True)
    assert (o.hparams.momentum, o.hparams.nesterov) == (0.9, False)
    assert (o.schedule, o.warmup_epochs, o.warmup_lr_init) == ("lpt_cosine", 1, 1e-6)
    assert c[stage].total_epochs == 90 and c[stage].seed == 42
  m, d, lo = c.model, c.data, c.loss
  assert (m.prompt_length, m.pool_size, m.group_layers, m.top_k) == (10, 20, 6, 2)
  assert (m.dropout, m.prompt_dropout, m.head, m.prompt_init) == (0.1, 0.0, "cosine",
                                                                   "trunc_normal")
  assert (m.ln_eps, m.exact_gelu, m.image_size) == (1e-5, True, 224)
  assert tuple(d.mean) == tuple(d.std) == (0.5, 0.5, 0.5)
  assert (d.batch_size, d.sampling, d.num_samples_cls, d.ib_start_weight) == (256, "dual", 4, 0.5)
  assert d.resize == 0 and tuple(d.crop_scale) == (0.08, 1.0)
  assert (lo.kind, lo.margin, lo.scale, lo.noise_mul, lo.label_smoothing) == (
      "agcl", 0.1, 20.0, 0.5, 0.1)
  assert lo.noise_std == pytest.approx(1 / 3) and lo.match_weight == 0.5
  assert (lo.cb_gamma_pos, lo.cb_gamma_neg, lo.ib_gamma_pos, lo.ib_gamma_neg) == (0, 4, 0.5, 8)
  assert c.eval.convention == "lpt"
  v = lpt.paper_config("places_lt", "vpt_deep", weights="/w.npz")
  o = v.train.optimizer
  assert (v.model.head, v.model.prompt_init, v.model.prompt_dropout) == ("linear", "vpt_uniform",
                                                                        0.1)
  assert (o.schedule, o.warmup_epochs, v.train.total_epochs, o.weight_decay) == (
      "vpt_cosine", 10, 100, 0.01)
  assert v.data.batch_size == 128 and o.lr == pytest.approx(0.1 * 128 / 256)
  assert lpt.paper_config("places_lt", "vpt_shallow").model.prompt_dropout == 0.0
  # VPT's backbone runs in eval mode and its head is one Linear: no feature dropout.
  for method in ("vpt_deep", "vpt_shallow", "linear"):
    assert lpt.paper_config("places_lt", method).model.dropout == 0.0


# ---------------------------------------------------------------- 9.16 buckets


def test_eval_buckets_from_train_counts_lpt_convention(tmp_path):
  # Train counts 400 / 89 / 20 (one class exactly at 20); 10 test images per class.
  c = tiny_config("lpt", num_classes=3, max_count=400, min_count=20, test_per_class=10)
  setup = cls_common.Setup(c)
  np.testing.assert_array_equal(setup.counts, [400, 89, 20])
  res = lpt_evaluate.evaluate_params(setup, str(tmp_path), "phase1", setup.init_params(),
                                   phase=1, predict_images=False)
  assert res["convention"] == "lpt"
  assert res["classes_per_bucket"] == {"many": 1, "medium": 1, "few": 1}
  preds = np.load(tmp_path / "eval" / "phase1" / "predictions.npy")
  labels = setup.test.labels
  for conv, out in (("lpt", res), ("oltr", res["oltr_convention"])):
    want = lt_eval.shot_accuracy(preds, labels, [400, 89, 20], conv)
    for k in ("overall", "many", "medium", "few"):
      got, ref = out[k], 100.0 * want[k]
      assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref), (conv, k)
  # Under OLTR the 20-image class is medium and few is empty.
  assert math.isnan(res["oltr_convention"]["few"])
  per_class = np.asarray(res["per_class_accuracy"], np.float64)
  assert res["few"] == pytest.approx(per_class[2])
