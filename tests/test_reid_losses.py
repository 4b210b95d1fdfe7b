"""CLIP-ReID losses: hand-derived values, torch re-implementations of the reference
formulas, and finite gradients."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxprompt.clipreid.losses import (batch_hard_triplet, cross_entropy_label_smooth,
                              i2t_cross_entropy, supcon)

TOL = 1e-5


# Torch versions that follow the reference formulas (loss/*.py), written for the tests.

def torch_supcon(a, c, ya, yc, temperature=1.0):
  mask = torch.eq(ya.unsqueeze(1), yc.unsqueeze(0)).float()
  logits = torch.div(a @ c.T, temperature)
  logits_max, _ = torch.max(logits, dim=1, keepdim=True)
  logits = logits - logits_max.detach()
  log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
  return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def torch_ce_ls(inputs, targets, epsilon=0.1):
  log_probs = F.log_softmax(inputs, dim=1)
  onehot = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1)
  t = (1 - epsilon) * onehot + epsilon / inputs.shape[1]
  return (-t * log_probs).mean(0).sum()


def torch_triplet(x, labels, margin=0.3):
  n = x.shape[0]
  xx = x.pow(2).sum(1, keepdim=True).expand(n, n)
  dist = xx + xx.t() - 2 * x @ x.t()
  dist = dist.clamp(min=1e-12).sqrt()
  is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
  d_ap = torch.stack([dist[i][is_pos[i]].max() for i in range(n)])
  d_an = torch.stack([dist[i][~is_pos[i]].min() for i in range(n)])
  return F.margin_ranking_loss(d_an, d_ap, torch.ones(n), margin=margin)


def _t(x):
  return torch.from_numpy(np.asarray(x))


# ---------------------------------------------------------------------------- SupCon

def test_supcon_hand_values():
  # a = [[1, 0], [0, 1]], c = [[1, 0], [0, 1], [1, 1]], ya = [0, 1], yc = [0, 1, 0].
  # Row 0: s = [1, 0, 1]; log Z = log(2e + 1) (the row max cancels).
  #   positives j = 0, 2: both log p = 1 - log(2e + 1).
  # Row 1: s = [0, 1, 1]; positive j = 1: log p = 1 - log(1 + 2e).
  a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  c = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  ya, yc = np.array([0, 1]), np.array([0, 1, 0])
  expected = -(1 - math.log(2 * math.e + 1))
  assert float(supcon(a, c, ya, yc)) == pytest.approx(expected, abs=TOL)
  # Temperature 0.5 doubles the logits: row 0 s = [2, 0, 2], row 1 s = [0, 2, 2].
  expected_t = -(2 - math.log(2 * math.e ** 2 + 1))
  assert float(supcon(a, c, ya, yc, temperature=0.5)) == pytest.approx(expected_t, abs=TOL)


def test_supcon_matches_torch_with_repeated_ids():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((12, 16)).astype(np.float32) * 3  # raw, large logits
  c = rng.standard_normal((9, 16)).astype(np.float32) * 3
  ya = np.array([0, 0, 1, 2, 2, 2, 3, 1, 0, 3, 3, 2])
  yc = np.array([0, 1, 2, 3, 0, 1, 2, 3, 3])
  got = float(supcon(a, c, ya, yc))
  ref = float(torch_supcon(_t(a), _t(c), _t(ya), _t(yc)))
  assert got == pytest.approx(ref, abs=TOL, rel=TOL)
  # The stage-1 pair: image->text and text->image with repeated identities.
  txt = rng.standard_normal((12, 16)).astype(np.float32)[ya]  # same id, same text
  got2 = float(supcon(a, txt, ya, ya) + supcon(txt, a, ya, ya))
  ref2 = float(torch_supcon(_t(a), _t(txt), _t(ya), _t(ya))
               + torch_supcon(_t(txt), _t(a), _t(ya), _t(ya)))
  assert got2 == pytest.approx(ref2, abs=TOL, rel=TOL)


def test_supcon_gradients_match_torch_and_rows_without_positive():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((6, 8)).astype(np.float32)
  c = rng.standard_normal((6, 8)).astype(np.float32)
  y = np.array([0, 1, 1, 2, 0, 2])
  ga, gc = jax.grad(lambda a, c: supcon(a, c, y, y), argnums=(0, 1))(a, c)
  ta = _t(a).requires_grad_()
  tc = _t(c).requires_grad_()
  torch_supcon(ta, tc, _t(y), _t(y)).backward()
  np.testing.assert_allclose(ga, ta.grad.numpy(), atol=TOL)
  np.testing.assert_allclose(gc, tc.grad.numpy(), atol=TOL)
  # A row whose label is absent from c is left out (NaN in the reference).
  y_c = np.array([0, 1, 1, 0, 0, 1])
  keep = y != 2
  got = float(supcon(a, c, y, y_c))
  ref = float(torch_supcon(_t(a[keep]), _t(c), _t(y[keep]), _t(y_c)))
  assert got == pytest.approx(ref, abs=TOL)


# ------------------------------------------------------------------------ Cross-entropy

def test_ce_label_smooth_hand_values():
  # One sample, logits [0, 0] (K = 2): log softmax = [-log 2, -log 2]; any target sums
  # to 1, so the loss is log 2 for every epsilon.
  assert float(cross_entropy_label_smooth(np.zeros((1, 2)), np.array([1]))) == \
      pytest.approx(math.log(2), abs=TOL)
  # logits [log 3, 0, 0] (K = 3): p = [0.6, 0.2, 0.2]; label 0, eps 0.3:
  # t = [0.7 + 0.1, 0.1, 0.1] -> loss = -(0.8 log 0.6 + 0.2 log 0.2).
  logits = np.array([[math.log(3), 0.0, 0.0]], np.float32)
  expected = -(0.8 * math.log(0.6) + 0.2 * math.log(0.2))
  assert float(cross_entropy_label_smooth(logits, np.array([0]), 0.3)) == \
      pytest.approx(expected, abs=TOL)
  # eps = 0 is plain CE: -log 0.2 for label 2.
  assert float(cross_entropy_label_smooth(logits, np.array([2]), 0.0)) == \
      pytest.approx(-math.log(0.2), abs=TOL)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_matches_torch(eps):
  rng = np.random.default_rng(2)
  logits = (rng.standard_normal((10, 7)) * 4).astype(np.float32)
  labels = rng.integers(0, 7, 10)
  got = float(cross_entropy_label_smooth(logits, labels, eps))
  ref = float(torch_ce_ls(_t(logits), _t(labels), eps))
  assert got == pytest.approx(ref, abs=TOL, rel=TOL)
  if eps == 0.0:
    assert got == pytest.approx(float(F.cross_entropy(_t(logits), _t(labels))), abs=TOL)


def test_i2t_cross_entropy_raw_logits():
  rng = np.random.default_rng(3)
  img = rng.standard_normal((8, 16)).astype(np.float32)
  txt = rng.standard_normal((5, 16)).astype(np.float32)
  labels = rng.integers(0, 5, 8)
  got = float(i2t_cross_entropy(img, txt, labels, 0.1))
  ref = float(torch_ce_ls(_t(img) @ _t(txt).T, _t(labels), 0.1))
  assert got == pytest.approx(ref, abs=TOL, rel=TOL)
  # Hand value: img = [[1, 0]], txt = [[1, 0], [0, 1]] -> logits [1, 0], label 0, eps 0:
  # loss = log(1 + e^-1).
  assert float(i2t_cross_entropy(np.array([[1.0, 0.0]]), np.eye(2), np.array([0]), 0.0)) \
      == pytest.approx(math.log(1 + math.exp(-1)), abs=TOL)


# ------------------------------------------------------------------------------ Triplet

def test_triplet_hand_values():
  # Points on a line: x = 0, 1 (id 0) and 3 (id 1).
  # Anchor 0: d_ap = 1, d_an = 3 -> relu(1 - 3 + 0.3) = 0.
  # Anchor 1: d_ap = 1, d_an = 2 -> relu(1 - 2 + 0.3) = 0.
  # Anchor 2: d_ap = sqrt(1e-12) = 1e-6 (itself), d_an = 2 -> 0.
  x = np.array([[0.0], [1.0], [3.0]], np.float32)
  assert float(batch_hard_triplet(x, np.array([0, 0, 1]))) == pytest.approx(0.0, abs=TOL)
  # Margin 1.5: anchor 0: 1 - 3 + 1.5 = -0.5 -> 0; anchor 1: 1 - 2 + 1.5 = 0.5;
  # anchor 2: 1e-6 - 2 + 1.5 -> 0. Mean = 0.5 / 3.
  assert float(batch_hard_triplet(x, np.array([0, 0, 1]), margin=1.5)) == \
      pytest.approx(0.5 / 3, abs=TOL)


def test_triplet_matches_torch_values_and_grads():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((16, 12)).astype(np.float32)
  y = np.repeat(np.arange(4), 4)
  got, g = jax.value_and_grad(lambda x: batch_hard_triplet(x, y, 0.3))(x)
  tx = _t(x).requires_grad_()
  ref = torch_triplet(tx, _t(y), 0.3)
  ref.backward()
  assert float(got) == pytest.approx(float(ref.detach()), abs=TOL, rel=TOL)
  np.testing.assert_allclose(g, tx.grad.numpy(), atol=TOL)


def test_gradients_finite_for_duplicate_features():
  rng = np.random.default_rng(5)
  base = rng.standard_normal((3, 8)).astype(np.float32)
  x = base[np.array([0, 0, 1, 1, 2, 2, 0, 1])]  # exact duplicates, same and other ids
  y = np.array([0, 0, 1, 1, 2, 2, 1, 0])
  g = jax.grad(lambda x: batch_hard_triplet(x, y, 0.3))(x)
  assert np.all(np.isfinite(g))
  g2 = jax.grad(lambda x: supcon(x, x, y, y))(x)
  assert np.all(np.isfinite(g2))
  g3 = jax.grad(lambda x: i2t_cross_entropy(x, base, y % 3, 0.1))(x)
  assert np.all(np.isfinite(g3))
  # All identical features of one id: every distance is clamped.
  same = jnp.ones((4, 3))
  assert np.all(np.isfinite(jax.grad(lambda x: batch_hard_triplet(x, np.array([0, 0, 1, 1])))(same)))


def test_losses_are_float32_and_jittable():
  x = jnp.ones((4, 3), jnp.bfloat16)
  y = jnp.array([0, 0, 1, 1])
  out = jax.jit(lambda x: batch_hard_triplet(x, y) + supcon(x, x, y, y)
                + i2t_cross_entropy(x, x[:2], y % 2))(x)
  assert out.dtype == jnp.float32
