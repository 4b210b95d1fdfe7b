"""Long-tailed evaluation: overall / many / medium / few-shot accuracy and plots.

Bucket rule of LPT's evaluation code (DongSky/LPT `phase2_test/eval_phase2.py`):
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
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging

from jaxprompt import metrics as metrics_lib
from jaxprompt import optim
from jaxprompt.convert import io as cio
from jaxprompt.data import files as data_files
from jaxprompt.data.loader import Loader, PaddedSequentialSampler
from jaxprompt.lpt import data as longtail
from jaxprompt.lpt import model as lpt_model
from jaxprompt.lpt.context import Context, decode_fn, overlay, params_after
from jaxprompt.lpt.transforms import lpt_test_transform

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


# predict_folder accepts every format PIL reads well, not only the datasets' own.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _batched(records: Sequence, decode, batch: int, workers: int) -> Iterator[tuple[dict, int]]:
  """Fixed-shape batches over all records (the last one padded with record 0): (batch, valid)."""
  n = len(records)
  loader = Loader(records, decode, PaddedSequentialSampler(n, batch), batch, seed=0,
                  workers=workers, process_index=0, process_count=1)
  for i, b in enumerate(loader.iterate(0)):
    yield b, min(batch, n - i * batch)


def run_predict(predict, params, records: Sequence, decode, batch: int, workers: int,
                desc: str = "predict") -> dict[str, np.ndarray]:
  """Concatenated outputs of `predict(params, images)` over `records` (padding removed)."""
  outs: dict[str, list] = {}
  for b, valid in metrics_lib.progress(_batched(records, decode, batch, workers),
                                       total=-(-len(records) // batch), desc=desc):
    out = jax.device_get(predict(params, b["image"]))
    for k in ("pred", "indices"):
      if k in out:
        outs.setdefault(k, []).append(np.asarray(out[k])[:valid])
  return {k: np.concatenate(v) for k, v in outs.items()}


def evaluate(config, out_dir: str, predict, params, test: longtail.LTDataset,
             train_counts: np.ndarray, name: str, extra: Optional[Mapping[str, Any]] = None
             ) -> dict:
  """Shot accuracies (under `eval.convention`, and the other convention for reference),
  per-class accuracy, plots and `results.json` in `out_dir` (plus the `extra` fields)."""
  d = config.data
  res = run_predict(predict, params, test.records, decode_fn(config, train=False),
                    int(config.eval.batch_size), int(d.workers), desc=f"eval {name}")
  labels = test.labels
  conv = config.eval.convention
  acc = shot_accuracy(res["pred"], labels, train_counts, conv)
  other = "oltr" if conv == "lpt" else "lpt"
  per_class = per_class_accuracy(res["pred"], labels, test.num_classes)
  buckets = shot_buckets(train_counts, conv)
  result = {
      "name": name, "convention": conv, **{k: 100.0 * v for k, v in acc.items()},
      f"{other}_convention": {k: 100.0 * v for k, v in
                              shot_accuracy(res["pred"], labels, train_counts,
                                                    other).items()},
      "num_test": int(labels.size),
      "classes_per_bucket": {k: int(v.sum()) for k, v in buckets.items()},
      "per_class_accuracy": [None if np.isnan(a) else 100.0 * float(a) for a in per_class],
      **dict(extra or {}),
  }
  if "indices" in res:
    result["prompt_usage"] = np.bincount(res["indices"].reshape(-1),
                                         minlength=int(config.model.pool_size)).tolist()
  metrics_lib.write_json(os.path.join(out_dir, "results.json"), result, indent=1)
  if jax.process_index() == 0:
    np.save(os.path.join(out_dir, "predictions.npy"), res["pred"])
    if config.eval.plots:
      plot_per_class_accuracy(res["pred"], labels, train_counts,
                                      os.path.join(out_dir, "per_class_accuracy.png"),
                                      convention=conv)
      plot_bucket_accuracy({name: acc}, os.path.join(out_dir, "bucket_accuracy.png"),
                                   title=f"{name} ({conv} buckets)")
  logging.info("%s: overall %.2f | many %.2f | medium %.2f | few %.2f (%s buckets)", name,
               result["overall"], result["many"], result["medium"], result["few"], conv)
  return result


def predict_folder(config, predict, params, folder: str, output: str,
                   class_names: Optional[Sequence[str]] = None) -> list[tuple[str, int]]:
  """Writes `<relative path>\\t<class id>[\\t<class name>]` per image of `folder`."""
  paths = data_files.list_images(folder, IMAGE_EXTS)
  size, d = int(config.model.image_size), config.data
  resize = int(d.resize) or None

  def decode(path, rng):
    del rng
    x = lpt_test_transform(data_files.load_image(path), size, resize, mean=tuple(d.mean), std=tuple(d.std))
    return {"image": np.ascontiguousarray(x)}

  res = run_predict(predict, params, paths, decode, int(config.eval.batch_size), int(d.workers),
                    desc=f"predict {folder}")
  rows = [(os.path.relpath(p, folder), int(c)) for p, c in zip(paths, res["pred"])]
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      for rel, c in rows:
        extra = f"\t{class_names[c]}" if class_names else ""
        f.write(f"{rel}\t{c}{extra}\n")
  logging.info("predicted %d images of %s -> %s", len(rows), folder, output)
  return rows


SELECT = ("last", "best")


def _check_select(config) -> str:
  sel = config.eval.select
  if sel not in SELECT:
    raise ValueError(f"eval.select must be one of {SELECT}, got {sel!r}")
  return sel


def best_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "best")


def read_best(workdir: str, stage: str) -> Optional[dict]:
  """{'epoch', 'overall', 'history'} of `eval.select='best'` for `stage`, or None."""
  return metrics_lib.read_json(os.path.join(best_dir(workdir, stage), "best.json"))


def make_select_best(setup: Context, workdir: str, stage: str, phase: int):
  """`on_epoch_end` for `eval.select='best'`: overall test accuracy after each epoch; the
  trainable leaves of the best epoch go to `<stage>/best/params.npz` (kept across resumes)."""
  config = setup.config
  predict = lpt_model.make_predict(setup.vit, setup.spec, phase=phase,
                                   fused=bool(config.eval.fused))
  decode = decode_fn(config, train=False)
  out = best_dir(workdir, stage)

  def on_epoch_end(epoch: int, state: dict, frozen) -> dict:
    params = optim.merge(state["params"], frozen)
    res = run_predict(predict, params, setup.test.records, decode,
                      int(config.eval.batch_size), int(config.data.workers))
    acc = 100.0 * float(np.mean(res["pred"] == setup.test.labels))
    best = read_best(workdir, stage) or {"epoch": -1, "overall": -1.0, "history": []}
    history = list(best["history"])[:epoch] + [acc]
    if acc > best["overall"] or best["epoch"] >= epoch:
      best.update(epoch=int(epoch), overall=acc)
      if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        cio.write_arrays(os.path.join(out, "params.npz"),
                         cio.flatten(jax.device_get(state["params"])))
    best["history"] = history
    metrics_lib.write_json(os.path.join(out, "best.json"), best, indent=1)
    return {"overall": acc}

  return on_epoch_end


def select_hook(setup: Context, workdir: str, stage: str, phase: int
                ) -> Optional[Callable[[int, dict, Any], dict]]:
  """The `on_epoch_end` of training `stage` (its `phase` model): `make_select_best` under
  `eval.select='best'`, None under 'last'."""
  if _check_select(setup.config) == "best":
    return make_select_best(setup, workdir, stage, phase)
  return None


def eval_stage(setup: Context, workdir: str, stage_chain: Sequence[str], *, phase: int = 2,
               predict_images: bool = True) -> dict:
  """Evaluate the model after the last stage of `stage_chain` (read from the checkpoints
  of the whole chain); predictions for `eval.predict_dir` if set. Under
  `eval.select='best'`, the last stage's best epoch (`make_select_best`) instead."""
  name = stage_chain[-1]
  if _check_select(setup.config) == "best":
    best = read_best(workdir, name)
    path = os.path.join(best_dir(workdir, name), "params.npz")
    if best is None or not os.path.isfile(path):
      raise FileNotFoundError(
          f"eval.select='best' needs {path} and best.json, written while training stage "
          f"{name!r} with eval.select='best'; this run was not: retrain it with "
          "eval.select='best', or evaluate with eval.select='last'")
    params = params_after(workdir, stage_chain[:-1], setup.init_params())
    params = overlay(params, cio.unflatten(cio.read_arrays(path)))
    return evaluate_params(setup, workdir, name, params, phase=phase,
                           predict_images=predict_images,
                           extra={"select": "best", "best_epoch": int(best["epoch"])})
  params = params_after(workdir, stage_chain, setup.init_params())
  return evaluate_params(setup, workdir, name, params, phase=phase,
                         predict_images=predict_images)


