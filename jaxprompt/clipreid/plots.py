"""Re-identification figures: a CMC curve and a grid of ranked results.

Both write PNG files and touch no global matplotlib state (the figure is drawn on an
Agg canvas directly), so they are safe on headless machines and in threads.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

HIT = (0, 200, 0)
MISS = (220, 0, 0)
QUERY = (40, 40, 40)
BACKGROUND = (255, 255, 255)


def plot_cmc(cmc, path: str, label: Optional[str] = None, title: str = "CMC",
             ranks: Optional[int] = None, dpi: int = 100,
             figsize: Tuple[float, float] = (5.0, 4.0)) -> str:
  """CMC curve (rank 1..len(cmc) on x, matching rate in % on y) saved as a PNG.

  `cmc` is one curve or a dict {label: curve} for several; `ranks` truncates the x axis.
  The image is figsize x dpi pixels. Returns `path`.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  curves = cmc if isinstance(cmc, dict) else {label: cmc}
  fig = Figure(figsize=figsize, dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for name, curve in curves.items():
    curve = np.asarray(curve, np.float64).ravel()
    if ranks is not None:
      curve = curve[:ranks]
    if curve.size == 0:
      raise ValueError("empty CMC curve")
    r = np.arange(1, curve.size + 1)
    text = f"{name} (R1 {100 * curve[0]:.1f}%)" if name else None
    ax.plot(r, 100 * curve, marker="o" if curve.size <= 20 else None, markersize=3, label=text)
  ax.set_xlabel("rank")
  ax.set_ylabel("matching rate (%)")
  ax.set_title(title)
  ax.set_ylim(0, 100)
  ax.grid(True, alpha=0.3)
  if any(curves):
    ax.legend(loc="lower right")
  _makedirs(path)
  fig.savefig(path, format="png")
  return path


def ranked_grid(query_paths: Sequence[str], gallery_paths: Sequence[str], distmat,
                q_pids, g_pids, q_camids, g_camids, path: str, topk: int = 10,
                num_queries: int = 8, query_indices: Optional[Sequence[int]] = None,
                cell: Tuple[int, int] = (64, 128), border: int = 4, pad: int = 4) -> str:
  """One row per query: the query image, then its top-k gallery images.

  The ranking is the evaluation's (`evaluate`): by distance, ties by gallery index,
  same-pid same-camid gallery items removed. Gallery images get a green border when
  their pid is the query's and a red one otherwise; the query a dark grey one.
  Queries are the first `num_queries` (or `query_indices`). Each cell is `cell`
  (width, height) pixels with the border inside it; the PNG is
  (pad + (topk + 1) * (w + pad)) x (pad + rows * (h + pad)). Returns `path`.
  """
  distmat = np.asarray(distmat)
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  nq, ng = distmat.shape
  if len(query_paths) != nq or len(gallery_paths) != ng:
    raise ValueError(f"distmat {distmat.shape} does not match {len(query_paths)} query and "
                     f"{len(gallery_paths)} gallery paths")
  for name, v, n in (("q_pids", q_pids, nq), ("g_pids", g_pids, ng),
                     ("q_camids", q_camids, nq), ("g_camids", g_camids, ng)):
    if v.shape != (n,):
      raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
  if topk < 1:
    raise ValueError(f"topk must be >= 1, got {topk}")
  rows = list(query_indices) if query_indices is not None else list(range(min(num_queries, nq)))
  if not rows:
    raise ValueError("no query to show")
  w, h = cell
  width = pad + (topk + 1) * (w + pad)
  height = pad + len(rows) * (h + pad)
  canvas = Image.new("RGB", (width, height), BACKGROUND)
  for r, qi in enumerate(rows):
    y = pad + r * (h + pad)
    _paste(canvas, query_paths[qi], pad, y, cell, border, QUERY)
    order = np.argsort(distmat[qi], kind="stable")
    keep = ~((g_pids[order] == q_pids[qi]) & (g_camids[order] == q_camids[qi]))
    for c, gi in enumerate(order[keep][:topk]):
      color = HIT if g_pids[gi] == q_pids[qi] else MISS
      _paste(canvas, gallery_paths[gi], pad + (c + 1) * (w + pad), y, cell, border, color)
  _makedirs(path)
  canvas.save(path, format="PNG")
  return path


def _paste(canvas: Image.Image, src: str, x: int, y: int, cell: Tuple[int, int], border: int,
           color: Tuple[int, int, int]) -> None:
  w, h = cell
  ImageDraw.Draw(canvas).rectangle([x, y, x + w - 1, y + h - 1], fill=color)
  inner = (w - 2 * border, h - 2 * border)
  if inner[0] > 0 and inner[1] > 0:
    with Image.open(src) as im:
      canvas.paste(im.convert("RGB").resize(inner, Image.BILINEAR), (x + border, y + border))


def _makedirs(path: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
