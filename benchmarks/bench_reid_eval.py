"""Benchmark: `jaxprompt.clipreid.ranking.evaluate` against a per-query numpy loop.

Market-1501's test split is simulated: 750 identities over 6 cameras, 3,368 queries,
15,913 gallery images of which 2,793 are pid-0 distractors, 256-d features that
cluster by identity, L2-normalised, squared Euclidean distances. The baseline is the
reference protocol (`utils/metrics.py eval_func`): argsort every row, then a loop over
queries. The two results must agree; the target is a ratio of at least 10.

  python benchmarks/bench_reid_eval.py [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxprompt.clipreid.ranking import euclidean_squared, evaluate, evaluate_features  # noqa: E402


def loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
  """The reference protocol, one query at a time, as `eval_func` computes it."""
  indices = np.argsort(distmat, axis=1)
  matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
  all_cmc, all_ap = [], []
  for i in range(distmat.shape[0]):
    order = indices[i]
    keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
    hits = matches[i][keep]
    if not hits.any():
      continue
    cmc = hits.cumsum()
    cmc[cmc > 1] = 1
    all_cmc.append(cmc[:max_rank])
    precision = hits.cumsum() / np.arange(1, len(hits) + 1)
    all_ap.append((precision * hits).sum() / hits.sum())
  return np.asarray(all_cmc, np.float32).mean(0), float(np.mean(all_ap))


def market_like(seed: int = 0, dim: int = 256, scale: float = 1.0):
  rng = np.random.default_rng(seed)
  n_ids, n_cams, n_query, n_gallery, n_distractors = (
      max(2, int(n * scale)) if i != 1 else n
      for i, n in enumerate((750, 6, 3368, 15913, 2793)))
  centers = rng.standard_normal((n_ids + 1, dim)).astype(np.float32)
  q_pids = rng.integers(1, n_ids + 1, n_query)
  g_pids = np.concatenate([rng.integers(1, n_ids + 1, n_gallery - n_distractors),
                           np.zeros(n_distractors, np.int64)])
  q_camids = rng.integers(0, n_cams, n_query)
  g_camids = rng.integers(0, n_cams, n_gallery)
  noise = 2.0  # R1 ~0.87, mAP ~0.48: matches spread over the ranking, like a real model
  qf = centers[q_pids] + noise * rng.standard_normal((n_query, dim)).astype(np.float32)
  gf = centers[g_pids] + noise * rng.standard_normal((n_gallery, dim)).astype(np.float32)
  gf[g_pids == 0] = rng.standard_normal((n_distractors, dim)).astype(np.float32) * 1.5
  qf /= np.linalg.norm(qf, axis=1, keepdims=True)
  gf /= np.linalg.norm(gf, axis=1, keepdims=True)
  return qf, gf, q_pids, g_pids, q_camids, g_camids


def best_time(fn, repeats: int):
  best, out = float("inf"), None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="a 2%% sized split, one repeat")
  args = ap.parse_args()
  if args.quick:
    args.repeats = 1
  qf, gf, q_pids, g_pids, q_camids, g_camids = market_like(scale=0.02 if args.quick else 1.0)
  distmat = euclidean_squared(qf, gf)
  ids = (q_pids, g_pids, q_camids, g_camids)
  print(f"distmat {distmat.shape} {distmat.dtype}")

  t_fast, (cmc, m_ap) = best_time(lambda: evaluate(distmat, *ids), args.repeats)
  t_loop, (cmc_ref, m_ap_ref) = best_time(lambda: loop_reference(distmat, *ids), args.repeats)
  t_feat, (cmc_f, m_ap_f) = best_time(lambda: evaluate_features(qf, gf, *ids), args.repeats)

  err_cmc = float(np.abs(cmc - cmc_ref).max())
  err_map = abs(m_ap - m_ap_ref)
  print(f"R1 {cmc[0]:.4f}  R5 {cmc[4]:.4f}  R10 {cmc[9]:.4f}  mAP {m_ap:.4f}")
  print(f"agreement with the loop: max |dCMC| {err_cmc:.2e}, |dmAP| {err_map:.2e}")
  print(f"per-query loop     {t_loop:8.3f} s")
  print(f"evaluate           {t_fast:8.3f} s")
  print(f"evaluate_features  {t_feat:8.3f} s  (incl. distances, block by block)")
  print(f"speed-up           {t_loop / t_fast:8.1f} x  (target >= 10)")
  if err_cmc > 1e-6 or err_map > 1e-6 or abs(m_ap_f - m_ap) > 1e-4:
    raise SystemExit("results disagree")


if __name__ == "__main__":
  main()
