"""Samplers for LPT's dual sampling: class-aware (CB) and instance-balanced (IB) batches.

Reference (DongSky/LPT `phase2_test/sampler.py`, `phase2_test/train_dual_dualloss.py`):
every training step draws one class-aware batch and one uniformly random
batch; the loss is L = L_CB + w_e * L_IB with w_e = max(0, 0.5 (E - e) / E).

How a training loop consumes this (the generic loader cuts each sampler's
`epoch_indices(epoch)` into consecutive batches of `batch_size`):

  steps = lpt_steps_per_epoch(len(train), batch_size)        # floor(N/B) + 1
  cb = ClassAwareSampler(labels, num_samples_cls=4, seed=seed,
                         num_samples=steps * batch_size)
  ib = InstanceBalancedSampler(len(train), batch_size, steps, seed=seed)
  cb_loader = Loader(train.records, decode, cb, batch_size, seed=seed)
  ib_loader = Loader(train.records, decode, ib, batch_size, seed=seed + 1)
  for epoch in range(E):
    w = ib_loss_weight(epoch, E)
    for cb_batch, ib_batch in zip(cb_loader.iterate(epoch), ib_loader.iterate(epoch)):
      state, metrics = train_step(state, frozen, cb_batch, ib_batch, w, rng)

Both samplers produce exactly `steps * batch_size` indices, so the zip pairs batch t of
one with batch t of the other, and `iterate(epoch, start_batch)` resumes both mid-epoch.
Give the two loaders different seeds: the loader's augmentation RNG depends on
(seed, epoch, position), so equal seeds would give CB sample p and IB sample p the same
crop and flip. `DualSampler` bundles the two and yields the paired
index batches with their weight directly, for loops that do not use the loader.

Determinism: every epoch's order is a pure function of (seed, epoch), so a resumed
run replays the same batches. The reference's torch/Python RNG streams (and its
DataLoader prefetching, which consumes sampler indices that are never trained on) are
not reproduced bit for bit; the sampling *law* is.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

_CB_STREAM = 0
_IB_STREAM = 1


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
  if epoch < 0:
    raise ValueError(f"epoch must be >= 0, got {epoch}")
  return np.random.default_rng([int(seed), int(epoch), stream])


def lpt_steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Iterations per epoch of the reference loop: floor(N / B) + 1 (it breaks at cnt > N // B)."""
  return num_train // batch_size + 1


def ib_loss_weight(epoch: Any, total_epochs: int, start: float = 0.5) -> Any:
  """Weight of the instance-balanced loss at epoch e (0-based): max(0, start (E - e) / E).

  0.5 at e = 0, 0.5 / E at the last epoch, constant within an epoch. Python numbers
  give a float; a (traced) jax array gives a jax array, so it can run inside jit.
  """
  if total_epochs <= 0:
    raise ValueError(f"total_epochs must be positive, got {total_epochs}")
  w = start * (total_epochs - epoch) / total_epochs
  if isinstance(w, (int, float, np.integer, np.floating)):
    return max(0.0, float(w))
  import jax.numpy as jnp
  return jnp.maximum(w, 0.0)