def eval_released(setup: Context, workdir: str, *, predict_images: bool = True) -> dict:
  """Evaluate `model.released_checkpoint` (LPT's phase-2 model) as the phase-2 stage:
  results in `<workdir>/eval/phase2/`, as for a trained run."""
  if setup.released is None:
    raise ValueError("model.released_checkpoint is not set")
  return evaluate_params(setup, workdir, "phase2", setup.released, phase=2,
                         predict_images=predict_images, label="phase2 (released)",
                         extra={"weights": str(setup.config.model.released_checkpoint)})


def evaluate_params(setup: Context, workdir: str, name: str, params: Mapping, *, phase: int,
                    predict_images: bool = True, label: str = "",
                    extra: Optional[Mapping[str, Any]] = None) -> dict:
  """`evaluate` of `params` into `<workdir>/eval/<name>/`, and predictions for
  `eval.predict_dir` if set."""
  config = setup.config
  predict = lpt_model.make_predict(setup.vit, setup.spec, phase=phase,
                                   fused=bool(config.eval.fused))
  out_dir = os.path.join(workdir, "eval", name)
  result = evaluate(config, out_dir, predict, params, setup.test, setup.counts,
                    f"{config.method}/{label or name}", extra=extra)
  if predict_images and config.eval.predict_dir:
    output = config.eval.predict_output or os.path.join(out_dir, "predictions.tsv")
    predict_folder(config, predict, params, config.eval.predict_dir, output,
                   setup.train.class_names)
  return result
