"""The default job: small, offline, complete runs of CLIP-ReID, LPT and CoOp, with one table.

  python launch.py                                  # configs/default.py into workdir/default
  python launch.py --stage report                   # print the table of a finished run again

Stages, in order (each resumes: the data writers reuse files made with the same settings,
the real pipelines resume from their checkpoints):

  data      a synthetic re-identification set in Market-1501's layout and naming, a
            long-tailed digits set written as PNG files + `<path> <label>` lists, and a
            tiny ViT pretrained briefly on procedural glyphs (the frozen LPT backbone).
  clipreid  the CLIP-ReID pipeline's `eval` on the randomly initialised tiny CLIP (its
            weights handed over as `model.trained_params`: "before"), then its stage 1,
            stage 2 and eval on the same data ("after").
  lpt       the LPT pipeline (phase 1, phase 2, eval) and the linear probe (the vpt
            pipeline's 'linear' method) on the same frozen pretrained tower.
  coop      a tiny CLIP trained contrastively on generated image-caption pairs, then
            zero-shot CLIP, CoOp and CoCoOp through the CoOp pipeline on a generated
            classification set split into base and new classes (`jaxprompt.coop.demo`).
  report    one table (printed, `results.md`, `results.json`) and the comparison plots.

Every sub-run is a real pipeline run on a sub-config from `config.clipreid`, `config.lpt` or
`config.linear` (any of their fields can be overridden, e.g.
`--config.clipreid.stage2.total_epochs=40`); empty data and weight fields are pointed at
what the `data` stage wrote. Workdir layout:

  data/          Market-1501-v15.09.15/, digits_lt/, tiny_vit.npz (+ .json)
  clipreid_untrained/   eval/ of the random CLIP (results.json, cmc.png, ranked.png)
  clipreid/      stage1/, stage2/ (checkpoints, metrics, TensorBoard), eval/
  lpt/           phase1/, phase2/, eval/{phase1,phase2}/
  linear/        train/, eval/train/
  coop/          clip.npz (the pretrained tiny CLIP), shapes_*/, {zeroshot,coop,cocoop}/,
                 results.json
  results.md, results.json, cmc.png, bucket_accuracy.png, timings.json
  jax_cache/     the persistent compilation cache (unless JAX_COMPILATION_CACHE_DIR is set)
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from PIL import Image

from jaxprompt import metrics as metrics_lib
from jaxprompt import validate
from jaxprompt.demo.report import Paths, run_report, say as _say

STAGES = ("data", "clipreid", "lpt", "coop", "report")


def run_stages(config) -> tuple[str, ...]:
  """What `--stage` may name (launch.py checks it before any work)."""
  del config
  return STAGES


# ============================================================================ stage: data


def pretrain_settings(config) -> dict:
  """Keyword arguments of `pretrain_tiny_vit` from `config.pretrain`."""
  p = config.pretrain
  return dict(steps=int(p.steps), seed=int(p.seed), width=int(p.width), depth=int(p.depth),
              heads=int(p.heads), mlp_ratio=int(p.mlp_ratio), patch=int(p.patch),
              image_size=int(p.image_size), batch_size=int(p.batch_size),
              learning_rate=float(p.learning_rate), weight_decay=float(p.weight_decay),
              warmup_steps=int(p.warmup_steps), ln_eps=float(p.ln_eps))


def write_digits(config, out_dir: str) -> dict:
  """The long-tailed digits as PNGs + `train.txt` / `test.txt` (`<relative path> <label>`).

  Returns the set's description (counts, class names); a folder written with the same
  settings is reused.
  """
  from jaxprompt.demo import lt_data
  d = config.digits
  settings = dict(imbalance=float(d.imbalance), seed=int(d.seed), size=int(d.image_size),
                  max_per_class=int(d.max_per_class), test_per_class=int(d.test_per_class))
  info_path = os.path.join(out_dir, "digits.json")
  info = metrics_lib.read_json(info_path)
  if info is not None and info.get("settings") == settings:
    return info
  splits = lt_data.digits_longtail(**settings)
  os.makedirs(out_dir, exist_ok=True)
  for split, ds in (("train", splits.train), ("test", splits.test)):
    lines = []
    for i, r in enumerate(ds.records):
      rel = os.path.join(split, f"{r.label}_{splits.class_names[r.label]}", f"{i:05d}.png")
      os.makedirs(os.path.join(out_dir, os.path.dirname(rel)), exist_ok=True)
      Image.fromarray(r.image).save(os.path.join(out_dir, rel))
      lines.append(f"{rel} {r.label}\n")
    with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
      f.writelines(lines)
  info = {"settings": settings, "class_names": list(splits.class_names),
          "train_counts": splits.class_counts.tolist(),
          "test_counts": splits.test.class_counts().tolist()}
  metrics_lib.write_json(info_path, info)
  return info


def run_data(config, paths: Paths) -> dict:
  """Writes the ReID set and the digits, and pretrains the tiny ViT (each reused if present)."""
  from jaxprompt.demo import pretrain, reid_data
  if jax.process_index() != 0:
    return {}
  r = config.reid_data
  base = reid_data.write_synthetic_market(
      paths.market_root, num_train_ids=int(r.num_train_ids), num_test_ids=int(r.num_test_ids),
      cams=int(r.cams), images_per_id_cam=int(r.images_per_id_cam),
      cams_per_id=tuple(r.cams_per_id), num_distractors=int(r.num_distractors),
      num_junk=int(r.num_junk), size=tuple(r.size), seed=int(r.seed))
  counts = reid_data.read_manifest(base)["counts"]
  _say(f"data: synthetic Market-1501 in {base} ({counts['train']} train / {counts['query']} "
       f"query / {counts['gallery']} gallery images, + {counts['distractors']} distractors, "
       f"{counts['junk']} junk)")
  info = write_digits(config, paths.digits)
  _say(f"data: long-tailed digits in {paths.digits} (train per class "
       f"{info['train_counts']}, test {info['test_counts'][0]} per class)")

  kw = pretrain_settings(config)
  # One progress bar, the pretraining loop's own (it counts finished steps).
  pretrain.pretrain_tiny_vit(
      paths.vit, data=pretrain.GlyphData(image_size=kw["image_size"], seed=kw["seed"]), **kw)
  meta = metrics_lib.read_json(pretrain.sidecar_path(paths.vit)) or {}
  _say(f"data: tiny ViT pretrained on glyphs -> {paths.vit} (held-out glyph accuracy "
       f"{100 * meta.get('eval_accuracy', float('nan')):.1f}%, chance "
       f"{100 * meta.get('chance', float('nan')):.1f}%)")
  return {"market": base, "digits": paths.digits, "vit": paths.vit}


# ============================================================================ stage: clipreid


def clipreid_config(config, paths: Paths) -> ml_collections.ConfigDict:
  """`config.clipreid` with an empty data root pointed at the synthetic Market-1501."""
  c = config.clipreid.copy_and_resolve_references()
  if not c.data.root:
    c.data.root = paths.market_root
  return c


def write_untrained_params(c, path: str) -> str:
  """The randomly initialised CLIP that stage 2 starts from, as a full params file."""
  from jaxprompt.convert.io import flatten, write_arrays
  from jaxprompt.clipreid import train as clipreid
  if c.model.weights:
    raise ValueError("the 'before' evaluation is for the tiny random CLIP; with "
                     "model.weights, evaluate the pretrained tower with --stage extract")
  _, variables = clipreid.load_backbone(c)
  tree = {"params": {"img": variables["params"]["img"]}}
  if "batch_stats" in variables:
    tree["batch_stats"] = {"img": variables["batch_stats"]["img"]}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_arrays(path, {k: np.asarray(v) for k, v in flatten(tree).items()})
  return path


def run_clipreid(config, paths: Paths) -> dict:
  """Eval of the untrained model, then stage 1 -> stage 2 -> eval."""
  from jaxprompt.clipreid import train as clipreid
  c = clipreid_config(config, paths)

  # Before: the pipeline's own eval stage on the random initialisation (same seed as the
  # model stage 2 fine-tunes), in its own workdir so it never mixes with the trained run.
  before_cfg = c.copy_and_resolve_references()
  before_cfg.model.trained_params = write_untrained_params(c, paths.untrained_params)
  _say("clipreid: evaluating the untrained (randomly initialised) CLIP")
  before = clipreid.run(before_cfg, paths.clipreid_untrained, stage="eval")["eval"]

  # After: the full two-stage run.
  _say("clipreid: stage 1 (identity text tokens) and stage 2 (image tower)")
  after = clipreid.run(c, paths.clipreid)["eval"]
  return {"before": before, "after": after}


# ============================================================================ stage: lpt


def cls_config(sub, config, paths: Paths) -> ml_collections.ConfigDict:
  """An LPT/linear sub-config with empty data and weight fields pointed at the demo files."""
  c = sub.copy_and_resolve_references()
  d = c.data
  if d.name == "list" and not d.train_file:
    d.root = paths.digits
    d.train_file = os.path.join(paths.digits, "train.txt")
    d.test_file = os.path.join(paths.digits, "test.txt")
  if not c.model.tiny_random and not c.model.weights:
    c.model.weights = paths.vit
  return c


def run_lpt(config, paths: Paths) -> dict:
  """LPT phase 1 -> phase 2 -> eval, and the linear probe on the same frozen tower."""
  from jaxprompt.lpt import train as lpt
  from jaxprompt.lpt import baselines as vpt
  _say("lpt: phase 1 (shared prompt), phase 2 (group prompts)")
  res_lpt = lpt.run(cls_config(config.lpt, config, paths), paths.lpt)["eval"]
  _say("linear: linear probe on the frozen tower")
  res_lin = vpt.run(cls_config(config.linear, config, paths), paths.linear)["eval"]
  return {"lpt": res_lpt, "linear": res_lin}


# ============================================================================ stage: coop


def run_coop(config, paths: Paths) -> dict:
  """Zero-shot CLIP, CoOp and CoCoOp (base / new / H) on the generated shapes."""
  from jaxprompt.coop import demo as coop_demo
  c = config.coop
  # The job's `seed` offsets this part's two seeds as it offsets every other sub-seed.
  shift = int(config.get("seed", 0))
  _say("coop: tiny CLIP pretraining, then zero-shot, CoOp and CoCoOp (base / new classes)")
  out = coop_demo.run(paths.coop, pretrain_steps=int(c.pretrain_steps),
                      per_class_test=int(c.per_class_test), seed=int(c.seed) + shift,
                      pretrain_seed=int(c.pretrain_seed) + shift)
  out = {"rows": out["rows"], "pretrain_loss": out["pretrain_loss"], "chance": out["chance"],
         "seed": int(c.seed) + shift}
  metrics_lib.write_json(os.path.join(paths.coop, "results.json"), out)
  return out


# ============================================================================ the driver


def use_compilation_cache(workdir: str) -> Optional[str]:
  """A persistent compilation cache in `<workdir>/jax_cache` unless one is configured.

  The job compiles the same functions more than once (the tiny CLIP's init and its eval
  functions for the untrained model and again for the trained run, in separate pipeline
  calls), and a rerun compiles everything again; with the cache each is compiled once.
  JAX reads the setting at its first compilation, so this runs before any.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return jax.config.jax_compilation_cache_dir