def ib_loss_weight_at_step(step: Any, steps_per_epoch: int, total_epochs: int,
                           start: float = 0.5) -> Any:
  """`ib_loss_weight` of the epoch that global step `step` (0-based) belongs to."""
  return ib_loss_weight(step // steps_per_epoch, total_epochs, start)


def _cycle_draw(rng: np.random.Generator, items: np.ndarray, n: int) -> np.ndarray:
  """First n items of an endless cycle that reshuffles at every pass (`RandomCycleIter`).

  The reference's cycle starts with a shuffle, so every pass is a fresh permutation.
  """
  passes = -(-n // items.size)
  return np.concatenate([rng.permutation(items) for _ in range(passes)])[:n]


class ClassAwareSampler:
  """Class-aware sampling as the reference `ClassAwareSampler(num_samples_cls=4)`.

  Classes are visited in a random order that is reshuffled after each full pass over
  the classes; each visit takes `num_samples_cls` consecutive indices from that class's
  own cycle over its images (reshuffled after each pass, so a visit may straddle two
  passes). With batch 256 and 4 per class a batch holds 64 classes x 4 images.
  Classes without images are never visited.

  num_samples: indices per epoch; default the reference's nominal length
  max_class_count * num_classes. LPT's loop uses only `lpt_steps_per_epoch * batch`
  of them, so pass that.
  """

  def __init__(self, labels: Any, *, num_samples_cls: int = 4, seed: int = 42,
               num_samples: Optional[int] = None):
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or labels.size == 0:
      raise ValueError("labels must be a non-empty 1-D array")
    if labels.min() < 0:
      raise ValueError("labels must be non-negative")
    if num_samples_cls < 1:
      raise ValueError("num_samples_cls must be >= 1")
    order = np.argsort(labels, kind="stable")
    classes, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    self.classes = classes
    self._members = [order[s:s + n] for s, n in zip(starts, sizes)]
    self.num_samples_cls = int(num_samples_cls)
    self.seed = int(seed)
    self.num_samples = int(num_samples if num_samples is not None
                           else sizes.max() * classes.size)

  def __len__(self) -> int:
    return self.num_samples

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """(num_samples,) int64 dataset indices for this epoch."""
    rng = _epoch_rng(self.seed, epoch, _CB_STREAM)
    k = self.num_samples_cls
    visits = -(-self.num_samples // k)
    class_seq = _cycle_draw(rng, np.arange(self.classes.size), visits)
    out = np.empty((visits, k), np.int64)
    by_class = np.argsort(class_seq, kind="stable")  # visits grouped by class, in time order
    cls, starts, sizes = np.unique(class_seq[by_class], return_index=True, return_counts=True)
    for c, s, n in zip(cls, starts, sizes):
      rows = by_class[s:s + n]
      out[rows] = _cycle_draw(rng, self._members[c], n * k).reshape(n, k)
    return out.reshape(-1)[:self.num_samples]


class InstanceBalancedSampler:
  """Uniform random batches, one independent draw per step (reference: a fresh shuffled
  loader iterator every step, `next(iter(loader))`): no duplicates within a batch,
  independent across steps."""

  def __init__(self, num_items: int, batch_size: int, steps_per_epoch: int, *, seed: int = 42):
    if batch_size > num_items:
      # the reference's drop_last loader would yield no batch at all
      raise ValueError(f"batch_size {batch_size} exceeds the dataset size {num_items}")
    self.num_items = int(num_items)
    self.batch_size = int(batch_size)
    self.steps_per_epoch = int(steps_per_epoch)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.batch_size * self.steps_per_epoch

  def epoch_indices(self, epoch: int) -> np.ndarray:
    rng = _epoch_rng(self.seed, epoch, _IB_STREAM)
    return np.concatenate([
        rng.choice(self.num_items, self.batch_size, replace=False)
        for _ in range(self.steps_per_epoch)]).astype(np.int64)


class DualStep(NamedTuple):
  cb: np.ndarray       # (batch,) indices of the class-aware batch
  ib: np.ndarray       # (batch,) indices of the instance-balanced batch
  ib_weight: float     # w_e of the instance-balanced loss


class DualSampler:
  """The two LPT samplers with a shared step count and the IB weight schedule."""

  def __init__(self, labels: Any, batch_size: int, total_epochs: int, *, seed: int = 42,
               num_samples_cls: int = 4, steps_per_epoch: Optional[int] = None,
               ib_start_weight: float = 0.5):
    labels = np.asarray(labels, dtype=np.int64)
    self.batch_size = int(batch_size)
    self.total_epochs = int(total_epochs)
    self.ib_start_weight = float(ib_start_weight)
    self.steps_per_epoch = int(steps_per_epoch or lpt_steps_per_epoch(labels.size, batch_size))
    n = self.steps_per_epoch * self.batch_size
    self.cb = ClassAwareSampler(labels, num_samples_cls=num_samples_cls, seed=seed, num_samples=n)
    self.ib = InstanceBalancedSampler(labels.size, batch_size, self.steps_per_epoch, seed=seed)

  def ib_weight(self, epoch: int) -> float:
    return ib_loss_weight(epoch, self.total_epochs, self.ib_start_weight)

  def epoch(self, epoch: int) -> Iterator[DualStep]:
    """Yield `steps_per_epoch` paired index batches for this epoch."""
    b = self.batch_size
    cb = self.cb.epoch_indices(epoch).reshape(-1, b)
    ib = self.ib.epoch_indices(epoch).reshape(-1, b)
    w = self.ib_weight(epoch)
    for t in range(self.steps_per_epoch):
      yield DualStep(cb[t], ib[t], w)
