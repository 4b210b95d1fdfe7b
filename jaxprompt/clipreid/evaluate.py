"""Helpers shared by ReID pipelines: batched feature extraction, evaluation glue, schedules.

* `BatchedApply`: one jitted `fn(variables, batch) -> (B, D)` run over a list of records in
  fixed-size batches split over the mesh (the last batch is padded, so it compiles once).
* `evaluate_split`: CMC/mAP (optionally re-ranked) from query/gallery features, plus the
  CMC curve and ranked-results grid PNGs.
* `epoch_schedule`: an optax schedule from a per-epoch lr function, following the loader's
  actual epoch lengths (P x K samplers give epochs of slightly different lengths).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxprompt import sharding as shd
from jaxprompt.data.loader import Loader, PaddedSequentialSampler
from jaxprompt.clipreid import plots
from jaxprompt.clipreid import ranking as reid_eval
from jaxprompt.clipreid.reranking import re_ranking



# ---------------------------------------------------------------------------------------------
# Batched, jitted extraction


def round_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size (and process count) >= batch_size."""
  m = int(np.lcm(mesh.size, jax.process_count()))
  return max(m, -(-int(batch_size) // m) * m)


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class BatchedApply:
  """`fn(variables, batch) -> (B, ...)` jitted once over `mesh`; variables replicated.

  Call with a variables tree, records and a `decode(record, rng)`; returns the stacked
  outputs for the records, in order, as a host numpy array.
  """

  def __init__(self, fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
               mesh: jax.sharding.Mesh, batch_size: int, workers: int = 0):
    self.mesh = mesh
    self.batch_size = round_batch(batch_size, mesh)
    self.workers = int(workers)
    self._repl = shd.replicated(mesh)
    self._fn = jax.jit(fn, in_shardings=(self._repl, shd.batch_sharding(mesh)),
                       out_shardings=shd.batch_sharding(mesh))

  def place(self, variables: Any) -> Any:
    """Put a host variables tree on the mesh once (reuse it across calls)."""
    return shd.put(variables, jax.tree.map(lambda _: self._repl, variables))

  def __call__(self, variables: Any, records: Sequence[Any],
               decode: Callable[[Any, np.random.Generator], dict]) -> np.ndarray:
    n = len(records)
    if n == 0:
      raise ValueError("no records to run the model on")
    loader = Loader(records, decode, PaddedSequentialSampler(n, self.batch_size), self.batch_size,
                    seed=0, workers=self.workers)
    outs = []
    with jax.set_mesh(self.mesh):
      for local in loader.iterate(0):
        outs.append(_to_host(self._fn(variables, shd.global_batch(local, self.mesh))))
    return np.concatenate(outs)[:n]


# ---------------------------------------------------------------------------------------------
# Schedules


def epoch_schedule(epoch_fn: Callable[[int], float], loader, total_steps: int,
                   first_epoch: int = 1) -> Callable[[Any], jax.Array]:
  """optax schedule: a step of (0-based) loader epoch e runs at `epoch_fn(first_epoch + e)`.

  Epoch boundaries come from `loader.steps_per_epoch(e)`, so samplers whose epochs differ in
  length (identity P x K) still switch the lr exactly at epoch starts, as the reference's
  per-epoch `scheduler.step()` does.
  """
  bounds, lrs, acc, e = [], [], 0, 0
  while acc < total_steps:
    n = int(loader.steps_per_epoch(e))
    if n <= 0:
      raise ValueError(f"epoch {e} of the loader has no full batch")
    acc += n
    bounds.append(acc)
    lrs.append(float(epoch_fn(first_epoch + e)))
    e += 1
  bounds_a = jnp.asarray(bounds, jnp.int32)
  lrs_a = jnp.asarray(lrs, jnp.float32)

  def schedule(step):
    idx = jnp.searchsorted(bounds_a, jnp.asarray(step, jnp.int32), side="right")
    return lrs_a[jnp.clip(idx, 0, len(lrs) - 1)]

  return schedule


# ---------------------------------------------------------------------------------------------
# Evaluation glue


def _pids_cams(records) -> tuple[np.ndarray, np.ndarray]:
  return (np.asarray([r.pid for r in records], np.int64),
          np.asarray([r.camid for r in records], np.int64))


def evaluate_split(qf: np.ndarray, gf: np.ndarray, query, gallery, *, max_rank: int = 50,
                   rerank: bool = False, k1: int = 50, k2: int = 15, lambda_value: float = 0.3,
                   block: int = 256, plot_dir: Optional[str] = None, label: str = "",
                   grid_queries: int = 8, grid_topk: int = 10) -> dict:
  """R1/R5/R10/mAP of L2-normalised features on one query/gallery split (Market protocol).

  With `plot_dir`, writes `cmc.png` and `ranked.png` there (process 0 only).
  """
  q_pids, q_cams = _pids_cams(query)
  g_pids, g_cams = _pids_cams(gallery)
  if rerank:
    distmat = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    cmc, m_ap = reid_eval.evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
  else:
    distmat = None
    cmc, m_ap = reid_eval.evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams,
                                            max_rank=max_rank, block=block)
  rank = lambda r: float(cmc[min(r, len(cmc)) - 1])  # noqa: E731
  out = {"mAP": float(m_ap), "R1": rank(1), "R5": rank(5), "R10": rank(10),
         "num_query": len(query), "num_gallery": len(gallery), "reranking": bool(rerank),
         "cmc": [float(c) for c in cmc]}
  if plot_dir and jax.process_index() == 0:
    os.makedirs(plot_dir, exist_ok=True)
    plots.plot_cmc(cmc, os.path.join(plot_dir, "cmc.png"), label=label or None)
    nq = min(grid_queries, len(query))
    if nq:
      d = distmat[:nq] if distmat is not None else reid_eval.euclidean_squared(qf[:nq], gf)
      plots.ranked_grid([r.path for r in query[:nq]], [r.path for r in gallery], d,
                        q_pids[:nq], g_pids, q_cams[:nq], g_cams,
                        os.path.join(plot_dir, "ranked.png"), topk=min(grid_topk, len(gallery)),
                        num_queries=nq)
  return out


def log_results(name: str, res: Mapping[str, Any]) -> str:
  line = (f"{name}: mAP {100 * res['mAP']:.1f}%  R1 {100 * res['R1']:.1f}%  "
          f"R5 {100 * res['R5']:.1f}%  R10 {100 * res['R10']:.1f}%")
  logging.info("%s", line)
  print(line, flush=True)
  return line
