"""A-GCL and the phase-2 matching term against hand values, torch and numpy."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.lpt import losses as lpt

torch = pytest.importorskip("torch")


def test_agcl_hand_derived():
  # counts 100/10/1 -> delta = (0, log 10, log 100) -> cloud scale (0, 0.5, 1).
  cosine = jnp.array([[0.2, 0.15, -0.1]])
  noise = jnp.array([[0.3, -0.6, 1.5]])  # clamp -> (0.3, -0.6, 1.0), abs -> (0.3, 0.6, 1.0)
  counts = np.array([100, 10, 1])
  # cloud = 0.5 * (0.3*0, 0.6*0.5, 1.0*1) = (0, 0.15, 0.5); margin 0.1 on the target (0)
  z = [20 * 0.1, 20 * 0.0, 20 * -0.6]  # = (2, 0, -12)
  np.testing.assert_allclose(
      lpt.gaussian_cloud_logits(cosine, jnp.array([0]), counts, noise), [z], atol=1e-5)
  lse = math.log(sum(math.exp(v) for v in z))
  logp = [v - lse for v in z]
  p = [math.exp(v) for v in logp]
  gp, gn, eps = 0.5, 4.0, 0.1
  expected = -((1 - eps + eps / 3) * (1 - p[0]) ** gp * logp[0]
               + eps / 3 * p[1] ** gn * logp[1] + eps / 3 * p[2] ** gn * logp[2])
  got = lpt.agcl_loss(cosine, jnp.array([0]), counts, noise=noise, gamma_pos=gp, gamma_neg=gn)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def _torch_agcl(cosine, target, counts, noise, m=0.1, s=20.0, noise_mul=0.5,
                gamma_pos=0.0, gamma_neg=4.0, eps=0.1):
  """The reference's AGCL + ASLSingleLabel formulas, written out in torch."""
  m_list = torch.log(torch.as_tensor(counts, dtype=cosine.dtype))
  m_list = m_list.max() - m_list
  index = torch.zeros_like(cosine, dtype=torch.bool)
  index.scatter_(1, target.view(-1, 1), True)
  cos = cosine - noise_mul * noise.clamp(-1, 1).abs() / m_list.max() * m_list
  out = torch.where(index, cos - m, cos)
  inputs = s * out
  num_classes = inputs.shape[-1]
  log_preds = torch.log_softmax(inputs, dim=-1)
  targets = torch.zeros_like(inputs).scatter_(1, target.long().unsqueeze(1), 1)
  anti = 1 - targets
  xs_pos = torch.exp(log_preds)
  xs_neg = 1 - xs_pos
  w = torch.pow(1 - xs_pos * targets - xs_neg * anti, gamma_pos * targets + gamma_neg * anti)
  log_preds = log_preds * w
  t = targets * (1 - eps) + eps / num_classes
  return (-(t * log_preds).sum(-1)).mean()


@pytest.mark.parametrize("gammas", [lpt.AGCL_CB, lpt.AGCL_IB])
def test_agcl_matches_torch(gammas):
  rng = np.random.default_rng(0)
  b, c = 16, 10
  cosine = rng.uniform(-1, 1, (b, c)).astype(np.float32)
  labels = rng.integers(0, c, b)
  counts = np.array([500, 300, 200, 120, 80, 40, 20, 12, 7, 5])
  noise = (rng.normal(0, 1 / 3, (b, c)) * 2).astype(np.float32)  # some beyond the clamp
  fn = lambda x: lpt.agcl_loss(x, jnp.asarray(labels), counts, noise=jnp.asarray(noise), **gammas)
  val, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(cosine))
  tc = torch.tensor(cosine, dtype=torch.float64, requires_grad=True)
  ref = _torch_agcl(tc, torch.tensor(labels), counts, torch.tensor(noise, dtype=torch.float64),
                    **gammas)
  ref.backward()
  np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), tc.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gammas", [lpt.AGCL_CB, lpt.AGCL_IB, {"gamma_pos": 0.3, "gamma_neg": 0.7}])
