"""bf16 compute against float32 on CPU: forward features, losses, gradients, a short curve.

Tolerances (bf16 keeps 8 mantissa bits, a relative step of 2**-8 = 0.4% per rounding):
features and logits within 5% of their float32 scale, losses within 3%, and a 30-step
training curve on a tiny CLIP-ReID-like problem within 5% of float32 at every step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprompt import precision, trainer
from jaxprompt.clipreid import losses as reid_losses
from jaxprompt.models.clip import CLIP, CLIPConfig
from jaxprompt.clipreid.model import ReIDHead

B, IDS, H, W = 8, 4, 32, 16


def _cfg() -> CLIPConfig:
  return CLIPConfig(embed_dim=32, vision="vit", vision_width=64, vision_layers=2, vision_heads=2,
                    patch_size=8, pretrained_grid=4, context_length=8, vocab_size=50,
                    text_width=32, text_heads=2, text_layers=1).with_input((H, W), patch_stride=8)


def _data(seed=0):
  rs = np.random.RandomState(seed)
  labels = np.repeat(np.arange(IDS), B // IDS).astype(np.int32)
  # Identity-dependent images, so training can separate them.
  protos = rs.randn(IDS, H, W, 3).astype(np.float32)
  images = protos[labels] + 0.5 * rs.randn(B, H, W, 3).astype(np.float32)
  text = rs.randn(IDS, 32).astype(np.float32)
  return {"image": images, "pid": labels}, text


def _setup():
  model, head = CLIP(_cfg()), ReIDHead(IDS)
  batch, text = _data()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, H, W, 3)),
                                  jnp.zeros((1, 8), jnp.int32))
  hv = head.init(jax.random.key(1), jnp.zeros((2, 64)), jnp.zeros((2, 32)))
  params = {"img": variables["params"]["img"], "head": hv["params"]}
  return model, head, params, {"batch_stats": {"head": hv["batch_stats"]}}, batch, text


def _loss_fn(model, head, text):
  """The stage-2 objective: label-smoothed ID on both classifiers + batch-hard triplet on
  the three features + i2t CE (CLIP-ReID's losses, from jaxprompt.clipreid.losses)."""
  def loss_fn(params, model_state, batch, rng):
    del rng
    feats = model.apply({"params": {"img": params["img"]}}, batch["image"], None, True,
                        method="image_features")
    out, upd = head.apply({"params": params["head"],
                           "batch_stats": model_state["batch_stats"]["head"]},
                          feats["final"], feats["proj"], train=True, mutable=["batch_stats"])
    labels = batch["pid"]
    l_id = (reid_losses.cross_entropy_label_smooth(out["logits"], labels, 0.1)
            + reid_losses.cross_entropy_label_smooth(out["logits_proj"], labels, 0.1))
    l_tri = sum(reid_losses.batch_hard_triplet(feats[k], labels, 0.3)
                for k in ("last", "final", "proj"))
    l_i2t = reid_losses.i2t_cross_entropy(feats["proj"], jnp.asarray(text), labels, 0.1)
    loss = l_id + l_tri + l_i2t
    return loss, ({"batch_stats": {"head": upd["batch_stats"]}},
                  {"l_id": l_id, "l_tri": l_tri, "l_i2t": l_i2t, "logits": out["logits"],
                   "proj": feats["proj"]})
  return loss_fn


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_bf16_features_logits_and_losses_close_to_float32():
  model, head, params, mstate, batch, text = _setup()
  loss_fn = _loss_fn(model, head, text)

  @functools.partial(jax.jit, static_argnums=0)
  def run(dtype, params, batch):
    p = precision.cast_floating(params, dtype)
    b = precision.cast_floating(batch, dtype)
    return loss_fn(p, mstate, b, None)

  l32, (_, m32) = run(jnp.float32, params, batch)
  l16, (_, m16) = run(jnp.bfloat16, params, batch)
  assert m16["proj"].dtype == jnp.float32  # features come back in float32
  assert _rel(m16["proj"], m32["proj"]) < 0.05
  assert _rel(m16["logits"], m32["logits"]) < 0.05
  for k in ("l_id", "l_tri", "l_i2t"):
    assert abs(float(m16[k]) - float(m32[k])) <= 0.03 * abs(float(m32[k])) + 1e-3, k
  assert abs(float(l16) - float(l32)) <= 0.03 * abs(float(l32))
  # The comparison is not vacuous: bf16 really rounds something.
  assert _rel(m16["proj"], m32["proj"]) > 0


def test_bf16_training_curve_close_to_float32():
  model, head, params, mstate, batch, text = _setup()
  loss_fn = _loss_fn(model, head, text)

  def strip(fn):  # the trainer keeps scalar metrics only
    def wrapped(*a):
      loss, (ms, m) = fn(*a)
      return loss, (ms, {k: v for k, v in m.items() if k.startswith("l_")})
    return wrapped

  tx = optax.adam(3e-4)
  curves = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    state = dict(params=params, model_state=mstate, opt=tx.init(params),
                 step=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(trainer.train_step, loss_fn=strip(loss_fn), tx=tx,
                                     dtype=dtype))
    losses = []
    for _ in range(30):
      state, metrics = step(state, {}, batch, jax.random.key(0))
      losses.append(float(metrics["loss"]))
    # Parameters and optimizer state stay float32 under bf16 compute.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    curves[dtype] = np.array(losses)
  f32, bf16 = curves[jnp.float32], curves[jnp.bfloat16]
  assert f32[-1] < 0.7 * f32[0]  # it does train
  np.testing.assert_allclose(bf16, f32, rtol=0.05)
  assert not np.array_equal(bf16, f32)


@pytest.mark.parametrize("name,expected", [("bfloat16", jnp.bfloat16), ("fp32", jnp.float32),
                                           (None, jnp.float32)])
def test_compute_dtype_names(name, expected):
  assert precision.compute_dtype(name) == expected


def test_compute_dtype_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown precision 'fp8'"):
    precision.compute_dtype("fp8")
