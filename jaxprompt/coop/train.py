"""CoOp / CoCoOp / zero-shot / linear-probe CLIP: the driver, read top to bottom.

    python launch.py --config configs/coop/<setting>.py --workdir runs/<name>

Stages (`--stage`), per seed under `workdir/seed<S>/`:

1. `train`: the prompt learner (`prompt/ctx`, CoCoOp's `prompt/meta_net/...`) trains on the
   few-shot train split (base classes for base-to-new); CLIP is frozen and gets no gradient.
   SGD, momentum 0.9, coupled weight decay 5e-4; lr 1e-5 for the first epoch, then
   lr * (1 + cos(pi * (e - 2) / E)) / 2 for 1-based epochs e = 2..E, stepped per epoch
   (KaiyangZhou/Dassl.pytorch dassl/optim/lr_scheduler.py ConstantWarmupScheduler over
   CosineAnnealingLR). The last epoch's prompt is evaluated (no model selection). Resumes
   from its own checkpoints.
2. `eval`: the final prompt is re-combined with each evaluated class list (the dataset's,
   the new half, or a transfer target's) and scored top-1 on the full test split;
   `seed<S>/eval.json`.
3. `table`: mean and population std over seeds, H from the mean base and new, printed beside
   the paper's numbers; `results.json`.

With `config.model.released_checkpoint` the authors' released prompt learner replaces stage 1.
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxprompt.coop import config as config_lib
from jaxprompt.coop import data as data_lib
from jaxprompt.coop import evaluate
from jaxprompt.coop import model as M
from jaxprompt.coop import released as released_lib
from jaxprompt.coop import zeroshot
from jaxprompt.coop.config import validate_config  # noqa: F401 (launch.py calls it)
from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics as metrics_lib
from jaxprompt import optim
from jaxprompt import seeds
from jaxprompt import sharding as shd
from jaxprompt import trainer
from jaxprompt.convert.openai_clip import load_clip
from jaxprompt.data.loader import Loader, ShuffleSampler

STAGES = ("train", "eval", "table")
RULES = optim.rules_from_config(config_lib.TRAIN_RULES)  # the default of `train.rules`


def run_stages(config) -> tuple[str, ...]:
  """What `--stage` may name (launch.py checks it before any work)."""
  del config
  return STAGES


# ----------------------------------------------------------------------------- schedule


def coop_lr(epoch: int, *, base_lr: float, epochs: int, warmup_lr: float = 1e-5,
            warmup_epochs: int = 1) -> float:
  """lr of 1-based `epoch`: constant warmup, then the cosine that started under it."""
  if epoch <= warmup_epochs:
    return warmup_lr
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1 - warmup_epochs) / epochs))


def make_tx(cfg: Mapping, steps_per_epoch: int):
  """`run_stage`'s make_tx: SGD over the prompt subtree with the per-epoch schedule."""
  opt, epochs = cfg["optimizer"], int(cfg["total_epochs"])
  fn = lambda e: coop_lr(e, base_lr=float(opt["lr"]), epochs=epochs,  # noqa: E731
                         warmup_lr=float(cfg["warmup_lr"]),
                         warmup_epochs=int(cfg["warmup_epochs"]))
  table = np.asarray([fn(e + 1) for e in range(epochs)], np.float32)

  def schedule(step):
    return jnp.asarray(table)[jnp.clip(jnp.asarray(step) // steps_per_epoch, 0, epochs - 1)]

  def build(trainable, rules, n_steps):
    del n_steps
    tx = optim.make_optimizer(trainable, rules, name=opt["name"], learning_rate=schedule,
                              weight_decay=float(opt["weight_decay"]), coupled_decay=True,
                              **dict(opt.get("hparams", {}) or {}))
    return tx, schedule
  return build


# ----------------------------------------------------------------------------- pieces


def spec_of(config) -> M.PromptSpec:
  p = config.prompt
  return M.PromptSpec(n_ctx=int(p.n_ctx), ctx_init=str(p.ctx_init), csc=bool(p.csc),
                      class_token_position=str(p.class_token_position),
                      conditional=config.method == "cocoop").resolved()


def load_model(config):
  if not config.model.weights:
    raise ValueError("config.model.weights: path of an OpenAI/open_clip CLIP checkpoint is required")
  model, variables = load_clip(config.model.weights, field="model.weights")
  native = model.config.input_size
  if tuple(native) != (config.model.image_size,) * 2:
    raise ValueError(f"config.model.image_size={config.model.image_size} must equal the CLIP input "
                     f"resolution {native} (the reference asserts it)")
  return model, variables


def splits_for(config, seed: int, name: Optional[str] = None, subsample: Optional[str] = None,
               shots: Optional[int] = None) -> data_lib.Splits:
  d = config.data
  if subsample is None:
    subsample = "base" if config.protocol == "base2new" else "all"
  return data_lib.build(name or d.name, d.root, shots=d.shots if shots is None else shots,
                        seed=seed, subsample=subsample, classnames_file=d.classnames_file)


def eval_sets(config, seed: int, train_splits: data_lib.Splits) -> dict:
  """{row name: (test items, class names)} for this protocol."""
  if config.protocol == "base2new":
    new = splits_for(config, seed, subsample="new")
    return {"base": (train_splits.test, train_splits.classnames),
            "new": (new.test, new.classnames)}
  out = {"acc" if config.protocol == "fewshot" else config.data.name:
         (train_splits.test, train_splits.classnames)}
  for target in config.eval.targets:  # cross-dataset / domain generalisation
    name, _, root = str(target).partition("@")  # 'name' under data.root, or 'name@root'
    t = data_lib.build(name, root or config.data.root, shots=0, seed=seed,
                       classnames_file=config.data.classnames_file)
    out[name if not root else target] = (t.test, t.classnames)
  return out


def train_batch_size(n: int, batch_size: int) -> int:
  """Dassl's loader drops the last partial batch only when the set holds a full batch; a
  smaller set is one batch of all its items (1-shot EuroSAT: one batch of 10)."""
  return min(int(batch_size), int(n))


def make_loss_fn(clip_model, cp: M.ClassPrompts, *, chunk: int = 0, remat: bool = False):
  """The training loss over the class list `cp`: cross-entropy of the CoOp / CoCoOp logits
  (CoCoOp when the prompt has a Meta-Net), with the batch accuracy as a metric."""

  def loss_fn(params, state, batch, rng):
    del rng
    lg = M.logits(clip_model, {"params": params, **state}, batch["image"], cp, chunk=chunk,
                  remat=remat)
    acc = jnp.mean(jnp.argmax(lg, -1) == batch["label"])
    return M.cross_entropy(lg, batch["label"]), (state, {"acc": acc})

  return loss_fn


def train_prompt(config, seed: int, seed_dir: str, clip_model, clip_vars,
                 splits: data_lib.Splits) -> dict:
  """Stage 1 for one seed; returns the final `prompt` subtree."""
  spec = spec_of(config)
  cp = M.build_class_prompts(splits.classnames, spec)
  width = clip_model.config.text_width
  tok = clip_vars["params"]["txt"]["token_embedding"]
  model_state = {k: v for k, v in clip_vars.items() if k != "params"}
  chunk, remat = int(config.eval.train_chunk), bool(config.eval.remat)

  def init(rng):
    prompt = M.init_prompt(rng, spec, width=width, embed_dim=clip_model.config.embed_dim,
                           num_classes=len(splits.classnames), token_embedding=tok)
    return {**clip_vars["params"], "prompt": prompt}, model_state

  loss_fn = make_loss_fn(clip_model, cp, chunk=chunk, remat=remat)
  n = len(splits.train)
  if n == 0:
    raise ValueError(f"dataset {config.data.name!r}: empty training set")
  bs = train_batch_size(n, int(config.data.batch_size))
  loader = Loader(splits.train, data_lib.make_decode(True, config.model.image_size,
                                                    tuple(config.data.crop_scale)),
                  ShuffleSampler(n, seed), bs, seed=seed, workers=int(config.data.workers))
  cfg = ml_collections.ConfigDict(config.train.to_dict())
  cfg.seed = seeds.stage_seed(seed, "train")  # the stage's own PRNG stream (prompt init)
  cfg.precision = config.precision
  cfg.label = cfg.label or f"{config.method} train"  # the console line says which method
  mesh = None
  n_dev = jax.device_count()
  if not cfg.get("mesh") and not cfg.get("fsdp") and bs % n_dev:
    # CoCoOp trains with batch 1: data-parallel over the devices that divide the batch.
    d = math.gcd(bs, n_dev)
    logging.warning("batch %d does not split over %d devices; training on %d", bs, n_dev, d)
    mesh = shd.make_mesh([(shd.DATA, d)], devices=jax.devices()[:d])
  result = trainer.run_stage(cfg, workdir=seed_dir, stage="train", init=init, loss_fn=loss_fn,
                             rules=optim.rules_from_config(config.train.rules, "train.rules"),
                             loader=loader, mesh=mesh,
                             make_tx=make_tx(cfg, loader.steps_per_epoch(0)),
                             frozen_source=str(config.model.weights))
  return jax.device_get(result.state["params"]["prompt"])


def released_prompt(config, seed: int, clip_model, classnames) -> dict:
  path = str(config.model.released_checkpoint).replace("{seed}", str(seed))
  spec = spec_of(config)
  # The reference's run folders name the setting, e.g. nctx16_cscFalse_ctpend.
  m = re.search(r"nctx(\d+)_csc(True|False)_ctp(end|middle|front)", path)
  if m and m.group(3) != spec.class_token_position:
    raise ValueError(f"{path}: trained with class_token_position={m.group(3)!r}, config has "
                     f"{spec.class_token_position!r} (config.prompt.class_token_position)")
  if m and (m.group(2) == "True") != spec.csc:
    raise ValueError(f"{path}: trained with csc={m.group(2)}, config.prompt.csc={spec.csc}")
  return released_lib.load(path, spec, width=clip_model.config.text_width,
                           num_classes=len(classnames), image_dim=clip_model.config.embed_dim,
                           field="model.released_checkpoint")


def final_prompt(config, seed_dir: str) -> dict:
  params, _ = ckpt_lib.read_params(seed_dir, "train")
  return params["prompt"]


def evaluate_seed(config, seed: int, clip_model, clip_vars, prompt: Optional[dict],
                  splits: data_lib.Splits, *, quiet: bool = False) -> dict:
  """Stage 2 for one seed: {row: top-1 %} (no progress bars when `quiet`)."""
  spec = spec_of(config) if prompt is not None else None
  out = {}
  kw = dict(batch_size=int(config.eval.batch_size), image_size=int(config.model.image_size),
            workers=int(config.data.workers))
  for row, (items, names) in eval_sets(config, seed, splits).items():
    if config.method == "zeroshot":
      dataset = config.data.name if row in ("acc", "base", "new") else row.partition("@")[0]
      templates = zeroshot.templates_for(dataset, bool(config.ensemble))
      score = zeroshot.zeroshot_scorer(clip_model, clip_vars, names, templates)
    else:
      if spec.csc and names != splits.classnames:
        raise ValueError("class-specific context (csc=True) cannot be evaluated on another class "
                         f"list ({row!r})")
      cp = M.build_class_prompts(names, spec)
      variables = {**clip_vars, "params": {**clip_vars["params"], "prompt": prompt}}
      score = evaluate.prompt_scorer(clip_model, variables, cp, chunk=int(config.eval.chunk))
    out[row] = evaluate.top1(score, items, desc=f"seed {seed}: eval {row}", progress=not quiet,
                             **kw)
    logging.info("seed %d: %s = %.2f", seed, row, out[row])
  return out


def linear_probe_seed(config, seed, clip_model, clip_vars, splits) -> dict:
  kw = dict(batch_size=int(config.eval.batch_size), image_size=int(config.model.image_size))
  feats = [zeroshot.features(clip_model, clip_vars, s, **kw)
           for s in (splits.train, splits.val, splits.test)]
  res = zeroshot.linear_probe(*feats, max_iter=int(config.linear_probe.max_iter),
                              search_steps=int(config.linear_probe.search_steps))
  logging.info("seed %d: linear probe %.2f (C=%g)", seed, res["acc"], res["C"])
  return {"acc": res["acc"]}


# ----------------------------------------------------------------------------- run


def run(config, workdir: str, stage: Optional[str] = None, *, clip=None,
        quiet: bool = False) -> dict:
  """All stages (or one) over `config.seeds`; returns {'per_seed', 'summary', 'table'}.

  `clip=(model, variables)` uses an in-memory CLIP instead of `config.model.weights`.
  `quiet` (a run inside a larger job) logs the table instead of printing it and shows no
  evaluation progress bars; the caller reports the results.
  """
  if stage is not None and stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  if config.method not in ("coop", "cocoop", "zeroshot", "linear_probe"):
    raise ValueError(f"config.method must be coop, cocoop, zeroshot or linear_probe, "
                     f"got {config.method!r}")
  if config.protocol not in ("fewshot", "base2new", "transfer"):
    raise ValueError(f"config.protocol must be fewshot, base2new or transfer, got "
                     f"{config.protocol!r}")
  os.makedirs(workdir, exist_ok=True)
  clip_model, clip_vars = clip if clip is not None else load_model(config)
  seeds = [int(s) for s in config.seeds]
  if config.method == "zeroshot":
    seeds = seeds[:1]  # nothing is sampled that the test split depends on

  per_seed = {}
  for seed in seeds:
    seed_dir = os.path.join(workdir, f"seed{seed}")
    eval_path = os.path.join(seed_dir, "eval.json")
    splits = splits_for(config, seed)
    logging.info("seed %d: %s", seed, splits.counts())

    # --- Stage 1: train the prompt (or take the released one) -------------------------------
    prompt = None
    if config.method in ("coop", "cocoop"):
      if config.model.released_checkpoint:
        prompt = released_prompt(config, seed, clip_model, splits.classnames)
      elif stage in (None, "train"):
        prompt = train_prompt(config, seed, seed_dir, clip_model, clip_vars, splits)

    # --- Stage 2: evaluate on every class list of the protocol ------------------------------
    if stage in (None, "eval"):
      if config.method == "linear_probe":
        res = linear_probe_seed(config, seed, clip_model, clip_vars, splits)
      else:
        if config.method in ("coop", "cocoop") and prompt is None:
          prompt = final_prompt(config, seed_dir)
        res = evaluate_seed(config, seed, clip_model, clip_vars, prompt, splits, quiet=quiet)
      metrics_lib.write_json(eval_path, res)
    res = metrics_lib.read_json(eval_path)
    if res is not None:
      per_seed[seed] = res

  # --- Stage 3: the table ---------------------------------------------------------------------
  out = {"per_seed": per_seed}
  if stage in (None, "table") and per_seed:
    summary = evaluate.aggregate(list(per_seed.values()))
    paper = config.paper.to_dict() if config.paper else {}
    name = config.data.name
    table = evaluate.format_table({name: summary}, {name: paper},
                                  title=f"{config.method} {config.protocol} "
                                        f"({len(per_seed)} seeds) ours (paper)")
    if quiet:
      logging.info("\n%s", table)
    else:
      print(table, flush=True)
    metrics_lib.write_json(os.path.join(workdir, "results.json"),
                           dict(dataset=name, method=config.method, protocol=config.protocol,
                                per_seed={str(k): v for k, v in per_seed.items()},
                                summary=summary, paper=paper))
    out.update(summary=summary, table=table)
  return out
