"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), as CLIP-ReID's `utils/reranking.py`.

Same algorithm and parameters as the reference `re_ranking(probFea, galFea, k1, k2,
lambda_value)`:

1. d = squared Euclidean distances over query + gallery (N = Q + G items), each row
   divided by its maximum;
2. R(i) = the k1 + 1 nearest items of i (i itself included); the k-reciprocal set
   kr(i) = {j in R(i) : i in R(j)}; it is expanded with the round(k1 / 2)-reciprocal
   set of each j in kr(i) that shares more than 2/3 of its items with kr(i);
3. V[i, j] = exp(-d_ij) / sum over the expanded set, 0 elsewhere;
4. local query expansion (k2 > 1): V[i] = mean of V over the k2 nearest items of i;
5. Jaccard distance J_ig = 1 - m / (2 - m) with m = sum_k min(V[i, k], V[g, k]);
6. final = (1 - lambda) J + lambda d, for queries x gallery.

Differences from the reference: V and J are float64/float32 instead of float16
(the reference's float16 rounding is not part of the method), and the nearest
neighbours are ordered by (distance, index), the reference's argsort order when
distances are distinct.

Memory. Nothing of size N x N is built: the neighbour lists are N x (k1 + 1)
integers, V is a sparse matrix with about N x k2 x |expanded set| entries (a few
hundred per row for k1 = 20, k2 = 6), distances are computed `block` rows at a time
(block x N float32), and Jaccard terms are accumulated per chunk of queries with a
bounded number of (query, gallery) pairs. The only large array is the Q x G float32
result; `re_ranking_blocks` yields it block by block instead (MSMT17: 11,659 x 82,161
would be 3.8 GB as one array).
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
import scipy.sparse as sp

# Largest number of (query nonzero, gallery nonzero) pairs handled at once.
_PAIR_BUDGET = 1 << 22


def re_ranking(probFea, galFea, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               block: int = 1024) -> np.ndarray:
  """Re-ranked (num_query, num_gallery) float32 distances (smaller is closer)."""
  q = np.asarray(probFea).shape[0]
  g = np.asarray(galFea).shape[0]
  out = np.empty((q, g), np.float32)
  for start, rows in re_ranking_blocks(probFea, galFea, k1, k2, lambda_value, block):
    out[start:start + rows.shape[0]] = rows
  return out


def re_ranking_blocks(probFea, galFea, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                      block: int = 1024) -> Iterator[Tuple[int, np.ndarray]]:
  """Yields (first query row, re-ranked rows) blocks of the result of `re_ranking`."""
  qf = np.asarray(probFea, np.float32)
  gf = np.asarray(galFea, np.float32)
  if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
    raise ValueError(f"features must be (num, dim) with equal dims, got {qf.shape} and {gf.shape}")
  if k1 < 1 or k2 < 1:
    raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
  nq = qf.shape[0]
  feat = np.concatenate([qf, gf])
  n = feat.shape[0]
  sq = np.sum(feat * feat, axis=1)
  kk = min(max(k1 + 1, k2), n)

  # 1-2. Row maxima and nearest neighbours, block by block.
  rowmax = np.empty(n, np.float64)
  nn = np.empty((n, kk), np.int64)
  for s in range(0, n, block):
    d = _dist(feat[s:s + block], feat, sq[s:s + block], sq)
    rowmax[s:s + d.shape[0]] = d.max(axis=1)
    nn[s:s + d.shape[0]] = _nearest(d, kk)

  kr_keys = _reciprocal_keys(nn[:, :min(k1 + 1, kk)], n)
  kh = min(int(np.around(k1 / 2)) + 1, kk)
  nn_h = nn[:, :kh]
  half_mask = _reciprocal_mask(nn_h)
  half_size = half_mask.sum(axis=1)

  # Expansion: candidate c in kr(i) adds its half set H(c) when
  # |H(c) & kr(i)| > 2/3 |H(c)|.
  i_of, c_of = np.divmod(kr_keys, n)
  members = i_of[:, None] * n + nn_h[c_of]  # (pairs, kh) keys (i, h)
  pos = np.searchsorted(kr_keys, members)
  found = kr_keys[np.minimum(pos, len(kr_keys) - 1)] == members
  common = np.sum(found & half_mask[c_of], axis=1)
  take = common > 2 / 3 * half_size[c_of]
  extra = members[take][half_mask[c_of[take]]]
  keys = np.unique(np.concatenate([kr_keys, extra]))
  rows, cols = np.divmod(keys, n)

  # 3. V over the expanded sets, weights exp(-normalised distance).
  w = np.exp(-_pair_dist(feat, sq, rows, cols) / rowmax[rows])
  w /= np.bincount(rows, weights=w, minlength=n)[rows]
  v = sp.csr_matrix((w, (rows, cols)), shape=(n, n))

  # 4. Local query expansion over the k2 nearest neighbours.
  if k2 != 1:
    k2e = min(k2, kk)
    a = sp.csr_matrix((np.full(n * k2e, 1.0 / k2e), (np.repeat(np.arange(n), k2e),
                                                    nn[:, :k2e].ravel())), shape=(n, n))
    v = (a @ v).tocsr()
    v.sort_indices()

  # 5-6. Jaccard distances between queries and gallery, then the blend.
  vg = v[nq:].tocsc()
  col_nnz = np.diff(vg.indptr)
  nz_row = np.repeat(np.arange(n), np.diff(v.indptr))
  row_pairs = np.bincount(nz_row, weights=col_nnz[v.indices], minlength=n)[:nq]
  ng = n - nq
  s = 0
  while s < nq:
    # Grow the chunk while its pairs fit the budget (at least one query, at most `block`).
    e = s + 1
    total = row_pairs[s]
    while e < nq and e - s < block and total + row_pairs[e] <= _PAIR_BUDGET:
      total += row_pairs[e]
      e += 1
    m = _min_overlap(v, vg, s, e, ng)
    jac = 1.0 - m / (2.0 - m)
    orig = _dist(feat[s:e], feat[nq:], sq[s:e], sq[nq:]) / rowmax[s:e, None]
    yield s, (jac * (1 - lambda_value) + orig * lambda_value).astype(np.float32)
    s = e


def _dist(a, b, sa, sb) -> np.ndarray:
  """Squared Euclidean distances, float32, as the reference's addmm."""
  d = a @ b.T
  d *= -2
  d += sa[:, None]
  d += sb[None, :]
  return d


def _pair_dist(feat, sq, rows, cols, chunk: int = 1 << 16) -> np.ndarray:
  out = np.empty(len(rows), np.float64)
  for s in range(0, len(rows), chunk):
    r, c = rows[s:s + chunk], cols[s:s + chunk]
    dot = np.einsum("ij,ij->i", feat[r], feat[c])
    out[s:s + chunk] = sq[r] + sq[c] - np.float32(2) * dot
  return out


def _nearest(d: np.ndarray, k: int) -> np.ndarray:
  """The k smallest entries of each row, ordered by (distance, index)."""
  if k < d.shape[1]:
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
  else:
    part = np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
  vals = np.take_along_axis(d, part, axis=1)
  order = np.lexsort((part, vals), axis=1)
  return np.take_along_axis(part, order, axis=1)


def _reciprocal_mask(nn: np.ndarray, chunk: int = 4096) -> np.ndarray:
  """mask[i, a] = i is among the neighbours of nn[i, a]."""
  n = nn.shape[0]
  out = np.empty(nn.shape, bool)
  for s in range(0, n, chunk):
    idx = np.arange(s, min(s + chunk, n))
    out[idx] = np.any(nn[nn[idx]] == idx[:, None, None], axis=2)
  return out


def _reciprocal_keys(nn: np.ndarray, n: int) -> np.ndarray:
  """Sorted keys i * n + j of the k-reciprocal pairs (j in kr(i))."""
  mask = _reciprocal_mask(nn)
  rows = np.broadcast_to(np.arange(nn.shape[0])[:, None], nn.shape)
  return np.sort(rows[mask] * n + nn[mask])


def _min_overlap(v: sp.csr_matrix, vg: sp.csc_matrix, s: int, e: int, ng: int) -> np.ndarray:
  """m[i, g] = sum_k min(V[i, k], V[nq + g, k]) for queries s..e-1 (dense, float64)."""
  lo, hi = v.indptr[s], v.indptr[e]
  k = v.indices[lo:hi]
  val = v.data[lo:hi]
  qrow = np.repeat(np.arange(e - s), np.diff(v.indptr[s:e + 1]))
  starts, lens = vg.indptr[k], np.diff(vg.indptr)[k]
  total = int(lens.sum())
  owner = np.repeat(np.arange(len(k)), lens)
  pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens - starts, lens)
  mins = np.minimum(val[owner], vg.data[pos])
  flat = qrow[owner] * ng + vg.indices[pos]
  return np.bincount(flat, weights=mins, minlength=(e - s) * ng).reshape(e - s, ng)
