"""Epoch index orders for the ReID recipes.

A sampler returns, for each epoch, the flat order of dataset indices; the loader cuts it
into global batches and drops a last partial batch. Every order is a pure function of
(seed, epoch), so a resumed run sees the same batches.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _epoch_rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
  # The loader seeds per-sample augmentation with [seed, epoch, position]; a salt far
  # above any position keeps the sampler's stream distinct from those.
  return np.random.default_rng([int(seed), int(epoch), 0xFFFF_FF00 + salt])


class IdentitySampler:
  """P identities x K images per batch (the reference's `RandomIdentitySampler`).

  Per epoch: each identity's image indices are shuffled and cut into chunks of K; an
  identity with fewer than K images is first sampled with replacement up to K; a last
  chunk shorter than K is dropped. Then, while at least P identities have chunks left,
  P of them are drawn uniformly without replacement and one chunk of each is appended.
  Every consecutive block of P*K indices is thus a batch of P identities x K images, and
  the epoch length is a multiple of P*K, at most `max_len`.
  """

  def __init__(self, pids: Sequence[int], batch_size: int = 64, num_instances: int = 4,
               seed: int = 0):
    if batch_size % num_instances:
      raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances "
                       f"{num_instances}")
    self.batch_size = int(batch_size)
    self.num_instances = int(num_instances)
    self.num_pids_per_batch = self.batch_size // self.num_instances
    self.seed = int(seed)
    pids = np.asarray(pids).reshape(-1)
    # Identities in order of first appearance, as the reference's defaultdict keys.
    uniq, first, inverse = np.unique(pids, return_index=True, return_inverse=True)
    by_id = np.argsort(inverse.reshape(-1), kind="stable")  # indices grouped by id, ascending
    groups = np.split(by_id, np.cumsum(np.bincount(inverse.reshape(-1), minlength=len(uniq)))[:-1])
    self._index = {int(uniq[j]): groups[j] for j in np.argsort(first)}
    self.pids = list(self._index)
    if len(self.pids) < self.num_pids_per_batch:
      raise ValueError(f"IdentitySampler needs at least {self.num_pids_per_batch} identities per "
                       f"batch, the data has {len(self.pids)}")
    k = self.num_instances
    # The reference's `__len__` before its first epoch: an upper bound on an epoch's length.
    self.max_len = sum(max(len(v), k) - max(len(v), k) % k for v in self._index.values())

  def epoch_indices(self, epoch: int) -> np.ndarray:
    rng = _epoch_rng(self.seed, epoch, 1)
    k, p = self.num_instances, self.num_pids_per_batch
    chunks: dict[int, list[np.ndarray]] = {}
    for pid in self.pids:
      idxs = self._index[pid]
      if len(idxs) < k:
        idxs = rng.choice(idxs, size=k, replace=True)
      idxs = rng.permutation(idxs)
      n = len(idxs) // k
      chunks[pid] = [idxs[i * k:(i + 1) * k] for i in range(n)]
    avail = list(self.pids)
    out: list[np.ndarray] = []
    while len(avail) >= p:
      picked = [avail[i] for i in rng.choice(len(avail), size=p, replace=False)]
      for pid in picked:
        out.append(chunks[pid].pop(0))
        if not chunks[pid]:
          avail.remove(pid)
    if not out:
      return np.zeros((0,), np.int64)
    return np.concatenate(out).astype(np.int64)

  def num_batches(self, epoch: int) -> int:
    return len(self.epoch_indices(epoch)) // self.batch_size


class RandomSampler:
  """A fresh permutation of all n images per epoch (stage 1 of CLIP-ReID).

  The reference iterates `n // B + 1` batches: the last holds the `n % B` remaining images,
  or nothing when B divides n. The loader drops that partial batch instead, so each epoch
  skips `n % B` images (different ones each epoch). With `wrap_to=B`, the order is padded
  with the first indices of the same permutation up to a multiple of B, so every image is
  seen each epoch and the last batch holds a few repeats (full-size batches, no recompile).
  """

  def __init__(self, n: int, seed: int = 0, wrap_to: Optional[int] = None):
    if n <= 0:
      raise ValueError("RandomSampler needs at least one sample")
    self.n = int(n)
    self.seed = int(seed)
    self.wrap_to = wrap_to

  def epoch_indices(self, epoch: int) -> np.ndarray:
    perm = _epoch_rng(self.seed, epoch, 2).permutation(self.n).astype(np.int64)
    if self.wrap_to:
      extra = (-self.n) % int(self.wrap_to)
      perm = np.concatenate([perm, np.resize(perm, extra)])
    return perm
