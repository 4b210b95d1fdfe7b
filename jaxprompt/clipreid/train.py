"""CLIP-ReID (AAAI 2023): stage 1 learns identity text tokens, stage 2 fine-tunes the image tower.

  python launch.py --config configs/<row>.py --workdir RUN                 # stage1, stage2, eval
  python launch.py --config configs/<row>.py --workdir RUN --stage eval    # evaluate again
  python launch.py --config configs/<row>.py --workdir RUN --stage extract \\
      --config.extract.images=DIR --config.extract.out=FILE.npz           # embed a folder
  python launch.py --config configs/<row>.py --workdir RUN --stage eval \\
      --config.model.released_checkpoint=PATH.pth                         # authors' weights

Stages, in order (each resumes from its own checkpoints; a stage's final checkpoint is the
next stage's input):

  stage1   frozen CLIP; image features of every train image cached once (test transform,
           eval-mode BN); only `prompt/cls_ctx` trains, with SupCon(i2t) + SupCon(t2i).
  stage2   text features of all identities computed once from stage 1's `cls_ctx`, frozen;
           the image tower, SIE table and BNNeck heads train with ID + triplet + i2t losses.
  eval     test embeddings (pre-BN final + proj, L2-normalised), CMC / mAP, plots, JSON.
  extract  embeddings of a folder of images, written as npz (paths, features).

The baseline variant has no stage 1 and no i2t loss (its params have no `txt` and no
`cls_ctx`); it trains in `stage2`.

Parameter tree (full model): {'img', 'txt', 'prompt': {'cls_ctx', 'sie'?}, 'head'}; model
state {'batch_stats': {'img' (RN only), 'head'}}. Stage 1 trains on the subset
{'txt', 'prompt': {'cls_ctx'}}; stage 2 adds the frozen buffer `prompt/text_feats`
(N, D), the identities' text features, so the step reads them as an input, not a constant.

Reference: Syliz517/CLIP-ReID train_clipreid.py, processor/processor_clipreid_stage1.py,
processor/processor_clipreid_stage2.py.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics as metrics_lib
from jaxprompt import optim
from jaxprompt import schedules
from jaxprompt import seeds
from jaxprompt import trainer
from jaxprompt.clipreid import data as reid_data
from jaxprompt.clipreid import losses as reid_losses
from jaxprompt.clipreid import model as clipreid
from jaxprompt.clipreid.config import (STAGE1_DEFAULT_RULES, _baseline, _validate,  # noqa: F401
                                       base_config, paper_config, validate_config)
from jaxprompt.clipreid.context import (Context, SIESpec, load_backbone, save_cache,  # noqa: F401
                                        tiny_clip_config)
from jaxprompt.clipreid.evaluate import run_eval, run_extract
from jaxprompt.clipreid.samplers import IdentitySampler, RandomSampler
from jaxprompt.data.loader import Loader
from jaxprompt.models.clip import CLIP
from jaxprompt.optim import Rule

# ============================================================================ stage 1

# The defaults of `stage1.rules` (the config's field is what runs).
STAGE1_RULES = optim.rules_from_config(STAGE1_DEFAULT_RULES)


def stage_rules(stage_cfg) -> list[tuple[str, Rule]]:
  """The stage's `rules` field as [(regex, Rule)]."""
  return optim.rules_from_config(stage_cfg.rules, "rules")


