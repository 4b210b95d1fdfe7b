"""LPT / VPT model pieces: inits, per-sample reference of phase 2, fused inference, counts."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.lpt.losses import AGCL_CB, AGCL_IB, agcl_loss, phase2_objective, reduced_similarity
from jaxprompt.lpt import model as lpt_model
from jaxprompt.models.vit import ViT, ViTConfig
from jaxprompt.lpt import config as lpt_config
from jaxprompt.lpt import context as cls_common

DEPTH, WIDTH, GROUP, POOL, T, C = 4, 64, 2, 5, 3, 7


@pytest.fixture(scope="module")
def tiny():
  vit, img = cls_common.tiny_vit(dict(width=WIDTH, depth=DEPTH, heads=1, mlp_dim=128, patch=4,
                                      seed=0), 16)
  spec = lpt_model.PromptSpec(method="lpt", num_classes=C, prompt_length=T, pool_size=POOL,
                              group_layers=GROUP, top_k=2)
  tr = lpt_model.init_trainables(jax.random.key(1), vit.config, spec)
  # Larger prompts than the 0.02 init so that they visibly change the features.
  tr["prompt"] = jax.tree.map(lambda p: p * 20.0, tr["prompt"])
  params = {"img": img, **tr}
  images = jax.random.normal(jax.random.key(2), (6, 16, 16, 3))
  return vit, spec, params, images


def per_sample_phase2(vit, params, images, spec):
  """Reference: one sample at a time, prompts concatenated by hand block by block."""
  v = {"params": params["img"]}
  shared = np.asarray(params["prompt"]["shared"])
  keys = np.asarray(params["prompt"]["keys"])
  group = np.asarray(params["prompt"]["group"])
  kernel = np.asarray(params["head"]["kernel"])
  first_group = DEPTH - spec.group_layers

  def run(img, extra_fn):
    x = vit.apply(v, img[None], method="embed")
    n = x.shape[1]
    for i in range(DEPTH):
      toks = jnp.concatenate([x, jnp.asarray(extra_fn(i))[None]], axis=1)
      x = vit.apply(v, toks, start=i, stop=i + 1, method="run_blocks")[:, :n]
    return np.asarray(vit.apply(v, x, method="head_feature"))[0]

  logits, idxs, sims = [], [], []
  for b in range(images.shape[0]):
    q = run(images[b], lambda i: shared[i])
    sim = (q / np.linalg.norm(q)) @ (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
    top = np.argsort(-sim)[:spec.top_k]
    g = group[top].mean(axis=0)
    f = run(images[b], lambda i: shared[i] if i < first_group
            else np.concatenate([shared[i], g[i - first_group]]))
    logits.append((f / np.linalg.norm(f)) @ (kernel / np.linalg.norm(kernel, axis=0)))
    idxs.append(top)
    sims.append(sim)
  return np.stack(logits), np.stack(idxs), np.stack(sims)


def test_phase2_matches_per_sample_reference(tiny):
  vit, spec, params, images = tiny
  ref_logits, ref_idx, ref_sim = per_sample_phase2(vit, params, images, spec)
  for fused in (True, False):
    out = jax.jit(lambda p, x: lpt_model.phase2_forward(vit, p, x, spec, fused=fused))(params,
                                                                                       images)
    np.testing.assert_array_equal(np.asarray(out["indices"]), ref_idx)
    np.testing.assert_allclose(out["similarity"], ref_sim, atol=1e-5)
    np.testing.assert_allclose(out["logits"], ref_logits, atol=1e-5)
  # The group prompts change the result (the test would be vacuous otherwise).
  phase1 = lpt_model.classifier_forward(vit, params, images, spec)
  assert np.abs(np.asarray(phase1) - ref_logits).max() > 1e-3
  assert len({tuple(r) for r in ref_idx}) > 1  # different samples pick different groups


def test_fused_inference_equals_two_passes(tiny):
  vit, spec, params, images = tiny
  fused = lpt_model.make_predict(vit, spec, fused=True)(params, images)
  # Two separately compiled passes (one jit would let XLA merge the shared blocks).
  naive = lpt_model.make_two_pass_predict(vit, spec)(params, images)
  np.testing.assert_allclose(fused["logits"], naive["logits"], atol=1e-5)
  np.testing.assert_allclose(fused["feature"], naive["feature"], atol=1e-5)
  np.testing.assert_array_equal(fused["indices"], naive["indices"])
  np.testing.assert_array_equal(fused["pred"], naive["pred"])


def test_phase2_gradients_reach_only_what_should_train(tiny):
  vit, spec, params, images = tiny

  def loss(p):
    out = lpt_model.phase2_forward(vit, p, images, spec)
    return out["logits"].sum() - 0.5 * reduced_similarity(out["similarity"], out["indices"])

  g = jax.grad(loss)(params)
  assert float(jnp.abs(g["prompt"]["shared"]).max()) == 0.0  # frozen: stop_gradient
  assert float(jnp.abs(g["prompt"]["keys"]).max()) > 0.0
  assert float(jnp.abs(g["prompt"]["group"]).max()) > 0.0
  assert float(jnp.abs(g["head"]["kernel"]).max()) > 0.0


def test_inits():
  cfg = ViTConfig(patch=16, width=768, depth=12, heads=12, mlp_dim=3072, grid=(14, 14))
  assert lpt_model.vpt_uniform_bound(cfg) == pytest.approx(0.0625)
  small = ViTConfig(patch=4, width=64, depth=4, heads=1, mlp_dim=128, grid=(4, 4))
  spec = lpt_model.PromptSpec(method="lpt", num_classes=50, prompt_length=10, pool_size=20,
                              group_layers=2)
  tr = lpt_model.init_trainables(jax.random.key(0), small, spec)
  assert float(jnp.std(tr["prompt"]["group"])) == pytest.approx(0.02, rel=0.05)
  np.testing.assert_allclose(jnp.linalg.norm(tr["head"]["kernel"], axis=0), 1.0, rtol=1e-5)
  assert set(tr["head"]) == {"kernel"}
  vpt = lpt_model.init_trainables(jax.random.key(0), small, lpt_model.PromptSpec(
      method="vpt_deep", num_classes=50, prompt_init="vpt_uniform", head="linear"))
  v = lpt_model.vpt_uniform_bound(small)
  d = vpt["prompt"]["deep"]
  assert d.shape == (4, 10, 64) and float(jnp.abs(d).max()) <= v
  assert float(jnp.abs(d).max()) > 0.9 * v
  assert vpt["head"]["bias"].shape == (50,)
  lin = lpt_model.init_trainables(jax.random.key(0), small, lpt_model.PromptSpec(
      method="linear", num_classes=5))
  assert "prompt" not in lin
  sh = lpt_model.init_trainables(jax.random.key(0), small, lpt_model.PromptSpec(
      method="vpt_shallow", num_classes=5))
  assert sh["prompt"]["shallow"].shape == (10, 64)


def test_vit_b16_parameter_counts_via_eval_shape():
  cfg = ViTConfig(patch=16, width=768, depth=12, heads=12, mlp_dim=3072, grid=(14, 14))
  vit = ViT(cfg, ln_eps=1e-5)
  spec = lpt_model.PromptSpec(method="lpt", num_classes=365)
  shapes = lpt_model.param_shapes(vit, spec)
  assert shapes["prompt"]["shared"].shape == (12, 10, 768)
  assert shapes["prompt"]["group"].shape == (20, 6, 10, 768)
  assert shapes["prompt"]["keys"].shape == (20, 768)
  assert shapes["head"]["kernel"].shape == (768, 365)
  n = lpt_model.parameter_counts(shapes, spec)
  assert n["shared"] == 92_160 and n["group"] == 921_600 and n["keys"] == 15_360
  assert n["prompts"] == 1_013_760 and round(n["prompts"] / 1e6, 2) == 1.01
  assert n["head"] == 280_320
  assert n["backbone"] == 85_798_656
  assert n["phase1_trainable"] == 92_160 + 280_320
  assert n["phase2_trainable"] == 921_600 + 15_360 + 280_320
  vpt = lpt_model.parameter_counts(
      lpt_model.param_shapes(vit, lpt_model.PromptSpec(method="vpt_deep", num_classes=365)),
      lpt_model.PromptSpec(method="vpt_deep", num_classes=365))
  assert vpt["prompts"] == 92_160  # the paper's "0.09M" VPT row


def test_agcl_wiring_dual_batch():
  """The loss is [AGCL_CB - 0.5 rs_CB] + w [AGCL_IB - 0.5 rs_IB] with data class counts."""
  config = lpt_config.base_config("lpt")
  counts = np.array([50, 20, 5, 2])
  rng = np.random.default_rng(0)
  b = 4
  logits = jnp.asarray(rng.uniform(-1, 1, (2 * b, 4)), jnp.float32)
  sim = jnp.asarray(rng.uniform(-1, 1, (2 * b, 5)), jnp.float32)
  idx = jnp.asarray(np.argsort(-np.asarray(sim), axis=1)[:, :2], jnp.int32)
  seen = {}

  def forward(params, images, key):
    seen["batch"] = images.shape[0]
    return {"logits": logits, "similarity": sim, "indices": idx}

  loss_fn = cls_common.make_loss_fn(config, forward, counts)
  batch = {"cb": {"image": jnp.zeros((b, 2, 2, 3)), "label": jnp.array([0, 1, 2, 3])},
           "ib": {"image": jnp.zeros((b, 2, 2, 3)), "label": jnp.array([0, 0, 1, 2])},
           "ib_weight": jnp.full((b,), 0.3)}
  key = jax.random.key(5)
  loss, (_, metrics) = loss_fn({}, {}, batch, key)
  assert seen["batch"] == 2 * b  # one forward for both halves
  _, k_cb, k_ib = jax.random.split(key, 3)
  cnt = jnp.asarray(counts, jnp.float32)
  l_cb = agcl_loss(logits[:b], batch["cb"]["label"], cnt, k_cb, **AGCL_CB)
  l_ib = agcl_loss(logits[b:], batch["ib"]["label"], cnt, k_ib, **AGCL_IB)
  rs_cb = reduced_similarity(sim[:b], idx[:b])
  rs_ib = reduced_similarity(sim[b:], idx[b:])
  want = phase2_objective(l_cb, rs_cb, l_ib, rs_ib, 0.3)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss_ib"], l_ib, rtol=1e-6)
  # Phase 1 (no pool): no matching term.
  loss_fn1 = cls_common.make_loss_fn(config, lambda p, x, k: {"logits": logits}, counts)
  loss1, _ = loss_fn1({}, {}, batch, key)
  np.testing.assert_allclose(loss1, l_cb + 0.3 * l_ib, rtol=1e-6)


def test_dropout_only_in_training(tiny):
  vit, spec, params, images = tiny
  a = lpt_model.classifier_forward(vit, params, images, spec)
  b = lpt_model.classifier_forward(vit, params, images, spec)
  np.testing.assert_array_equal(a, b)
  c = lpt_model.classifier_forward(vit, params, images, spec, rng=jax.random.key(0))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
  assert np.abs(np.asarray(c)).max() <= 1.0 + 1e-5  # cosine logits
  assert math.isfinite(float(jnp.sum(c)))