def run(config, workdir: str, stage: Optional[str] = None) -> dict:
  """data -> clipreid -> lpt -> coop -> report; `stage` runs (or resumes) only that one."""
  if stage is not None and stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; the default job has {STAGES}")
  use_compilation_cache(workdir)
  paths = Paths(workdir)
  timings = dict(metrics_lib.read_json(paths.timings) or {})
  results: dict[str, Any] = {}

  def timed(name, fn):
    t0 = time.perf_counter()
    results[name] = fn(config, paths)
    timings[name] = round(time.perf_counter() - t0, 1)
    metrics_lib.write_json(paths.timings, timings)

  # Data: the ReID set, the long-tailed digits and the pretrained tiny ViT.
  if stage in (None, "data"):
    timed("data", run_data)

  # CLIP-ReID: the untrained model's eval, then stage 1, stage 2 and eval.
  if stage in (None, "clipreid"):
    timed("clipreid", run_clipreid)

  # LPT (phase 1, phase 2) and the linear probe on the same frozen tower.
  if stage in (None, "lpt"):
    timed("lpt", run_lpt)

  # Zero-shot CLIP, CoOp and CoCoOp on a tiny contrastively pretrained CLIP.
  if stage in (None, "coop"):
    timed("coop", run_coop)

  # One table from every sub-run's results file, plus the comparison plots.
  if stage in (None, "report"):
    results["report"] = run_report(config, paths, timings)
  return results


def validate_config(config) -> None:
  """The default job's own fields and each sub-run's config, checked by its family's
  `validate_config` (errors name the full field, e.g. `clipreid.data.size`)."""
  from jaxprompt.clipreid import config as clipreid_config  # the job imports families lazily
  from jaxprompt.lpt import config as lpt_config
  if "seed" in config:
    validate.integer(config, "seed")
  for field in ("steps", "width", "depth", "heads", "mlp_ratio", "patch", "image_size",
                "batch_size"):
    validate.positive(config, f"pretrain.{field}")
  validate.number(config, "pretrain.learning_rate", minimum=0.0, strictly=True)
  clipreid_config.validate_config(validate.Scoped(config.clipreid, "clipreid"))
  for sub in ("lpt", "linear"):
    lpt_config.validate_config(validate.Scoped(config[sub], sub))