def test_agcl_gradient_finite_at_extremes(gammas):
  counts = np.array([1000, 50, 3, 1])
  cases = [
      jnp.array([[1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, 1.0]]),  # gap 40 after s=20
      jnp.array([[1e3, -1e3, -1e3, -1e3], [-1e3, 1e3, -1e3, -1e3]]),  # p_y == 1 exactly
      jnp.array([[-1e3, 1e3, 1e3, -1e3], [0.0, 0.0, 0.0, 0.0]]),      # p_y == 0, ties
  ]
  labels = jnp.array([0, 1])
  vg = jax.jit(jax.value_and_grad(
      lambda x, n: lpt.agcl_loss(x, labels, counts, noise=n, **gammas)))
  for cosine in cases:
    for noise in (jnp.zeros(cosine.shape), jnp.full(cosine.shape, 5.0)):
      val, grad = vg(cosine, noise)
      assert np.isfinite(float(val))
      assert np.all(np.isfinite(np.asarray(grad))), (cosine, grad)
  # the ASL part alone on saturated logits, with jit
  g = jax.jit(jax.grad(lambda z: lpt.asl_single_label(z, jnp.array([0]), **gammas)))(
      jnp.array([[200.0, -200.0, -200.0, -200.0]]))
  assert np.all(np.isfinite(np.asarray(g)))


def test_agcl_noise_from_key():
  cosine = jnp.zeros((64, 8))
  labels = jnp.arange(64) % 8
  counts = np.array([64, 32, 16, 8, 4, 2, 2, 1])
  jitted = jax.jit(lambda x, k: lpt.agcl_loss(x, labels, counts, k))
  a = jitted(cosine, jax.random.key(1))
  b = jitted(cosine, jax.random.key(1))
  c = jitted(cosine, jax.random.key(2))
  assert float(a) == float(b) and float(a) != float(c)
  eps = np.asarray(lpt.sample_cloud_noise(jax.random.key(0), (200_000,)))
  assert abs(eps.std() - 1 / 3) < 5e-3
  with pytest.raises(ValueError, match="key"):
    lpt.agcl_loss(cosine, labels, counts)


def test_cloud_scale():
  np.testing.assert_allclose(lpt.cloud_scale(np.array([100, 10, 1])), [0, 0.5, 1], atol=1e-7)
  np.testing.assert_array_equal(lpt.cloud_scale(np.array([5, 5, 5])), [0, 0, 0])
  with pytest.raises(ValueError, match="positive"):
    lpt.cloud_scale(np.array([5, 0, 3]))


def test_select_prompts_and_matching_vs_numpy():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(5, 8)).astype(np.float32)
  keys = rng.normal(size=(7, 8)).astype(np.float32)
  idx, sim = lpt.select_prompts(jnp.asarray(q), jnp.asarray(keys), 2)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
  ref_sim = qn @ kn.T
  ref_idx = np.argsort(-ref_sim, axis=1)[:, :2]
  np.testing.assert_allclose(np.asarray(sim), ref_sim, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  picked = np.take_along_axis(ref_sim, ref_idx, 1)
  np.testing.assert_allclose(float(lpt.reduced_similarity(sim, idx)), picked.sum() / 5, rtol=1e-5)
  np.testing.assert_allclose(float(lpt.matching_loss(sim, idx)), -0.5 * picked.sum() / 5,
                             rtol=1e-5)
  # == (1 - mean cos) - 1 for k = 2
  np.testing.assert_allclose(float(lpt.matching_loss(sim, idx)),
                             np.mean(1 - picked.mean(1)) - 1, rtol=1e-5)

  # keys get gradient only where selected
  def loss(k):
    i, s = lpt.select_prompts(jnp.asarray(q), k, 2)
    return lpt.matching_loss(s, i)
  g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(keys)))
  unused = np.setdiff1d(np.arange(7), ref_idx.ravel())
  assert np.all(g[unused] == 0) and np.all(np.abs(g[np.unique(ref_idx)]).sum(1) > 0)
  with pytest.raises(ValueError):
    lpt.select_prompts(jnp.asarray(q), jnp.asarray(keys[:1]), 2)


def test_phase2_objective():
  got = lpt.phase2_objective(2.0, 1.5, 3.0, 1.0, 0.25)
  assert abs(float(got) - ((2.0 - 0.75) + 0.25 * (3.0 - 0.5))) < 1e-7
