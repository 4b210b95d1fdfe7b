"""One PRNG stream per training stage.

`trainer.run_stage` turns a stage config's `seed` into its key. Every stage of a
pipeline shares the run's seed, so without this, two stages would draw the same
noise (A-GCL clouds, dropout masks) step for step. The pipelines hand the trainer
`for_stage(cfg, stage)`: the same config with the seed of the key
fold_in(key(seed), crc32(stage)).
"""
from __future__ import annotations

import zlib

import jax
import numpy as np


def stage_seed(seed: int, stage: str) -> int:
  """A 31-bit seed from fold_in(key(seed), crc32(stage name)); a pure function of both."""
  key = jax.random.fold_in(jax.random.key(int(seed)), zlib.crc32(stage.encode("utf-8")))
  data = np.asarray(jax.device_get(jax.random.key_data(key))).reshape(-1)
  return int(data[-1]) & 0x7FFF_FFFF


def for_stage(cfg, stage: str):
  """A copy of the stage config `cfg` (a ConfigDict) whose `seed` is `stage_seed(seed, stage)`.

  Only the copy handed to the trainer changes; the loaders keep reading `cfg.seed`.
  """
  out = cfg.copy_and_resolve_references()
  with out.unlocked():
    out.seed = stage_seed(int(cfg.seed), stage)
  return out