def stage1_cache(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
  """(features (n, D), labels (n,)) of the pretrained tower on every train image.

  Test transform, eval-mode BN, no SIE (Syliz517/CLIP-ReID
  processor/processor_clipreid_stage1.py). Computed once, kept in
  `<workdir>/stage1/image_features.npz` and reused on resume when its paths match.
  """
  ds = ctx.dataset
  paths = np.asarray([r.path for r in ds.train])
  pids = np.asarray([r.pid for r in ds.train], np.int32)
  path = os.path.join(ctx.stage_dir("stage1"), "image_features.npz")
  if os.path.isfile(path):
    with np.load(path) as f:
      if (f["paths"].shape == paths.shape and np.array_equal(f["paths"], paths)
          and np.array_equal(f["pids"], pids)):
        logging.info("stage1: image features read from %s", path)
        return f["features"], pids
    logging.warning("stage1: %s does not match the training set; recomputing", path)
  model, variables = ctx.clip
  v = {"img": variables["params"]["img"], "batch_stats": variables.get("batch_stats", {}).get("img")}
  fn = ctx.embed_fn("proj", SIESpec(False, False, 0.0, 1), int(ctx.config.eval.batch_size))
  logging.info("stage1: computing image features of %d train images", len(ds.train))
  feats = fn(fn.place(v), ds.train, ctx.decode(False),
             desc=f"stage1: image features of {len(ds.train)} train images").astype(np.float32)
  save_cache(path, features=feats, pids=pids, paths=paths)
  return feats, pids


def make_stage1_loss_fn(model: CLIP, prompt: clipreid.TextPrompt):
  """SupCon(image -> text) + SupCon(text -> image), tau 1, raw features (Syliz517/CLIP-ReID
  loss/supcontrast.py)."""

  def loss_fn(params, model_state, batch, rng):
    del rng
    labels = batch["pid"]
    tokens = params["prompt"]["cls_ctx"][labels]
    text = clipreid.text_features(model, {"params": {"txt": params["txt"]}}, prompt, tokens)
    img = batch["feat"]
    i2t = reid_losses.supcon(img, text, labels, labels)
    t2i = reid_losses.supcon(text, img, labels, labels)
    return i2t + t2i, (model_state, {"loss_i2t": i2t, "loss_t2i": t2i})

  return loss_fn


def run_stage1(ctx: Context) -> trainer.StageResult:
  config, ds = ctx.config, ctx.dataset
  cfg = config.stage1
  model, variables = ctx.clip
  if jax.process_index() == 0:
    # The identity map ties cls_ctx rows (and later the classifier rows) to real ids.
    os.makedirs(ctx.stage_dir("stage1"), exist_ok=True)
    with open(os.path.join(ctx.stage_dir("stage1"), "identity_map.json"), "w") as f:
      f.write(ds.id_map.to_json())

  # The frozen image features: computed once, cached in memory and on disk.
  feats, pids = stage1_cache(ctx)
  prompt = clipreid.build_text_prompt(model, {"params": {"txt": variables["params"]["txt"]}},
                                      clipreid.template_for(ds.name))

  def decode(i, rng):
    del rng
    return {"feat": feats[i], "pid": pids[i]}

  # Random shuffle over all images per epoch; the last batch is topped up from the same
  # permutation, so every image is seen and batches keep one shape.
  batch = int(cfg.batch_size)
  loader = Loader(list(range(len(feats))), decode,
                  RandomSampler(len(feats), seed=int(cfg.seed), wrap_to=batch), batch,
                  seed=int(cfg.seed), workers=0)

  def init(rng):
    width = variables["params"]["txt"]["token_embedding"].shape[1]
    cls_ctx = jax.device_get(jax.jit(clipreid.init_identity_tokens, static_argnums=(1, 2))(
        rng, ds.num_train_pids, width))
    return {"txt": variables["params"]["txt"], "prompt": {"cls_ctx": cls_ctx}}, {}

  return trainer.run_stage(
      seeds.for_stage(cfg, "stage1"), workdir=ctx.workdir, stage="stage1", init=init,
      loss_fn=make_stage1_loss_fn(model, prompt), rules=stage_rules(cfg), loader=loader,
      make_tx=_make_tx(cfg, loader), frozen_source=ctx.clip_source())


def _make_tx(cfg, loader):
  """The stage's optimizer at its per-epoch lr (`optimizer.schedule` with the `lr_schedule`
  fields; 1-based epochs, switched at the loader's epoch starts, as Syliz517/CLIP-ReID
  processor/processor_clipreid_stage{1,2}.py call `scheduler.step(epoch)`)."""
  epoch_fn = schedules.by_name(cfg.optimizer.schedule, base_lr=float(cfg.optimizer.lr),
                               epochs=int(cfg.total_epochs), params=cfg.lr_schedule)

  def make_tx(trainable, rules, total_steps):
    lr = schedules.per_epoch(epoch_fn, loader.steps_per_epoch, first_epoch=1,
                             total_steps=total_steps)
    return trainer.default_tx(trainable, rules, cfg.optimizer, total_steps, learning_rate=lr)

  return make_tx


# ============================================================================ stage 2


def stage2_rules(config) -> list[tuple[str, Rule]]:
  """`stage2.rules` (see `config.base_config`)."""
  return stage_rules(config.stage2)


def make_stage2_loss_fn(model: CLIP, head: nn.Module, config, sie: SIESpec):
  """ID (label-smoothed CE, summed over both classifiers) x weight + triplet over the three
  pre-BN features + i2t CE on raw proj @ text_feats.T (Syliz517/CLIP-ReID loss/make_loss.py)."""
  eps = float(config.loss.label_smoothing)
  margin = float(config.loss.margin)
  w_id, w_tri, w_i2t = (float(config.loss.id_weight), float(config.loss.triplet_weight),
                        float(config.loss.i2t_weight))
  use_i2t = not _baseline(config) and w_i2t != 0.0

  def loss_fn(params, model_state, batch, rng):
    del rng
    stats = model_state["batch_stats"]
    labels = batch["pid"]
    variables = {"params": {"img": params["img"]}}
    if "img" in stats:
      variables["batch_stats"] = {"img": stats["img"]}
    cv = sie.vectors(params.get("prompt", {}).get("sie"), batch["camid"], batch["viewid"])
    # RN BatchNorms use batch statistics (the reference's model.train()).
    feats, upd_img = model.apply(variables, batch["image"], cv, True, method="image_features",
                                 mutable=["batch_stats"])
    out, upd_head = head.apply({"params": params["head"], "batch_stats": stats["head"]},
                               feats["final"], feats["proj"], train=True,
                               mutable=["batch_stats"])
    l_id = (reid_losses.cross_entropy_label_smooth(out["logits"], labels, eps)
            + reid_losses.cross_entropy_label_smooth(out["logits_proj"], labels, eps))
    l_tri = sum(reid_losses.batch_hard_triplet(feats[k], labels, margin)
                for k in ("last", "final", "proj"))
    loss = w_id * l_id + w_tri * l_tri
    metrics = {"loss_id": l_id, "loss_triplet": l_tri,
               "accuracy": jnp.mean(jnp.argmax(out["logits"], -1) == labels)}
    if use_i2t:
      text = params["prompt"]["text_feats"]
      l_i2t = reid_losses.i2t_cross_entropy(feats["proj"], text, labels, eps)
      loss = loss + w_i2t * l_i2t
      logits = feats["proj"].astype(jnp.float32) @ text.astype(jnp.float32).T
      metrics.update(loss_i2t=l_i2t, i2t_accuracy=jnp.mean(jnp.argmax(logits, -1) == labels))
    new_stats = {"head": upd_head["batch_stats"]}
    if "img" in stats:
      new_stats["img"] = upd_img["batch_stats"]["img"]
    return loss, ({"batch_stats": new_stats}, metrics)

  return loss_fn


def text_features_all(model: CLIP, txt_params, prompt: clipreid.TextPrompt, cls_ctx: np.ndarray,
                      chunk: int = 64) -> np.ndarray:
  """(N, D) raw text features of every identity, in fixed-size chunks, no gradient."""
  n = cls_ctx.shape[0]
  pad = (-n) % chunk
  tokens = np.concatenate([cls_ctx, np.zeros((pad, *cls_ctx.shape[1:]), cls_ctx.dtype)])
  fn = jax.jit(lambda p, t: clipreid.text_features(model, {"params": {"txt": p}}, prompt, t))
  txt = jax.device_put(txt_params)
  out = [np.asarray(fn(txt, tokens[i:i + chunk]))
         for i in metrics_lib.progress(range(0, len(tokens), chunk),
                                       desc=f"stage2: text features of {n} identities")]
  return np.concatenate(out)[:n].astype(np.float32)


def _check_identities(ctx: Context, num_ids: int) -> None:
  """Refuse a stage-1 checkpoint trained on other identities (Syliz517/CLIP-ReID issue #14)."""
  reid_data.check_num_ids(num_ids, ctx.dataset)
  saved = metrics_lib.read_json(os.path.join(ctx.stage_dir("stage1"), "identity_map.json"))
  if saved is not None and reid_data.IdentityMap.from_dict(saved) != ctx.dataset.id_map:
    raise ValueError(
        "identity mismatch: stage 1 was trained on a different set of identities than the "
        f"current training data ({ctx.stage_dir('stage1')}/identity_map.json); rerun stage 1 "
        "on this dataset before stage 2")


def head_module(num_ids: int) -> clipreid.ReIDHead:
  return clipreid.ReIDHead(num_ids)


def feature_dims(model: CLIP, size) -> dict[str, int]:
  h, w = size
  shapes = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, h, w, 3)), method="image_features")[0])
  return {k: int(shapes[k].shape[-1]) for k in ("last", "final", "proj")}


