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

Decoding runs in threads (`backend='thread'`, the default: PIL and numpy release the
GIL for most of the work) or in worker processes (`backend='process'`), which scale
with the cores where the Python parts of the transforms hold the GIL. Each process
task is one whole local batch; results are identical to the thread backend and to
`workers=0`. `prefetch_to_device` moves batches to the devices ahead of the step.
"""
from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

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


# Worker-process side of `backend='process'`: the records and the decode function
# arrive once per worker (cloudpickle, so closures such as `make_reid_decode`'s travel).
_WORKER: dict[str, Any] = {}


def _worker_init(blob: bytes) -> None:
  import cloudpickle  # pylint: disable=import-outside-toplevel
  _WORKER["records"], _WORKER["decode"] = cloudpickle.loads(blob)


def _worker_batch(seed: int, epoch: int, items: Sequence[tuple[int, int]]) -> Batch:
  records, decode = _WORKER["records"], _WORKER["decode"]
  return collate([decode(records[r], sample_rng(seed, epoch, p)) for r, p in items])


BACKENDS = ("thread", "process")


class Loader:
  """Decodes batches ahead of use in a thread or process pool, in a fixed order.

  `workers=0` decodes in the calling thread (simplest to debug). `prefetch` is
  the number of local batches decoded ahead (with processes, at least `workers`
  so that every process has a batch to work on). `backend='process'` starts
  `workers` spawned processes on first use and keeps them until `close()`.
  """

  def __init__(self, records: Sequence[Any], decode: Decode, sampler: Sampler, batch_size: int, *,
               seed: int = 0, workers: int = 0, prefetch: int = 2,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               backend: str = "thread"):
    if backend not in BACKENDS:
      raise ValueError(f"Loader backend must be one of {BACKENDS}, got {backend!r}")
    self.records = records
    self.decode = decode
    self.sampler = sampler
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.workers = int(workers)
    self.backend = backend
    self.prefetch = max(1, int(prefetch))
    self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
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

  def _process_pool(self) -> concurrent.futures.ProcessPoolExecutor:
    if self._pool is None:
      import cloudpickle  # pylint: disable=import-outside-toplevel
      blob = cloudpickle.dumps((self.records, self.decode))
      # 'spawn': forking a process that runs XLA's thread pools is unsafe.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=_worker_init, initargs=(blob,))
    return self._pool

  def close(self) -> None:
    """Stops the worker processes (a later `iterate` starts new ones)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown
      pass

  def _iterate_processes(self, order: np.ndarray, epoch: int, batches: range) -> Iterator[Batch]:
    pool = self._process_pool()
    pending: collections.deque = collections.deque()
    it = iter(batches)

    def submit_next() -> None:
      b = next(it, None)
      if b is not None:
        items = [(int(order[p]), p) for p in self._local_positions(b)]
        pending.append(pool.submit(_worker_batch, self.seed, epoch, items))

    for _ in range(max(self.prefetch, self.workers)):
      submit_next()
    try:
      while pending:
        future = pending.popleft()
        submit_next()
        yield future.result()
    finally:
      for future in pending:
        future.cancel()

  def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
    """This process's slices of global batches `start_batch, ...` of `epoch`."""
    order = np.asarray(self.sampler.epoch_indices(epoch))
    n = len(order) // self.batch_size
    batches = range(start_batch, n)
    if self.workers <= 0:
      for b in batches:
        yield collate([self._decode_one(order, epoch, p) for p in self._local_positions(b)])
      return
    if self.backend == "process":
      yield from self._iterate_processes(order, epoch, batches)
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


def prefetch_to_device(iterator: Iterable[Any], size: int = 2,
                       sharding: Optional[jax.sharding.Sharding] = None) -> Iterator[Any]:
  """Yields the batches of `iterator` already on the devices, `size` steps ahead.

  Each host batch (this process's slice) becomes a global array laid out by
  `sharding` (e.g. `sharding.batch_sharding(mesh)`; None: the default device) as
  soon as it is read, with `jax.make_array_from_process_local_data` as
  `jaxprompt.sharding.global_batch` does, so multi-host runs work unchanged. Transfers are
  asynchronous: the copies of the next `size` batches overlap the running step.
  `size=0` puts each batch only when it is asked for.
  """
  def put(batch):
    if sharding is None:
      return jax.device_put(batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  queue: collections.deque = collections.deque()
  it = iter(iterator)
  try:
    for batch in it:
      queue.append(put(batch))
      if len(queue) > size:
        yield queue.popleft()
    while queue:
      yield queue.popleft()
  finally:
    close = getattr(it, "close", None)
    if close is not None:  # an abandoned stream stops its source (and its decoding threads)
      close()
