"""Re-ID evaluation: CMC/mAP against a brute-force loop, re-ranking against a dense
implementation, and the figures."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import jaxprompt.clipreid.ranking as reid
from jaxprompt.clipreid.plots import HIT, MISS, QUERY, plot_cmc, ranked_grid
from jaxprompt.clipreid.ranking import (euclidean_squared, evaluate, evaluate_features,
                                       l2_normalize, rank_matches)
from jaxprompt.clipreid.reranking import re_ranking, re_ranking_blocks


def loop_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
  """The reference `eval_func`, with a stable argsort so ties have one defined order."""
  num_g = distmat.shape[1]
  max_rank = min(max_rank, num_g)
  indices = np.argsort(distmat, axis=1, kind="stable")
  matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
  all_cmc, all_ap = [], []
  for i in range(distmat.shape[0]):
    order = indices[i]
    keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
    hits = matches[i][keep]
    if not hits.any():
      continue
    cmc = np.minimum(hits.cumsum(), 1)
    cmc = np.concatenate([cmc, np.ones(max(0, max_rank - len(cmc)), cmc.dtype)])
    all_cmc.append(cmc[:max_rank])
    precision = hits.cumsum() / np.arange(1, len(hits) + 1)
    all_ap.append((precision * hits).sum() / hits.sum())
  return np.mean(np.asarray(all_cmc, np.float64), axis=0), float(np.mean(all_ap))


def random_case(rng, nq, ng, n_ids, n_cams=3, tie_levels=None, dtype=np.float32):
  if tie_levels:  # few distinct values: many ties
    d = rng.integers(0, tie_levels, (nq, ng)).astype(dtype)
  else:
    d = rng.random((nq, ng)).astype(dtype)
  return (d, rng.integers(0, n_ids, nq) - 1, rng.integers(0, n_ids, ng) - 1,
          rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng))


def assert_same(got, ref):
  np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-12)
  assert got[1] == pytest.approx(ref[1], abs=1e-12)


# ------------------------------------------------------------------------- evaluate

def test_hand_example():
  # One query (pid 1, cam 0). Gallery by distance: g0 pid 1 cam 0 (removed),
  # g1 pid 2, g2 pid 1 cam 1 (hit), g3 pid 3, g4 pid 1 cam 2 (hit).
  # Kept ranking: miss, hit, miss, hit -> first hit at rank 2;
  # AP = (1/2 + 2/4) / 2 = 0.5.
  d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
  cmc, m_ap = evaluate(d, [1], [1, 2, 1, 3, 1], [0], [0, 1, 1, 1, 2], max_rank=4)
  np.testing.assert_allclose(cmc, [0, 1, 1, 1])
  assert m_ap == pytest.approx(0.5)
  # A second query with no match under another camera is skipped.
  d2 = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]])
  cmc2, m_ap2 = evaluate(d2, [1, 3], [1, 2, 1, 3, 1], [0, 1], [0, 1, 1, 1, 2], max_rank=4)
  np.testing.assert_allclose(cmc2, cmc)
  assert m_ap2 == pytest.approx(0.5)


def test_ties_ordered_by_gallery_index():
  # All distances equal: the kept order is the gallery order.
  d = np.zeros((1, 4), np.float32)
  cmc, m_ap = evaluate(d, [5], [7, 5, 5, 8], [0], [1, 1, 0, 1], max_rank=3)
  np.testing.assert_allclose(cmc, [0, 1, 1])  # g2 is removed (same pid, same cam)
  assert m_ap == pytest.approx(0.5)


@pytest.mark.parametrize("tie_levels", [None, 3, 50])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_loop_on_random_data(tie_levels, dtype):
  rng = np.random.default_rng(0 if tie_levels is None else tie_levels)
  for _ in range(12):
    nq, ng = int(rng.integers(1, 30)), int(rng.integers(20, 200))
    case = random_case(rng, nq, ng, n_ids=int(rng.integers(2, 12)), tie_levels=tie_levels,
                       dtype=dtype)
    try:
      ref = loop_eval(*case)
    except ZeroDivisionError:
      continue
    if np.isnan(ref[1]):
      continue
    assert_same(evaluate(*case), ref)
    assert_same(evaluate(*case, max_rank=7), loop_eval(*case, max_rank=7))


def test_many_blocks_and_both_rank_paths(monkeypatch):
  rng = np.random.default_rng(1)
  case = random_case(rng, 300, 500, n_ids=40, n_cams=4, tie_levels=200)
  ref = loop_eval(*case)
  monkeypatch.setattr(reid, "_BLOCK_ELEMS", 500 * 37)  # 37-row blocks
  assert_same(evaluate(*case), ref)
  # The bucketed ranks and the sorted ranks agree exactly.
  d, qp, gp, qc, gc = case
  groups = reid._PidGroups(gp, gc)
  pr, pc, jr, jc = groups.matches(qp, qc)
  fast = reid._ranks_bucketed(d, pr, pc, jr, jc)
  assert fast is not None
  np.testing.assert_array_equal(fast, reid._ranks_sorted(d, pr, pc, jr, jc))


def test_degenerate_distances_fall_back_exactly():
  rng = np.random.default_rng(2)
  d, qp, gp, qc, gc = random_case(rng, 20, 300, n_ids=6)
  d[:, 5] = 1e30  # one outlier squeezes every other distance into one bucket
  assert_same(evaluate(d, qp, gp, qc, gc), loop_eval(d, qp, gp, qc, gc))
  d2 = d.copy()
  d2[3, 7], d2[4, :3], d2[5, 9] = np.inf, np.nan, -np.inf
  assert_same(evaluate(d2, qp, gp, qc, gc), loop_eval(d2, qp, gp, qc, gc))


def test_memmap_and_max_rank_truncation(tmp_path):
  rng = np.random.default_rng(3)
  d, qp, gp, qc, gc = random_case(rng, 10, 12, n_ids=3)
  mm = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float32, shape=d.shape)
  mm[:] = d
  cmc, m_ap = evaluate(mm, qp, gp, qc, gc)
  assert cmc.shape == (12,)  # max_rank is truncated to the gallery size
  assert_same((cmc, m_ap), loop_eval(d, qp, gp, qc, gc))


def test_rank_matches():
  d = np.array([[0.3, 0.1, 0.2, 0.0]])
  rows, cols, ranks = rank_matches(d, [1], [1, 1, 2, 1], [0], [1, 1, 1, 0])
  # Kept order: g1 (0.1), g2 (0.2), g0 (0.3); g3 is removed.
  assert dict(zip(cols.tolist(), ranks.tolist())) == {0: 2, 1: 0}
  assert rows.tolist() == [0, 0]


def test_errors():
  d = np.zeros((2, 3))
  with pytest.raises(ValueError, match="no valid query"):
    evaluate(d, [1, 2], [1, 3, 3], [0, 0], [0, 0, 0])
  with pytest.raises(ValueError, match="q_pids must be 1-D of length 2"):
    evaluate(d, [1], [1, 3, 3], [0, 0], [0, 0, 0])
  with pytest.raises(ValueError, match="g_camids"):
    evaluate(d, [1, 2], [1, 3, 3], [0, 0], [0, 0])
  with pytest.raises(ValueError, match="2-D"):
    evaluate(np.zeros(3), [1], [1, 3, 3], [0], [0, 0, 0])
  with pytest.raises(ValueError, match="integers"):
    evaluate(d, ["a", "b"], [1, 3, 3], [0, 0], [0, 0, 0])
  with pytest.raises(ValueError, match="max_rank"):
    evaluate(d, [1, 2], [1, 3, 3], [0, 0], [1, 1, 1], max_rank=0)
  with pytest.raises(ValueError, match="feature sizes"):
    evaluate_features(np.zeros((2, 4)), np.zeros((3, 5)), [1, 2], [1, 3, 3], [0, 0], [1, 1, 1])


def test_evaluate_features_blocks():
  rng = np.random.default_rng(4)
  centers = rng.standard_normal((8, 16))
  qp, gp = rng.integers(0, 8, 37), rng.integers(0, 8, 150)
  qf = (centers[qp] + 0.8 * rng.standard_normal((37, 16))).astype(np.float32)
  gf = (centers[gp] + 0.8 * rng.standard_normal((150, 16))).astype(np.float32)
  qc, gc = rng.integers(0, 3, 37), rng.integers(0, 3, 150)
  qn, gn = l2_normalize(qf), l2_normalize(gf)
  d = euclidean_squared(qn, gn)
  ref_d = (qn ** 2).sum(1)[:, None] + (gn ** 2).sum(1)[None] - 2 * qn @ gn.T
  np.testing.assert_allclose(d, ref_d, atol=1e-5)
  ref = evaluate(d, qp, gp, qc, gc)
  got = evaluate_features(qf, gf, qp, gp, qc, gc, block=5, normalize=True)
  assert_same(got, ref)
  assert 0.0 < ref[1] < 1.0


# ----------------------------------------------------------------------- re-ranking

def dense_re_ranking(qf, gf, k1, k2, lam):
  """Straightforward dense k-reciprocal re-ranking, float64, loops as in the paper."""
  feat = np.concatenate([qf, gf]).astype(np.float64)
  nq, n = len(qf), len(feat)
  sq = (feat ** 2).sum(1)
  d = sq[:, None] + sq[None, :] - 2 * feat @ feat.T
  d = d / d.max(axis=1, keepdims=True)
  rank = np.argsort(d, axis=1, kind="stable")
  v = np.zeros((n, n))
  kh = int(np.around(k1 / 2))
  for i in range(n):
    kr = [j for j in rank[i, :k1 + 1] if i in rank[j, :k1 + 1]]
    expanded = list(kr)
    for c in kr:
      ckr = [j for j in rank[c, :kh + 1] if c in rank[j, :kh + 1]]
      if len(set(ckr) & set(kr)) > 2 / 3 * len(ckr):
        expanded += ckr
    expanded = np.unique(expanded)
    w = np.exp(-d[i, expanded])
    v[i, expanded] = w / w.sum()
  if k2 != 1:
    v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
  jac = np.zeros((nq, n))
  for i in range(nq):
    m = np.minimum(v[i][None, :], v).sum(1)
    jac[i] = 1 - m / (2 - m)
  return (jac * (1 - lam) + d[:nq] * lam)[:, nq:]


@pytest.mark.parametrize("q,g,k1,k2", [(7, 40, 20, 6), (10, 60, 5, 3), (5, 30, 8, 1),
                                       (3, 12, 20, 6)])
def test_re_ranking_matches_dense(q, g, k1, k2):
  rng = np.random.default_rng(q * 100 + g)
  qf = rng.standard_normal((q, 8)).astype(np.float32)
  gf = rng.standard_normal((g, 8)).astype(np.float32)
  got = re_ranking(qf, gf, k1, k2, 0.3, block=7)
  assert got.shape == (q, g) and got.dtype == np.float32
  np.testing.assert_allclose(got, dense_re_ranking(qf, gf, k1, k2, 0.3), atol=1e-5)
  blocks = list(re_ranking_blocks(qf, gf, k1, k2, 0.3, block=3))
  assert [s for s, _ in blocks] == list(range(0, q, 3))
  np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), got, atol=1e-7)


def test_re_ranking_improves_map_on_chains():
  # Each identity is a chain of images: consecutive ones are close, the ends are far,
  # so the query (one end) is far from its own far images but linked to them through
  # reciprocal neighbours. Re-ranking recovers them.
  rng = np.random.default_rng(0)
  n_ids, per, dim = 12, 8, 16
  feats, pids, cams = [], [], []
  for p in range(n_ids):
    start = rng.standard_normal(dim)
    step = rng.standard_normal(dim)
    step /= np.linalg.norm(step)
    for t in range(per):
      feats.append(start + 0.5 * t * step + 0.15 * rng.standard_normal(dim))
      pids.append(p)
      cams.append(t % 2)
  feats, pids, cams = np.asarray(feats, np.float32), np.asarray(pids), np.asarray(cams)
  qi = np.arange(0, len(pids), per)
  gi = np.setdiff1d(np.arange(len(pids)), qi)
  ids = (pids[qi], pids[gi], cams[qi], cams[gi])
  _, map_before = evaluate(euclidean_squared(feats[qi], feats[gi]), *ids)
  _, map_after = evaluate(re_ranking(feats[qi], feats[gi], k1=6, k2=3, lambda_value=0.3), *ids)
  assert map_before < 0.97
  assert map_after > map_before + 0.03


# -------------------------------------------------------------------------- figures

def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_cmc(tmp_path):
  cmc = np.linspace(0.6, 1.0, 50)
  path = plot_cmc(cmc, str(tmp_path / "sub" / "cmc.png"), label="ViT-B/16", dpi=50,
                  figsize=(4, 3))
  assert _is_png(path)
  with Image.open(path) as im:
    assert im.size == (200, 150)
  plot_cmc({"a": cmc, "b": cmc * 0.9}, str(tmp_path / "two.png"), ranks=10)
  assert _is_png(tmp_path / "two.png")


def test_ranked_grid(tmp_path):
  # 3 queries, 6 gallery images; each image is a flat colour so the centre is known.
  colours = [(10 * i, 100, 200) for i in range(9)]
  paths = []
  for i, c in enumerate(colours):
    p = tmp_path / f"{i}.jpg"
    Image.new("RGB", (32, 64), c).save(p, quality=100)
    paths.append(str(p))
  q_paths, g_paths = paths[:3], paths[3:]
  q_pids, g_pids = np.array([1, 2, 3]), np.array([1, 1, 2, 4, 3, 2])
  q_cams, g_cams = np.array([0, 0, 0]), np.array([0, 1, 1, 1, 1, 0])
  d = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # g0 removed -> g1 hit, g2 miss, g3 miss
                [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # g5 removed -> g4 miss, g3 miss, g2 hit
                [0.3, 0.3, 0.3, 0.3, 0.0, 0.3]])  # g4 hit, then ties in gallery order
  out = ranked_grid(q_paths, g_paths, d, q_pids, g_pids, q_cams, g_cams,
                    str(tmp_path / "grid.png"), topk=3, num_queries=3, cell=(40, 80), border=4,
                    pad=4)
  assert _is_png(out)
  with Image.open(out) as im:
    im = im.convert("RGB")
    assert im.size == (4 + 4 * 44, 4 + 3 * 84)

    def border(r, c):  # a pixel inside the border of cell (r, c)
      return im.getpixel((4 + c * 44 + 1, 4 + r * 84 + 1))

    def centre(r, c):
      return im.getpixel((4 + c * 44 + 20, 4 + r * 84 + 40))

    expected = [[HIT, MISS, MISS], [MISS, MISS, HIT], [HIT, MISS, MISS]]
    for r in range(3):
      assert border(r, 0) == QUERY
      for c in range(3):
        assert border(r, c + 1) == expected[r][c]
    shown = [[4, 5, 6], [7, 6, 5], [7, 3, 4]]  # image index in `colours`
    for r in range(3):
      assert np.allclose(centre(r, 0), colours[r], atol=3)
      for c in range(3):
        assert np.allclose(centre(r, c + 1), colours[shown[r][c]], atol=3)