def run_stage2(ctx: Context) -> trainer.StageResult:
  config, ds = ctx.config, ctx.dataset
  cfg = config.stage2
  model, variables = ctx.clip
  sie = ctx.sie_spec()
  num_ids = ds.num_train_pids
  head = head_module(num_ids)
  dims = feature_dims(model, ctx.size)
  baseline = _baseline(config)
  if jax.process_index() == 0:
    metrics_lib.write_json(os.path.join(ctx.stage_dir("stage2"), "model_meta.json"),
                      {"num_ids": num_ids, "sie_num_views": sie.num_views,
                       "sie_num_cams": ds.num_train_cams, "identity_map": ds.id_map.to_dict()})

  def init(rng, read_stage1: bool = True):
    r_head, r_sie = jax.random.split(rng)
    hv = jax.device_get(jax.jit(head.init, static_argnames="train")(
        r_head, jnp.zeros((2, dims["final"])), jnp.zeros((2, dims["proj"])), train=False))
    params = {"img": variables["params"]["img"], "head": hv["params"]}
    stats = {"head": hv["batch_stats"]}
    if "batch_stats" in variables:
      stats["img"] = variables["batch_stats"]["img"]
    prompt = {}
    if not baseline and read_stage1:
      # Stage 1's identity tokens, checked against the data, and their frozen text features.
      trained, _ = ckpt_lib.read_params(ctx.workdir, "stage1")
      cls_ctx = np.asarray(trained["prompt"]["cls_ctx"])
      _check_identities(ctx, cls_ctx.shape[0])
      prompt["cls_ctx"] = cls_ctx
      prompt["text_feats"] = stage2_text_cache(ctx, cls_ctx)
    elif not baseline:
      # Placeholders of the right shapes: the restore fills them from stage 2's checkpoint.
      width = variables["params"]["txt"]["token_embedding"].shape[1]
      prompt["cls_ctx"] = np.zeros((num_ids, clipreid.NUM_ID_TOKENS, width), np.float32)
      prompt["text_feats"] = np.zeros((num_ids, dims["proj"]), np.float32)
    if not baseline:
      params["txt"] = variables["params"]["txt"]
    if sie.on:
      rows = clipreid.sie_rows(ds.num_train_cams, sie.num_views, sie.camera, sie.view)
      sie.check_indices(ds.train, rows, "the training split")
      prompt["sie"] = jax.device_get(jax.jit(clipreid.init_sie, static_argnums=(1, 2))(
          r_sie, rows, dims["final"]))
    if prompt:
      params["prompt"] = prompt
    return params, {"batch_stats": stats}

  if jax.process_index() == 0:
    os.makedirs(ctx.stage_dir("stage2"), exist_ok=True)
    with open(os.path.join(ctx.stage_dir("stage2"), "identity_map.json"), "w") as f:
      f.write(ds.id_map.to_json())
  loader = Loader(ds.train, ctx.decode(True),
                  IdentitySampler(ds.train_pids(), int(cfg.batch_size),
                                  int(config.data.num_instances), seed=int(cfg.seed)),
                  int(cfg.batch_size), seed=int(cfg.seed), workers=int(config.data.workers))
  source = ctx.clip_source() + ("" if baseline else " + stage1")
  # Stage 1's tokens and their text features are frozen here and saved with stage 2's
  # checkpoints, so a resumed stage 2 reads neither stage 1 nor the text cache.
  lazy = {} if baseline else dict(resume_init=lambda rng: init(rng, read_stage1=False),
                                  carry=["prompt/cls_ctx", "prompt/text_feats"])
  return trainer.run_stage(
      seeds.for_stage(cfg, "stage2"), workdir=ctx.workdir, stage="stage2", init=init,
      loss_fn=make_stage2_loss_fn(model, head, config, sie), rules=stage2_rules(config),
      loader=loader, make_tx=_make_tx(cfg, loader), frozen_source=source, **lazy)


