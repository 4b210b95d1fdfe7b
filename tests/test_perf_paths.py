"""The performance paths keep the numerics: fused attention, rematerialised blocks, donation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt import trainer
from jaxprompt.models import layers
from jaxprompt.models.clip import CLIP, CLIPConfig
from jaxprompt.models.vit import ViT, ViTConfig


def _einsum_attention(q, k, v, bias=None):
  """The textbook formula, the reference for `layers.attention`."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def test_attention_matches_the_formula_with_and_without_a_causal_bias():
  rs = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rs.randn(2, 7, 3, 16), jnp.float32) for _ in range(3))
  np.testing.assert_allclose(layers.attention(q, k, v), _einsum_attention(q, k, v),
                             rtol=1e-5, atol=1e-6)
  mask = layers.causal_mask(7)
  np.testing.assert_allclose(layers.attention(q, k, v, mask), _einsum_attention(q, k, v, mask),
                             rtol=1e-5, atol=1e-6)
  # The causal bias really masks: the first query sees only the first key.
  np.testing.assert_allclose(layers.attention(q, k, v, mask)[:, 0], v[:, 0], rtol=1e-6)


def _tiny_clip(remat: bool) -> CLIP:
  cfg = CLIPConfig(embed_dim=32, vision="vit", vision_width=64, vision_layers=3, vision_heads=2,
                   patch_size=8, pretrained_grid=4, context_length=8, vocab_size=50,
                   text_width=32, text_heads=2, text_layers=1).with_input((32, 16), patch_stride=8)
  return CLIP(cfg, remat=remat)


def _grads_and_outputs(model, variables, images, method=None):
  def loss(params):
    out = model.apply({"params": params}, images, **({"method": method} if method else {}))
    out = out["proj"] if isinstance(out, dict) else out
    return jnp.sum(jnp.sin(out)), out
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_remat_clip_tower_same_outputs_and_grads():
  images = jnp.asarray(np.random.RandomState(1).randn(3, 32, 16, 3), jnp.float32)
  plain, remat = _tiny_clip(False), _tiny_clip(True)
  variables = jax.jit(plain.init)(jax.random.key(0), images, jnp.zeros((1, 8), jnp.int32))
  (l0, o0), g0 = _grads_and_outputs(plain, variables, images, "image_features")
  (l1, o1), g1 = _grads_and_outputs(remat, variables, images, "image_features")
  np.testing.assert_allclose(o1, o0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  _close_grads(g0, g1)


def _close_grads(g0, g1):
  """Same gradients up to float32 summation order: 1e-5 of each leaf's largest entry."""
  assert jax.tree.structure(g0) == jax.tree.structure(g1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def _remat_in_jaxpr(fn, *args) -> bool:
  return "checkpoint" in str(jax.make_jaxpr(fn)(*args)) or "remat" in str(jax.make_jaxpr(fn)(*args))


def test_remat_vit_same_outputs_grads_and_is_really_rematerialised():
  cfg = ViTConfig(patch=8, width=64, depth=2, heads=2, mlp_dim=128, grid=(2, 2))
  images = jnp.asarray(np.random.RandomState(2).randn(2, 16, 16, 3), jnp.float32)
  plain, remat = ViT(cfg), ViT(cfg, remat=True)
  params = jax.jit(plain.init)(jax.random.key(0), images)
  (l0, o0), g0 = _grads_and_outputs(plain, params, images)
  (l1, o1), g1 = _grads_and_outputs(remat, params, images)
  np.testing.assert_allclose(o1, o0, rtol=1e-6, atol=1e-6)
  _close_grads(g0, g1)
  grad_fn = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, images)))
  assert _remat_in_jaxpr(grad_fn(remat), params)
  assert not _remat_in_jaxpr(grad_fn(plain), params)


def test_train_step_donates_the_state():
  """With `donate_argnames='state'` the step updates the state in place: every input
  buffer of the state is consumed, and XLA aliases at least the whole state."""
  cfg = ViTConfig(patch=8, width=64, depth=1, heads=2, mlp_dim=128, grid=(2, 2))
  vit = ViT(cfg)
  images = jnp.asarray(np.random.RandomState(3).randn(4, 16, 16, 3), jnp.float32)
  params = jax.jit(vit.init)(jax.random.key(0), images)["params"]

  def loss_fn(p, model_state, batch, rng):
    del rng
    out = vit.apply({"params": p}, batch["image"])
    return jnp.mean((out - 1.0) ** 2), (model_state, {})

  tx = optax.adam(1e-3)
  state = dict(params=params, model_state={}, opt=tx.init(params), step=jnp.zeros((), jnp.int32))
  step = jax.jit(functools.partial(trainer.train_step, loss_fn=loss_fn, tx=tx),
                 donate_argnames=("state",))
  batch = {"image": images}
  rng = jax.random.key(1)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  mem = step.lower(state, {}, batch, rng).compile().memory_analysis()
  if mem is not None:  # backends without the analysis return None
    assert mem.alias_size_in_bytes >= state_bytes, (mem.alias_size_in_bytes, state_bytes)
  leaves = jax.tree.leaves(state)
  new_state, _ = step(state, {}, batch, rng)
  jax.block_until_ready(new_state)
  assert all(x.is_deleted() for x in leaves)
  # And without donation nothing is consumed (the check above can fail).
  plain = jax.jit(functools.partial(trainer.train_step, loss_fn=loss_fn, tx=tx))
  leaves = jax.tree.leaves(new_state)
  jax.block_until_ready(plain(new_state, {}, batch, rng))
  assert not any(x.is_deleted() for x in leaves)


def test_attention_implementation_setting():
  rs = np.random.RandomState(4)
  q, k, v = (jnp.asarray(rs.randn(1, 5, 2, 8), jnp.float32) for _ in range(3))
  try:
    layers.set_attention_implementation("xla")
    np.testing.assert_allclose(layers.attention(q, k, v), _einsum_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)
  finally:
    layers.set_attention_implementation(None)
  import pytest  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="attention implementation"):
    layers.set_attention_implementation("flash")
