"""LPT losses: A-GCL (asymmetric Gaussian-clouded logit) and the prompt-matching term.

Follows DongSky/LPT `phase2_test/cb_loss.py` (`AGCL`), `phase2_test/loss.py`
(`ASLSingleLabel`) and `PromptModels_pool/structure.py` (key matching).

Everything here is a pure `jax.numpy` function: the Gaussian noise comes from an
explicit PRNG key (or is passed in), so a train step stays reproducible.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Query-key matching lives with the model (the forward pass selects prompts with it).
from jaxprompt.lpt.model import l2_normalize, select_prompts  # noqa: F401 (re-export)

Array = jax.Array

# (gamma_pos, gamma_neg) of the two A-GCL instances in `train_dual_dualloss.py`.
AGCL_CB = {"gamma_pos": 0.0, "gamma_neg": 4.0}  # class-aware (class-balanced) batch
AGCL_IB = {"gamma_pos": 0.5, "gamma_neg": 8.0}  # instance-balanced batch


def cloud_scale(class_counts: Any) -> Array:
  """Per-class cloud size delta_j / max_k delta_k with delta_j = log max n - log n_j.

  0 for the largest class, 1 for the rarest. On a perfectly balanced set the
  reference divides 0 by 0; here the cloud is then zero (plain margin loss).
  """
  try:
    counts_np = np.asarray(class_counts)
  except jax.errors.TracerArrayConversionError:
    counts_np = None  # traced inside jit: checked by the caller that built the counts
  if counts_np is not None:
    if counts_np.ndim != 1 or counts_np.size == 0:
      raise ValueError(f"class_counts must be a non-empty 1-D array, got shape {counts_np.shape}")
    if np.any(counts_np <= 0):
      bad = np.flatnonzero(counts_np <= 0)[:10].tolist()
      raise ValueError(f"class_counts must be positive (log of a zero count is -inf); classes {bad}")
  log_n = jnp.log(jnp.asarray(class_counts, jnp.float32))
  delta = jnp.max(log_n) - log_n
  max_delta = jnp.max(delta)
  safe = jnp.where(max_delta > 0, max_delta, 1.0)
  return jnp.where(max_delta > 0, delta / safe, 0.0)


def sample_cloud_noise(key: Array, shape: Tuple[int, ...], noise_std: float = 1.0 / 3.0) -> Array:
  """Raw noise eps ~ N(0, noise_std^2) as `torch.distributions.Normal(0, 1/3).sample`."""
  return noise_std * jax.random.normal(key, shape, jnp.float32)


def gaussian_cloud_logits(cosine: Array, labels: Array, class_counts: Any, noise: Array, *,
                          margin: float = 0.1, scale: float = 20.0,
                          noise_mul: float = 0.5) -> Array:
  """GCL logits s * (c - noise_mul * |clip(eps, -1, 1)| * delta_j / max delta - m * 1[j = y]).

  `noise` is the raw Gaussian sample (before clamp and absolute value), one entry per
  logit; the cloud is applied to every column, the margin to the target only.
  """
  cosine = jnp.asarray(cosine, jnp.float32)
  if noise.shape != cosine.shape:
    raise ValueError(f"noise shape {noise.shape} != logits shape {cosine.shape}")
  onehot = jax.nn.one_hot(labels, cosine.shape[-1], dtype=cosine.dtype)
  cloud = noise_mul * jnp.abs(jnp.clip(noise, -1.0, 1.0)) * cloud_scale(class_counts)
  return scale * (cosine - cloud - margin * onehot)


def asl_single_label(logits: Array, labels: Array, *, gamma_pos: float = 0.0,
                     gamma_neg: float = 4.0, label_smoothing: float = 0.1,
                     reduction: str = "mean") -> Array:
  """Single-label asymmetric loss (`ASLSingleLabel`) with label smoothing.

  loss_b = -sum_j t_j * w_j * log p_j with w_y = (1 - p_y)^gamma_pos, w_j = p_j^gamma_neg
  (j != y), t = (1 - eps) * onehot + eps / C. The focusing weights are not detached,
  as in the reference.

  The weights are computed as exp(gamma * log base) with log(1 - p_y) taken as
  logsumexp over the non-target logits minus logsumexp over all: both are finite for
  any finite logits, so neither the value nor the gradient is ever NaN/inf, even when
  float32 softmax saturates to p_y == 1 or gamma is fractional (torch's pow would give
  0 * inf there).
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError("asl_single_label needs at least 2 classes")
  onehot = jax.nn.one_hot(labels, num_classes, dtype=bool)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  log_p = logits - lse
  non_target = jnp.where(onehot, -jnp.inf, logits)
  log_1m_py = jax.nn.logsumexp(non_target, axis=-1, keepdims=True) - lse  # log(1 - p_y)
  log_base = jnp.where(onehot, log_1m_py, log_p)
  gamma = jnp.where(onehot, gamma_pos, gamma_neg).astype(logits.dtype)
  weight = jnp.exp(gamma * log_base)
  target = jnp.where(onehot, 1.0 - label_smoothing, 0.0) + label_smoothing / num_classes
  loss = -jnp.sum(target * weight * log_p, axis=-1)
  if reduction == "mean":
    return jnp.mean(loss)
  if reduction == "sum":
    return jnp.sum(loss)
  if reduction == "none":
    return loss
  raise ValueError(f"unknown reduction {reduction!r}")