def stage2_text_cache(ctx: Context, cls_ctx: np.ndarray) -> np.ndarray:
  """Text features of all identities from stage 1's tokens; cached next to stage 2.

  The cache is keyed on everything the features depend on: the template, the identity
  tokens and the text tower's weights (by fingerprint), so a changed template or tower
  never reuses stale features.
  """
  path = os.path.join(ctx.stage_dir("stage2"), "text_features.npz")
  model, variables = ctx.clip
  template = clipreid.template_for(ctx.dataset.name)
  txt_fp = np.asarray(ckpt_lib.fingerprint(variables["params"]["txt"]), np.uint32)
  if os.path.isfile(path):
    with np.load(path) as f:
      if ("template" in f and str(f["template"]) == template
          and np.array_equal(f["txt_fingerprint"], txt_fp)
          and np.array_equal(f["cls_ctx"], cls_ctx)):
        return f["features"]
    logging.info("stage2: %s was computed from other tokens, template or text weights; "
                 "recomputing", path)
  prompt = clipreid.build_text_prompt(model, {"params": {"txt": variables["params"]["txt"]}},
                                      template)
  feats = text_features_all(model, variables["params"]["txt"], prompt, cls_ctx,
                            chunk=int(ctx.config.stage2.batch_size))
  save_cache(path, features=feats, cls_ctx=cls_ctx, template=np.asarray(template),
              txt_fingerprint=txt_fp)
  return feats




