"""Top-1 evaluation, seed aggregation, base/new/H and the paper-layout tables.

Aggregation follows KaiyangZhou/CoOp parse_test_res.py: mean and population std (np.std) over
seeds. Per dataset H is the harmonic mean of the seed-averaged base and new accuracies; the
multi-dataset "Average" row takes the mean base and mean new and the H of those two means
(not the mean of the per-dataset H).

    python -m jaxprompt.coop.evaluate RUN_DIR [RUN_DIR ...]

prints the table of several finished runs (one per dataset) with the average row.
"""
from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.coop import data as data_lib
from jaxprompt.coop import model as M
from jaxprompt import metrics as metrics_lib
from jaxprompt.data.loader import Loader, PaddedSequentialSampler


def harmonic(base: float, new: float) -> float:
  return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def predict_loader(items: Sequence[data_lib.Datum], batch_size: int, image_size: int,
                   workers: int = 0) -> Loader:
  bs = max(1, min(int(batch_size), len(items)))
  return Loader(items, data_lib.make_decode(False, image_size),
                PaddedSequentialSampler(len(items), bs), bs, workers=workers)


def top1(score_fn: Callable[[jax.Array], jax.Array], items: Sequence[data_lib.Datum], *,
         batch_size: int = 100, image_size: int = 224, workers: int = 0,
         desc: str = "", progress: bool = True) -> float:
  """Top-1 accuracy in percent of `score_fn(images) -> (B, C)` over every item (with a
  progress bar unless `progress` is False)."""
  if not items:
    raise ValueError("top1: empty evaluation set")
  loader = predict_loader(items, batch_size, image_size, workers)
  correct, seen = 0, 0
  for batch in metrics_lib.progress(loader.iterate(0), total=loader.steps_per_epoch(0),
                                   desc=desc or f"eval: {len(items)} images",
                                   enabled=None if progress else False):
    pred = np.asarray(jnp.argmax(score_fn(jnp.asarray(batch["image"])), -1))
    n = min(len(pred), len(items) - seen)  # padded rows at the end are dropped
    correct += int((pred[:n] == batch["label"][:n]).sum())
    seen += n
  return 100.0 * correct / len(items)


def prompt_scorer(clip_model, variables: Mapping[str, Any], cp: M.ClassPrompts, *,
                  chunk: int = 0, dtype: Any = jnp.float32) -> Callable:
  """Jitted (B, H, W, 3) -> (B, C) CoOp/CoCoOp logits; CoOp's text features computed once."""
  from jaxprompt import precision  # pylint: disable=import-outside-toplevel
  v = precision.cast_floating(variables, dtype)
  if "meta_net" not in variables["params"]["prompt"]:
    g = M.l2n(jax.jit(lambda v: M.text_features(clip_model, v, v["params"]["prompt"]["ctx"], cp,
                                                chunk=chunk))(v))
    scale = jnp.exp(variables["params"]["txt"]["logit_scale"])

    @jax.jit
    def coop(v, x):
      return scale * M.l2n(M.image_features(clip_model, v, x.astype(dtype))) @ g.T
    return functools.partial(coop, v)

  @jax.jit
  def cocoop(v, x):
    return M.logits(clip_model, v, x.astype(dtype), cp, chunk=chunk)
  return functools.partial(cocoop, v)


def aggregate(per_seed: Sequence[Mapping[str, float]]) -> dict:
  """{metric: {'mean', 'std', 'values'}} over seeds; H recomputed from mean base and new."""
  if not per_seed:
    return {}
  keys = [k for k in per_seed[0] if k != "H"]
  out = {}
  for k in keys:
    vals = np.asarray([float(r[k]) for r in per_seed])
    out[k] = dict(mean=float(vals.mean()), std=float(vals.std()), values=vals.tolist())
  if "base" in out and "new" in out:
    out["H"] = dict(mean=harmonic(out["base"]["mean"], out["new"]["mean"]), std=0.0,
                    values=[harmonic(float(r["base"]), float(r["new"])) for r in per_seed])
  return out


def average_row(rows: Mapping[str, Mapping[str, float]]) -> dict:
  """Mean of each metric over datasets; H from the mean base and mean new."""
  out = {}
  keys = [k for k in next(iter(rows.values())) if k != "H"]
  for k in keys:
    out[k] = float(np.mean([r[k] for r in rows.values()]))
  if "base" in out and "new" in out:
    out["H"] = harmonic(out["base"], out["new"])
  return out


def format_table(rows: Mapping[str, Mapping[str, Any]], paper: Optional[Mapping] = None,
                 title: str = "") -> str:
  """One line per row: each metric as 'ours (paper)'; `ours` a float or {'mean','std'}."""
  paper = paper or {}
  metrics = list(next(iter(rows.values())).keys())
  lines = [title] if title else []
  lines.append(f"{'':16s}" + "".join(f"{m:>22s}" for m in metrics))
  for name, row in rows.items():
    cells = []
    for m in metrics:
      v = row[m]
      ours = f"{v['mean']:.2f}+-{v['std']:.2f}" if isinstance(v, Mapping) else f"{v:.2f}"
      ref = (paper.get(name) or {}).get(m) if isinstance(paper.get(name), Mapping) else None
      cells.append(f"{ours}" + (f" ({ref:.2f})" if ref is not None else ""))
    lines.append(f"{name:16s}" + "".join(f"{c:>22s}" for c in cells))
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("runs", nargs="+", help="workdirs of finished runs (results.json each)")
  args = p.parse_args(argv)
  rows, paper = {}, {}
  for run in args.runs:
    res = metrics_lib.read_json(os.path.join(run, "results.json"))
    if res is None:
      raise FileNotFoundError(f"{run}: no results.json (run the pipeline's 'eval' stage first)")
    name = res["dataset"]
    rows[name] = {k: v["mean"] for k, v in res["summary"].items()}
    paper[name] = res.get("paper") or {}
  if len(rows) > 1:
    rows["Average"] = average_row(rows)
  print(format_table(rows, paper, title="ours (paper)"))


if __name__ == "__main__":
  main()