def agcl_loss(cosine: Array, labels: Array, class_counts: Any, key: Optional[Array] = None, *,
              noise: Optional[Array] = None, margin: float = 0.1, scale: float = 20.0,
              noise_mul: float = 0.5, noise_std: float = 1.0 / 3.0, gamma_pos: float = 0.0,
              gamma_neg: float = 4.0, label_smoothing: float = 0.1,
              reduction: str = "mean") -> Array:
  """A-GCL on cosine logits (B, C) in [-1, 1]; mean over the batch by default.

  Give either `key` (fresh noise every call, as the reference samples every forward)
  or `noise` (raw N(0, noise_std^2) values of shape (B, C), for tests). Defaults are
  the class-balanced instance; pass `**AGCL_IB` for the instance-balanced one.
  """
  cosine = jnp.asarray(cosine, jnp.float32)
  if noise is None:
    if key is None:
      raise ValueError("agcl_loss needs a PRNG `key` or explicit `noise`")
    noise = sample_cloud_noise(key, cosine.shape, noise_std)
  logits = gaussian_cloud_logits(cosine, labels, class_counts, jnp.asarray(noise, jnp.float32),
                                 margin=margin, scale=scale, noise_mul=noise_mul)
  return asl_single_label(logits, labels, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
                          label_smoothing=label_smoothing, reduction=reduction)


# ----------------------------------------------------------------------------- matching


def reduced_similarity(similarity: Array, indices: Array) -> Array:
  """The reference's `reduced_sim`: sum of the k selected cosines, averaged over the batch."""
  picked = jnp.take_along_axis(similarity, indices, axis=-1)
  return jnp.sum(picked) / similarity.shape[0]


def matching_loss(similarity: Array, indices: Array, weight: float = 0.5) -> Array:
  """Phase-2 matching term as the code adds it: -weight * reduced_sim (weight 0.5).

  With k = 2 this equals (1 - mean_i cos(q, k_i)) - 1, i.e. the paper's term up to a
  constant.
  """
  return -weight * reduced_similarity(similarity, indices)


def phase2_objective(agcl_cb: Array, reduced_sim_cb: Array, agcl_ib: Array,
                     reduced_sim_ib: Array, ib_weight: Any, match_weight: float = 0.5) -> Array:
  """L = [AGCL_CB - 0.5 rs_CB] + w_e [AGCL_IB - 0.5 rs_IB] (DongSky/LPT phase2_test/train_dual_dualloss.py).

  For phase 1 (no prompt pool) pass zeros for the reduced similarities.
  """
  return (agcl_cb - match_weight * reduced_sim_cb) + ib_weight * (
      agcl_ib - match_weight * reduced_sim_ib)