# ============================================================================ the driver


def stages_of(config) -> tuple[str, ...]:
  return ("stage2", "eval") if _baseline(config) else ("stage1", "stage2", "eval")


def run_stages(config) -> tuple[str, ...]:
  """What `--stage` may name (launch.py checks it before any work)."""
  return stages_of(config) + ("extract",)


def run(config, workdir: str, stage: Optional[str] = None) -> dict:
  """All stages in order, or only `stage` ('stage1', 'stage2', 'eval', 'extract')."""
  _validate(config)
  stages = stages_of(config)
  if stage is not None and stage not in stages + ("extract",):
    raise ValueError(f"unknown stage {stage!r}; the {config.variant} pipeline has "
                     f"{stages + ('extract',)}")
  if config.model.released_checkpoint and stage not in ("eval", "extract"):
    raise ValueError(
        f"model.released_checkpoint is set ({config.model.released_checkpoint}): it can only be "
        "evaluated; run with --stage eval (or --stage extract), or unset it to train"
        + ("" if stage is None else f" (got --stage {stage})"))
  ctx = Context(config, workdir)
  results: dict[str, Any] = {}

  if stage == "extract":
    results["extract"] = run_extract(ctx)
    return results
  ctx.dataset  # prints the dataset summary table before anything else

  # Stage 1: identity tokens on the frozen CLIP (not in the baseline).
  if "stage1" in stages and stage in (None, "stage1"):
    results["stage1"] = run_stage1(ctx)

  # Stage 2: fine-tune the image tower from stage 1's final checkpoint.
  if stage in (None, "stage2"):
    results["stage2"] = run_stage2(ctx)

  # Evaluation: at the end of stage 2 (reused if already done for this checkpoint), or forced.
  if stage in (None, "stage2", "eval"):
    results["eval"] = run_eval(ctx, force=stage == "eval")
  return results
