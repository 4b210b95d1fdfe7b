"""The loader's determinism contract: workers, resume and process slices do not change data."""
from __future__ import annotations

import numpy as np
import pytest

from jaxprompt.data import Loader, SequentialSampler, ShuffleSampler


def _decode(record, rng):
  # Random augmentation drawn from the per-sample rng, plus a uneven amount of work.
  x = np.full((3,), record, np.float32) + rng.normal(size=3).astype(np.float32)
  return {"x": x, "label": np.int32(record % 5)}


def _batches(loader, epoch, start=0):
  return [b for b in loader.iterate(epoch, start)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for u, v in zip(a, b):
    assert u.keys() == v.keys()
    for k in u:
      np.testing.assert_array_equal(u[k], v[k])


def test_same_batches_with_1_and_4_workers():
  records = list(range(50))
  kw = dict(sampler=ShuffleSampler(50, seed=3), batch_size=8, seed=7)
  one = Loader(records, _decode, workers=1, **kw)
  four = Loader(records, _decode, workers=4, prefetch=3, **kw)
  inline = Loader(records, _decode, workers=0, **kw)
  for epoch in (0, 1):
    _assert_same(_batches(one, epoch), _batches(four, epoch))
    _assert_same(_batches(one, epoch), _batches(inline, epoch))
  assert len(_batches(one, 0)) == one.steps_per_epoch(0) == 6  # drop_last
  # Different epochs: different order and different augmentation.
  assert not np.array_equal(_batches(one, 0)[0]["x"], _batches(one, 1)[0]["x"])


def test_resume_mid_epoch_gives_the_remaining_batches():
  loader = Loader(list(range(40)), _decode, ShuffleSampler(40, seed=1), 4, seed=2, workers=3)
  full = _batches(loader, 2)
  _assert_same(full[6:], _batches(loader, 2, start=6))
  # An abandoned iterator (a run stopped mid-epoch) leaves nothing behind that matters.
  it = loader.iterate(2)
  next(it)
  it.close()
  _assert_same(full, _batches(loader, 2))


def test_process_slices_concatenate_to_the_global_batch():
  records = list(range(32))
  kw = dict(sampler=ShuffleSampler(32, seed=0), batch_size=8, seed=5, workers=2)
  whole = _batches(Loader(records, _decode, process_index=0, process_count=1, **kw), 0)
  parts = [_batches(Loader(records, _decode, process_index=p, process_count=2, **kw), 0)
           for p in range(2)]
  for b, (p0, p1) in enumerate(zip(*parts)):
    assert p0["x"].shape[0] == 4
    for k in whole[b]:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), whole[b][k])


def test_sampler_contract_and_errors():
  assert list(SequentialSampler(4).epoch_indices(9)) == [0, 1, 2, 3]
  s = ShuffleSampler(10, seed=4)
  np.testing.assert_array_equal(s.epoch_indices(1), ShuffleSampler(10, seed=4).epoch_indices(1))
  with pytest.raises(ValueError, match="not divisible"):
    Loader([0, 1, 2], _decode, s, 3, process_index=0, process_count=2)


def test_padded_sequential_sampler_keeps_order_and_pads_with_record_zero():
  from jaxprompt.data.loader import PaddedSequentialSampler
  np.testing.assert_array_equal(PaddedSequentialSampler(5, 4).epoch_indices(3),
                                [0, 1, 2, 3, 4, 0, 0, 0])
  np.testing.assert_array_equal(PaddedSequentialSampler(8, 4).epoch_indices(0), np.arange(8))


# -- process-based decoding and device prefetch ------------------------------------------------


def _closure_decode(offset):
  # A closure, like the library's decode factories: the process backend must ship it.
  def decode(record, rng):
    return {"x": np.full((2,), record + offset, np.float32) + rng.normal(size=2).astype(np.float32),
            "label": np.int32(record % 3)}
  return decode


def test_process_backend_same_batches_resume_and_slices():
  records = list(range(40))
  decode = _closure_decode(0.5)
  kw = dict(sampler=ShuffleSampler(40, seed=4), batch_size=8, seed=9)
  inline = Loader(records, decode, workers=0, **kw)
  procs = Loader(records, decode, workers=2, backend="process", **kw)
  try:
    for epoch in (0, 1):
      _assert_same(_batches(inline, epoch), _batches(procs, epoch))
    _assert_same(_batches(inline, 1)[3:], _batches(procs, 1, start=3))  # exact resume
    it = procs.iterate(0)
    next(it)
    it.close()  # abandoned mid-epoch: the pool stays usable
    _assert_same(_batches(inline, 0), _batches(procs, 0))
    # Each process of a multi-host run decodes only its own slice of the global batch.
    half = Loader(records, decode, workers=2, backend="process", process_index=1,
                  process_count=2, **kw)
    try:
      for whole, part in zip(_batches(inline, 0), _batches(half, 0)):
        np.testing.assert_array_equal(part["x"], whole["x"][4:])
    finally:
      half.close()
  finally:
    procs.close()


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="backend must be one of"):
    Loader([1], _decode, SequentialSampler(1), 1, backend="fork")


def test_prefetch_to_device_keeps_order_and_runs_ahead():
  import jax  # pylint: disable=import-outside-toplevel
  from jaxprompt.data.loader import prefetch_to_device  # pylint: disable=import-outside-toplevel
  loader = Loader(list(range(24)), _decode, ShuffleSampler(24, seed=1), 4, seed=3)
  host = _batches(loader, 0)
  pulled = []

  def source():
    for b in host:
      pulled.append(len(pulled))
      yield b

  it = prefetch_to_device(source(), size=2)
  first = next(it)
  assert len(pulled) == 3  # the batch handed out plus two already on the device
  assert isinstance(first["x"], jax.Array)
  out = [first, *it]
  _assert_same([jax.device_get(b) for b in out], host)
  # Batches split over a data-parallel mesh, as the trainer lays them out.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rows = Loader(list(range(48)), _decode, ShuffleSampler(48, seed=1), len(jax.devices()), seed=3)
  host = _batches(rows, 0)
  out = list(prefetch_to_device(iter(host), 1, sharding))
  assert all(b["x"].sharding == sharding for b in out)
  _assert_same([jax.device_get(b) for b in out], host)
