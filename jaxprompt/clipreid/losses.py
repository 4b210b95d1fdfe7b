"""CLIP-ReID losses (Syliz517/CLIP-ReID loss/supcontrast.py, loss/make_loss.py), as pure float32 jnp functions.

* `supcon`: stage-1 SupConLoss (`loss/supcontrast.py`), tau = 1 on raw features.
* `cross_entropy_label_smooth`: `CrossEntropyLabelSmooth` (`loss/softmax_loss.py`);
  plain cross-entropy when epsilon = 0.
* `batch_hard_triplet`: `TripletLoss` with hard mining (`loss/triplet_loss.py`).
* `i2t_cross_entropy`: stage-2 image-to-text CE on raw dot products.

None of them normalises features or applies a logit scale: that is the method.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def supcon(a: jax.Array, c: jax.Array, labels_a: jax.Array, labels_c: jax.Array,
           temperature: float = 1.0) -> jax.Array:
  """SupCon of anchors `a` (Na, D) against contrasts `c` (Nc, D).

  s_ij = a_i . c_j / temperature; log p_ij = s_ij - logsumexp_j s_ij (after subtracting
  the detached row max, as the reference); loss = -mean_i mean_{j: y_j = y_i} log p_ij.
  Stage 1 uses supcon(img, txt, y, y) + supcon(txt, img, y, y).

  A row without any positive is NaN in the reference (0 / 0); here it is left out of
  the mean instead, and the loss is 0 if no row has a positive.
  """
  a = jnp.asarray(a, jnp.float32)
  c = jnp.asarray(c, jnp.float32)
  mask = (labels_a[:, None] == labels_c[None, :]).astype(jnp.float32)
  logits = (a @ c.T) / temperature
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  log_prob = logits - jnp.log(jnp.sum(jnp.exp(logits), axis=1, keepdims=True))
  n_pos = jnp.sum(mask, axis=1)
  has_pos = n_pos > 0
  mean_pos = jnp.sum(mask * log_prob, axis=1) / jnp.where(has_pos, n_pos, 1.0)
  n_rows = jnp.sum(has_pos)
  return -jnp.sum(jnp.where(has_pos, mean_pos, 0.0)) / jnp.maximum(n_rows, 1)


def cross_entropy_label_smooth(logits: jax.Array, labels: jax.Array,
                               epsilon: float = 0.1) -> jax.Array:
  """Batch mean of -sum_k t_k log softmax_k with t = (1 - eps) onehot + eps / K.

  epsilon = 0 is plain cross-entropy (`F.cross_entropy`, mean reduction).
  """
  logits = jnp.asarray(logits, jnp.float32)
  k = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target = (1.0 - epsilon) * jax.nn.one_hot(labels, k, dtype=jnp.float32) + epsilon / k
  return jnp.mean(-jnp.sum(target * log_probs, axis=-1))


def pairwise_euclidean(x: jax.Array, y: jax.Array) -> jax.Array:
  """sqrt(clamp(||x||^2 + ||y||^2 - 2 x.y, min=1e-12)), the reference `euclidean_dist`.

  The clamp sends a zero gradient to clamped entries (duplicate features, the
  diagonal), so the sqrt's infinite slope at 0 is never reached.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  d2 = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * (x @ y.T)
  d2 = jnp.maximum(d2, 1e-12)
  return jnp.sqrt(d2)


def batch_hard_triplet(features: jax.Array, labels: jax.Array,
                       margin: float = 0.3) -> jax.Array:
  """mean_i relu(max_{y_j = y_i} d_ij - min_{y_j != y_i} d_ij + margin); no normalisation.

  The hardest positive includes the anchor itself (distance sqrt(1e-12)). An anchor
  without negatives contributes 0 (the reference would fail on such a batch).
  """
  dist = pairwise_euclidean(features, features)
  same = labels[:, None] == labels[None, :]
  d_ap = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  d_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  return jnp.mean(jax.nn.relu(d_ap - d_an + margin))


def i2t_cross_entropy(image_features: jax.Array, text_features: jax.Array,
                      labels: jax.Array, epsilon: float = 0.1) -> jax.Array:
  """Stage-2 image-to-text loss: CE_ls over logits = image_features @ text_features.T.

  `text_features` is (num_ids, D), the frozen features of every identity; raw dot
  products, with no normalisation, temperature or logit scale.
  """
  logits = jnp.asarray(image_features, jnp.float32) @ jnp.asarray(text_features, jnp.float32).T
  return cross_entropy_label_smooth(logits, labels, epsilon)
