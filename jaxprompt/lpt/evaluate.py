"""Long-tailed evaluation: overall / many / medium / few-shot accuracy and plots.

Bucket rule of LPT's evaluation code (`phase2_test/eval_phase2.py`, lpt.md 5.4):
a class belongs to a bucket by its number of *training* images n, with
many n > 100, medium 20 < n <= 100, few n <= 20 (`convention="lpt"`). The OLTR
convention used by most other long-tail papers is many n > 100,
medium 20 <= n <= 100, few n < 20 (`convention="oltr"`); they differ only for
classes with exactly 20 training images (Places-LT: 6 classes).

Bucket accuracy is micro-averaged as in the reference: correct test images of the
bucket's classes / test images of those classes. On the balanced test sets of
Places-LT, CIFAR-100-LT and iNaturalist 2018 this equals the mean of per-class
accuracies; on an unbalanced test set the two differ, and the micro value is the one
the reference reports. `overall` is the plain accuracy over all test images (the
reference's (0, max n] range would also drop test classes with zero training images,
which no standard benchmark has).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

BUCKETS = ("many", "medium", "few")
CONVENTIONS = ("lpt", "oltr")


def _as_1d_int(name: str, x: Any) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    if not np.all(np.equal(np.mod(arr, 1), 0)):
      raise ValueError(f"{name} must hold integer class ids")
  return arr.astype(np.int64)


def _check_inputs(predictions: Any, labels: Any, train_class_counts: Any):
  preds = np.asarray(predictions)
  if preds.ndim == 2:  # logits or scores: (N, C) -> argmax
    preds = preds.argmax(axis=-1)
  preds = _as_1d_int("predictions", preds)
  labels = _as_1d_int("labels", labels)
  counts = _as_1d_int("train_class_counts", train_class_counts)
  if preds.shape[0] != labels.shape[0]:
    raise ValueError(f"length mismatch: {preds.shape[0]} predictions vs {labels.shape[0]} labels")
  num_classes = counts.shape[0]
  if num_classes == 0:
    raise ValueError("train_class_counts is empty")
  if np.any(counts < 0):
    raise ValueError("train_class_counts must be non-negative")
  for name, arr in (("labels", labels), ("predictions", preds)):
    bad = (arr < 0) | (arr >= num_classes)
    if np.any(bad):
      first = int(np.flatnonzero(bad)[0])
      raise ValueError(f"{name}[{first}] = {arr[first]} is outside [0, {num_classes}) "
                       f"(train_class_counts has {num_classes} classes)")
  return preds, labels, counts


def shot_buckets(train_class_counts: Any, convention: str = "lpt") -> Dict[str, np.ndarray]:
  """Boolean class masks {'many', 'medium', 'few'} for the given convention."""
  counts = np.asarray(train_class_counts)
  if convention == "lpt":
    return {"many": counts > 100, "medium": (counts > 20) & (counts <= 100), "few": counts <= 20}
  if convention == "oltr":
    return {"many": counts > 100, "medium": (counts >= 20) & (counts <= 100), "few": counts < 20}
  raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")


def shot_accuracy(predictions: Any, labels: Any, train_class_counts: Any,
                  convention: str = "lpt") -> Dict[str, float]:
  """{'overall', 'many', 'medium', 'few'} accuracies as fractions; NaN for an empty bucket.

  predictions: (N,) predicted class ids, or (N, C) scores (argmax is taken).
  labels: (N,) true class ids. train_class_counts: (C,) training images per class.
  """
  preds, labels, counts = _check_inputs(predictions, labels, train_class_counts)
  masks = shot_buckets(counts, convention)
  correct = preds == labels
  out = {"overall": float(correct.mean()) if labels.size else float("nan")}
  for name in BUCKETS:
    in_bucket = masks[name][labels]  # per test image: does its class fall in the bucket
    total = int(in_bucket.sum())
    out[name] = float(correct[in_bucket].sum() / total) if total else float("nan")
  return out


def per_class_accuracy(predictions: Any, labels: Any, num_classes: int) -> np.ndarray:
  """(C,) accuracy of each class over its test images; NaN for classes without any."""
  counts = np.zeros(num_classes, np.int64)
  preds, labels, _ = _check_inputs(predictions, labels, counts)
  total = np.bincount(labels, minlength=num_classes).astype(np.float64)
  hit = np.bincount(labels, weights=(preds == labels).astype(np.float64), minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, hit / np.maximum(total, 1), np.nan)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # headless: files only
  import matplotlib.pyplot as plt
  return plt


def plot_per_class_accuracy(predictions: Any, labels: Any, train_class_counts: Any,
                            path: Union[str, os.PathLike], *, convention: str = "lpt",
                            title: Optional[str] = None) -> np.ndarray:
  """Bar plot of per-class accuracy, classes ordered by training count (largest first).

  The training counts are drawn on a log-scale second axis and bucket boundaries as
  vertical lines. Writes `path` and returns the class order used.
  """
  preds, labels, counts = _check_inputs(predictions, labels, train_class_counts)
  acc = per_class_accuracy(preds, labels, counts.shape[0])
  order = np.argsort(-counts, kind="stable")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(10, 4))
  x = np.arange(order.size)
  ax.bar(x, np.nan_to_num(acc[order] * 100.0), width=1.0, color="tab:blue", alpha=0.7)
  ax.set_xlabel("class (sorted by training images)")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_xlim(-0.5, order.size - 0.5)
  ax2 = ax.twinx()
  ax2.plot(x, np.maximum(counts[order], 1), color="tab:red", lw=1.5)
  ax2.set_yscale("log")
  ax2.set_ylabel("training images", color="tab:red")
  masks = shot_buckets(counts[order], convention)
  for name in ("many", "medium"):
    n = int(masks[name].sum())
    if 0 < n < order.size:
      start = int(np.flatnonzero(masks[name])[0])
      ax.axvline(start + n - 0.5, color="k", ls="--", lw=0.8)
  res = shot_accuracy(preds, labels, counts, convention)
  ax.set_title(title or "overall {:.2f} | many {:.2f} | medium {:.2f} | few {:.2f}".format(
      *(100 * res[k] for k in ("overall", "many", "medium", "few"))))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return order


def plot_bucket_accuracy(results: Union[Mapping[str, float], Mapping[str, Mapping[str, float]]],
                         path: Union[str, os.PathLike], *, title: Optional[str] = None) -> None:
  """Grouped bars of overall/many/medium/few for one result dict or {method: result}."""
  if all(isinstance(v, (int, float, np.floating)) for v in results.values()):
    results = {"": results}
  keys = ("overall",) + BUCKETS
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  names = list(results)
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    vals = [100.0 * float(results[name].get(k, np.nan)) for k in keys]
    pos = np.arange(len(keys)) + (i - (len(names) - 1) / 2) * width
    ax.bar(pos, np.nan_to_num(vals), width=width, label=name or None)
  ax.set_xticks(np.arange(len(keys)))
  ax.set_xticklabels(keys)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  if any(names):
    ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
