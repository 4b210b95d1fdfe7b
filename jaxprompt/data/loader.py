"""A deterministic, resumable batch loader over a sequence of records.

Contract (samplers and transforms are written against it):

* `sampler.epoch_indices(epoch) -> np.ndarray`: the flat order of record indices
  for that epoch. The loader cuts it into global batches of `batch_size`
  (an incomplete last batch is dropped).
* `decode(record, rng) -> dict[str, np.ndarray]`: one sample; all randomness
  (augmentation) must come from `rng`, which is
  `np.random.default_rng([seed, epoch, position])` with `position` the sample's
  place in the epoch's order. So results do not depend on the number of workers,
  on the process count, or on where a run resumed.
* `iterate(epoch, start_batch=0)` yields this process's slice of each global
  batch (`batch_size // process_count` rows, stacked per key).
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import jax
import numpy as np

Batch = dict[str, np.ndarray]
Decode = Callable[[Any, np.random.Generator], Batch]


class Sampler(Protocol):

  def epoch_indices(self, epoch: int) -> np.ndarray:
    ...


class SequentialSampler:
  """Records in order, every epoch."""

  def __init__(self, n: int):
    self.n = n

  def epoch_indices(self, epoch: int) -> np.ndarray:
    return np.arange(self.n)


class PaddedSequentialSampler:
  """Records in order, padded with record 0 up to a multiple of `batch_size`.

  For inference: every batch keeps one shape (one compilation), and the caller
  drops the padded rows (`n` onwards) from the outputs.
  """

  def __init__(self, n: int, batch_size: int):
    self.n, self.batch_size = int(n), int(batch_size)

  def epoch_indices(self, epoch: int) -> np.ndarray:
    del epoch
    pad = (-self.n) % self.batch_size
    return np.concatenate([np.arange(self.n), np.zeros(pad, np.int64)]).astype(np.int64)


class ShuffleSampler:
  """A fresh permutation per epoch, a pure function of (seed, epoch)."""

  def __init__(self, n: int, seed: int = 0):
    self.n, self.seed = n, seed

  def epoch_indices(self, epoch: int) -> np.ndarray:
    # The salt keeps this stream apart from `sample_rng(seed, epoch, 0)`: numpy
    # pads short seed lists with zeros, so [seed, epoch] would equal it.
    return np.random.default_rng([self.seed, epoch, 0xFFFF_FFF0]).permutation(self.n)


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator handed to `decode` for one sample."""
  return np.random.default_rng([seed, epoch, position])


def collate(samples: Sequence[Batch]) -> Batch:
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


class Loader:
  """Decodes batches ahead of use in a thread pool, in a fixed order.

  `workers=0` decodes in the calling thread (simplest to debug). `prefetch` is
  the number of local batches decoded ahead.
  """

  def __init__(self, records: Sequence[Any], decode: Decode, sampler: Sampler, batch_size: int, *,
               seed: int = 0, workers: int = 0, prefetch: int = 2,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    self.records = records
    self.decode = decode
    self.sampler = sampler
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.workers = int(workers)
    self.prefetch = max(1, int(prefetch))
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if self.batch_size % self.process_count:
      raise ValueError(f"global batch size {batch_size} is not divisible by the "
                       f"{self.process_count} processes")
    self.local_batch_size = self.batch_size // self.process_count
    self._steps: dict[int, int] = {}

  def steps_per_epoch(self, epoch: int = 0) -> int:
    # Asked for every epoch by the stage length, the lr schedule and the loop; an identity
    # sampler's epoch takes seconds to draw at VehicleID's size, so draw it once for this.
    # Samplers are pure functions of (seed, epoch), so the count cannot go stale.
    if epoch not in self._steps:
      self._steps[epoch] = len(self.sampler.epoch_indices(epoch)) // self.batch_size
    return self._steps[epoch]

  def _local_positions(self, batch: int) -> range:
    start = batch * self.batch_size + self.process_index * self.local_batch_size
    return range(start, start + self.local_batch_size)

  def _decode_one(self, order: np.ndarray, epoch: int, position: int) -> Batch:
    return self.decode(self.records[int(order[position])], sample_rng(self.seed, epoch, position))

  def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
    """This process's slices of global batches `start_batch, ...` of `epoch`."""
    order = np.asarray(self.sampler.epoch_indices(epoch))
    n = len(order) // self.batch_size
    batches = range(start_batch, n)
    if self.workers <= 0:
      for b in batches:
        yield collate([self._decode_one(order, epoch, p) for p in self._local_positions(b)])
      return
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      pending: collections.deque = collections.deque()
      it = iter(batches)

      def submit_next() -> bool:
        b = next(it, None)
        if b is None:
          return False
        pending.append([pool.submit(self._decode_one, order, epoch, p)
                        for p in self._local_positions(b)])
        return True

      for _ in range(self.prefetch):
        submit_next()
      try:
        while pending:
          futures = pending.popleft()
          submit_next()
          yield collate([f.result() for f in futures])
      finally:
        for futures in pending:  # an abandoned iterator must not leave work queued
          for f in futures:
            f.cancel()
