"""CLIP-ReID evaluation: CMC / mAP of query vs gallery (optionally re-ranked), plots, JSON;
feature extraction of a folder of images; checks of an authors' released checkpoint against
the config and dataset.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics as metrics_lib
from jaxprompt.clipreid import data as reid_data
from jaxprompt.clipreid import model as clipreid
from jaxprompt.clipreid import plots
from jaxprompt.clipreid import ranking as reid_eval
from jaxprompt.clipreid.config import _dataset_key, _sie_on
from jaxprompt.clipreid.context import Context, SIESpec
from jaxprompt.clipreid.released import read_trained_params_file
from jaxprompt.clipreid.reranking import re_ranking
from jaxprompt.data import files as data_files


# ---------------------------------------------------------------------------------------------
# Batched, jitted extraction


# ---------------------------------------------------------------------------------------------
# Schedules


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


def _sie_settings_for(rows: int, num_cams: int, num_views: int) -> list[str]:
  out = []
  for cam, view in ((True, False), (False, True), (True, True)):
    if clipreid.sie_rows(num_cams, num_views, cam, view) == rows:
      out.append(f"model.sie_camera={cam}, model.sie_view={view}")
  return out


def check_released(ctx: Context, check_dataset: bool = True) -> None:
  """Refuse a released checkpoint whose SIE table does not fit the config and dataset,
  naming the config field to change; a different identity count only warns."""
  config, path = ctx.config, ctx.config.model.released_checkpoint
  model, variables = ctx.clip
  del model
  info = ctx.released_info
  table = variables["params"].get("prompt", {}).get("sie")
  m = config.model
  if table is not None and not _sie_on(config):
    raise ValueError(
        f"{path} has an SIE table (cv_embed, {table.shape[0]} rows) but model.sie_camera and "
        "model.sie_view are off: set model.sie_camera=True (and model.sie_view=True for a "
        "camera x view table, VeRi) and model.sie_coe to the checkpoint's MODEL.SIE_COE")
  if table is None and _sie_on(config):
    raise ValueError(f"{path} has no SIE table (cv_embed): set model.sie_camera=False and "
                     "model.sie_view=False")
  if not check_dataset:
    return
  ds = ctx.dataset
  if info["num_ids"] != ds.num_train_pids:
    # Evaluation uses the image features only, so another dataset is a legitimate
    # (cross-domain) test; say so rather than refuse.
    logging.warning(
        "%s was trained on %d identities but data.name=%r under data.root=%r has %d training "
        "identities: evaluating across datasets", path, info["num_ids"], config.data.name,
        config.data.root, ds.num_train_pids)
  if table is not None:
    num_views = ctx.sie_spec().num_views
    want = clipreid.sie_rows(ds.num_train_cams, num_views, bool(m.sie_camera), bool(m.sie_view))
    if want != table.shape[0]:
      fits = _sie_settings_for(table.shape[0], ds.num_train_cams, ds.num_train_views)
      hint = (f"set {' or '.join(fits)}" if fits else
              "set data.name / data.root to the dataset the checkpoint was trained on")
      raise ValueError(
          f"{path}'s SIE table (cv_embed) has {table.shape[0]} rows but model.sie_camera="
          f"{m.sie_camera}, model.sie_view={m.sie_view} on this dataset ({ds.num_train_cams} "
          f"train cameras, {ds.num_train_views} views) need {want}: {hint}")


def trained_image_model(ctx: Context) -> tuple[dict, str]:
  """The image-side variables {'img', 'sie', 'batch_stats'} to evaluate, and their origin."""
  path = ctx.config.model.trained_params
  if ctx.config.model.released_checkpoint:
    _, variables = ctx.clip
    v = {"img": variables["params"]["img"],
         "sie": variables["params"].get("prompt", {}).get("sie") if _sie_on(ctx.config) else None,
         "batch_stats": variables.get("batch_stats", {}).get("img")}
    return v, ctx.config.model.released_checkpoint
  if path:
    params, state = read_trained_params_file(path)
    origin = path
  else:
    params, state = ckpt_lib.read_params(ctx.workdir, "stage2")
    origin = f"{ctx.workdir}/stage2 (final checkpoint)"
  stats = (state or {}).get("batch_stats", {})
  v = {"img": params["img"], "sie": params.get("prompt", {}).get("sie"),
       "batch_stats": stats.get("img")}
  if _sie_on(ctx.config) and v["sie"] is None:
    raise ValueError(f"SIE is on in the config but {origin} has no prompt/sie table")
  if not _sie_on(ctx.config):
    v["sie"] = None
  return v, origin


def _step_of_final(workdir: str) -> Optional[int]:
  return ckpt_lib.final_step(ckpt_lib.checkpoint_dir(workdir, "stage2"))


def run_eval(ctx: Context, force: bool = True) -> dict:
  """Evaluate the trained model; results JSON and plots in `<workdir>/eval/`.

  With `force=False` (the end of a pipeline run), a results file of the same checkpoint
  and evaluation settings is reused instead of recomputed.
  """
  config = ctx.config
  e = config.eval
  out_dir = ctx.stage_dir("eval")
  results_path = os.path.join(out_dir, "results.json")
  weights = config.model.released_checkpoint or config.model.trained_params
  key = {"step": None if weights else _step_of_final(ctx.workdir), "weights": weights,
         "eval": e.to_dict()}
  if not force:
    prev = metrics_lib.read_json(results_path)
    if prev is not None and prev.get("key") == key:
      logging.info("eval: results of this checkpoint already in %s", results_path)
      return prev
  ds = ctx.dataset
  if config.model.released_checkpoint:
    check_released(ctx)
  v, origin = trained_image_model(ctx)
  fn_sie = ctx.sie_spec()
  fn = ctx.embed_fn("test", fn_sie, int(e.batch_size))
  v = fn.place(v)
  decode = ctx.decode(False)
  opts = dict(max_rank=int(e.max_rank), rerank=bool(e.rerank), k1=int(e.k1), k2=int(e.k2),
              lambda_value=float(e.lambda_value), block=int(e.block),
              grid_queries=int(e.grid_queries), grid_topk=int(e.grid_topk))
  label = f"{config.variant} {config.backbone} {ds.name}"
  result = {"key": key, "weights": origin, "dataset": ds.name}
  sie_rows = None if v.get("sie") is None else int(v["sie"].shape[0])
  if _dataset_key(config.data.name) == "vehicleid":
    # Every trial splits the same test images: embed them once, index per trial.
    trials = reid_data.vehicleid_trials(config.data.root, int(config.data.vehicleid_test_size),
                                        int(config.seed), int(config.data.vehicleid_trials))
    records = trials[0][0] + trials[0][1]
    if sie_rows is not None:
      fn_sie.check_indices(records, sie_rows, "the query and gallery")
    feats = fn(v, records, decode, desc=f"eval: embedding {len(records)} test images")
    row = {r.path: i for i, r in enumerate(records)}
    per_trial = []
    for t, (q, g) in enumerate(trials):
      qf = feats[[row[r.path] for r in q]]
      gf = feats[[row[r.path] for r in g]]
      res = evaluate_split(qf, gf, q, g, plot_dir=out_dir if (t == 0 and e.plots) else None,
                                  label=label, **opts)
      per_trial.append(res)
    for k in ("mAP", "R1", "R5", "R10"):
      result[k] = float(np.mean([r[k] for r in per_trial]))
    result["trials"] = [{k: r[k] for k in ("mAP", "R1", "R5", "R10")} for r in per_trial]
    result["cmc"] = per_trial[0]["cmc"]
  else:
    records = ds.query + ds.gallery
    if sie_rows is not None:
      fn_sie.check_indices(records, sie_rows, "the query and gallery")
    feats = fn(v, records, decode, desc=f"eval: embedding {len(records)} query + gallery images")
    nq = len(ds.query)
    res = evaluate_split(feats[:nq], feats[nq:], ds.query, ds.gallery,
                                plot_dir=out_dir if e.plots else None, label=label, **opts)
    result.update(res)
  log_results(f"eval {label}{' (re-ranked)' if e.rerank else ''}", result)
  metrics_lib.write_json(results_path, result)
  return result


def run_extract(ctx: Context) -> dict:
  """Embeddings of every image under `extract.images` -> npz {paths, features}."""
  x = ctx.config.extract
  if not x.images or not x.out:
    raise ValueError("set extract.images (a folder) and extract.out (an .npz file)")
  paths = data_files.list_images(x.images)
  released = bool(ctx.config.model.released_checkpoint)
  if x.source == "pretrained" and released:
    raise ValueError("extract.source='pretrained' embeds with the CLIP tower before "
                     "fine-tuning: unset model.released_checkpoint and set model.weights, "
                     "or use extract.source='trained' for the released model")
  if x.source == "pretrained":
    _, variables = ctx.clip
    v = {"img": variables["params"]["img"], "sie": None,
         "batch_stats": variables.get("batch_stats", {}).get("img")}
    sie, origin = SIESpec(False, False, 0.0, 1), ctx.clip_source()
  elif x.source == "trained":
    if released:
      # The dataset is read only where it is needed (camera x view SIE: the view count).
      check_released(ctx, check_dataset=bool(ctx.config.data.root))
    v, origin = trained_image_model(ctx)
    meta = (None if released else
            metrics_lib.read_json(os.path.join(ctx.stage_dir("stage2"), "model_meta.json")))
    num_views = meta["sie_num_views"] if meta else None
    if num_views is None and not (ctx.config.model.sie_camera and ctx.config.model.sie_view):
      num_views = 1
    sie = ctx.sie_spec(num_views)
  else:
    raise ValueError(f"extract.source must be 'trained' or 'pretrained', got {x.source!r}")
  records = [reid_data.ReIDRecord(p, -1, int(x.camid), int(x.viewid), -1) for p in paths]
  if v.get("sie") is not None:
    sie.check_indices(records, int(v["sie"].shape[0]), "extract.camid / extract.viewid")
  fn = ctx.embed_fn("test", sie, int(x.batch_size))
  feats = fn(fn.place(v), records, ctx.decode(False),
             desc=f"extract: embedding {len(records)} images")
  if jax.process_index() == 0:
    out = os.path.expanduser(x.out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, paths=np.asarray(paths), features=feats.astype(np.float32))
  msg = f"extract: {len(paths)} embeddings ({feats.shape[1]}-d) from {origin} -> {x.out}"
  logging.info("%s", msg)
  print(msg, flush=True)
  return {"num_images": len(paths), "dim": int(feats.shape[1]), "out": x.out, "weights": origin}
