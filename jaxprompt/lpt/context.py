"""The run context of an LPT / VPT / linear-probe run and the pieces every stage uses.

* `Context`: tower, datasets, class counts and prompt spec, loaded once per run;
* `build_vit`: the frozen tower from a weight file or a tiny random spec;
* `make_train_loader`: dual (class-aware + instance-balanced), instance or class-aware
  sampling, with fixed batch shapes;
* `make_loss_fn`: A-GCL (or cross-entropy) on one or two batches, with LPT's matching
  term when the forward returns key similarities;
* `make_tx`: the stage's optimizer at its per-epoch schedule;
* `train_stage`: one stage on `trainer.run_stage`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics as metrics_lib
from jaxprompt import schedules
from jaxprompt import seeds
from jaxprompt import trainer
from jaxprompt.convert.timm_vit import load_vit
from jaxprompt.data.loader import Loader, ShuffleSampler
from jaxprompt.lpt import data as longtail
from jaxprompt.lpt import model as lpt_model
from jaxprompt.lpt.data import load_datasets
from jaxprompt.lpt.losses import agcl_loss, phase2_objective, reduced_similarity
from jaxprompt.lpt.released import check_released, load_released
from jaxprompt.lpt.samplers import (ClassAwareSampler, InstanceBalancedSampler, ib_loss_weight,
                                    lpt_steps_per_epoch)
from jaxprompt.lpt.transforms import make_lt_decode
from jaxprompt.models.vit import ViT, ViTConfig


def prompt_spec(config, num_classes: int) -> lpt_model.PromptSpec:
  m = config.model
  return lpt_model.PromptSpec(
      method=config.method, num_classes=int(num_classes), prompt_length=int(m.prompt_length),
      pool_size=int(m.pool_size), group_layers=int(m.group_layers), top_k=int(m.top_k),
      dropout=float(m.dropout), prompt_dropout=float(m.prompt_dropout), head=m.head,
      prompt_init=m.prompt_init)


# ============================================================== tower


def tiny_vit(tiny: Mapping[str, int], image_size: int, *, ln_eps: float = 1e-5,
             exact_gelu: bool = True) -> tuple[ViT, dict]:
  """A random ViT from {width, depth, heads, mlp_dim, patch, seed}: (module, numpy params)."""
  patch = int(tiny["patch"])
  if image_size % patch:
    raise ValueError(f"image_size {image_size} is not a multiple of the patch {patch}")
  cfg = ViTConfig(patch=patch, width=int(tiny["width"]), depth=int(tiny["depth"]),
                  heads=int(tiny["heads"]), mlp_dim=int(tiny["mlp_dim"]),
                  grid=(image_size // patch, image_size // patch))
  vit = ViT(cfg, ln_eps=ln_eps, exact_gelu=exact_gelu)
  init = jax.jit(lambda r: vit.init(r, jnp.zeros((1, image_size, image_size, 3)))["params"])
  return vit, jax.device_get(init(jax.random.key(int(tiny["seed"]))))


# DongSky/LPT builds timm's vit_base_patch16_224_in21k at timm 0.4.12-0.5.x: AugReg weights.
EXPECTED_TOWER = (
    "the AugReg ViT-B/16 IN-21k weights (timm vit_base_patch16_224_in21k at timm "
    "0.4.12-0.5.x, i.e. vit_base_patch16_224.augreg_in21k; "
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz), which have no "
    "pre-logits layer")


def build_vit(config) -> tuple[ViT, dict]:
  """The frozen tower: `model.weights` (timm or AugReg layout) or `model.tiny_random`."""
  m = config.model
  if m.tiny_random:
    return tiny_vit(m.tiny, int(m.image_size), ln_eps=float(m.ln_eps), exact_gelu=m.exact_gelu)
  if not m.weights:
    raise ValueError("set model.weights (a timm or AugReg ViT file) or model.tiny_random")
  model, variables = load_vit(m.weights, image_size=int(m.image_size), ln_eps=float(m.ln_eps),
                              exact_gelu=bool(m.exact_gelu), expected=EXPECTED_TOWER,
                              field="model.weights")
  return model.img, jax.device_get(variables["params"]["img"])


# ============================================================== data


def decode_fn(config, train: bool):
  d = config.data
  kw = dict(resize=int(d.resize) or None, mean=tuple(d.mean), std=tuple(d.std))
  if train:
    kw["scale"] = tuple(d.crop_scale)
  return make_lt_decode(train, int(config.model.image_size), **kw)


class DualLoader:
  """Two loaders zipped (class-aware, instance-balanced), same steps per epoch.

  Yields {'cb': batch, 'ib': batch, 'ib_weight': (b,) float32} with the epoch's
  instance-balanced loss weight repeated per row (so it shards like the batch).
  """

  def __init__(self, cb: Loader, ib: Loader, total_epochs: int, start_weight: float = 0.5):
    if cb.batch_size != ib.batch_size:
      raise ValueError("the two loaders need the same batch size")
    self.cb, self.ib = cb, ib
    self.batch_size = cb.batch_size
    self.total_epochs = int(total_epochs)
    self.start_weight = float(start_weight)

  def steps_per_epoch(self, epoch: int = 0) -> int:
    return min(self.cb.steps_per_epoch(epoch), self.ib.steps_per_epoch(epoch))

  def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
    w = np.float32(ib_loss_weight(epoch, self.total_epochs, self.start_weight))
    for a, b in zip(self.cb.iterate(epoch, start_batch), self.ib.iterate(epoch, start_batch)):
      yield {"cb": a, "ib": b, "ib_weight": np.full((len(a["label"]),), w, np.float32)}


def make_train_loader(config, train: longtail.LTDataset, total_epochs: int, seed: int):
  """Loader of the configured sampling; every epoch has floor(N / B) + 1 steps
  (the reference's loop length) for the LPT samplers, floor(N / B) for 'instance'."""
  d = config.data
  bs = int(d.batch_size)
  n = len(train)
  decode = decode_fn(config, train=True)
  workers = int(d.workers)
  steps = lpt_steps_per_epoch(n, bs)
  if d.sampling == "instance":
    return Loader(train.records, decode, ShuffleSampler(n, seed=seed), bs, seed=seed,
                  workers=workers)
  cb = Loader(train.records, decode,
              ClassAwareSampler(train.labels, num_samples_cls=int(d.num_samples_cls), seed=seed,
                                num_samples=steps * bs), bs, seed=seed, workers=workers)
  if d.sampling == "class_aware":
    return cb
  if d.sampling != "dual":
    raise ValueError(f"unknown sampling {d.sampling!r}; expected dual | instance | class_aware")
  # A different seed: equal seeds would give CB and IB sample p the same crop and flip.
  ib = Loader(train.records, decode, InstanceBalancedSampler(n, bs, steps, seed=seed + 1), bs,
              seed=seed + 1, workers=workers)
  return DualLoader(cb, ib, total_epochs, float(d.ib_start_weight))


# ============================================================== loss and optimizer


ForwardFn = Callable[[Mapping, jax.Array, jax.Array], dict]


def make_loss_fn(config, forward: ForwardFn, class_counts: np.ndarray):
  """`loss_fn(params, model_state, batch, rng)` for the trainer.

  `forward(params, images, rng) -> {'logits', optional 'similarity', 'indices'}`.
  Dual batches: L = [l_CB - w_m rs_CB] + w_e [l_IB - w_m rs_IB] (`phase2_objective`;
  rs = 0 without a prompt pool); both halves go through one forward of 2B images.
  Single batches: L = l - w_m rs. l is A-GCL (CB/IB gammas) or softmax CE.
  """
  lc = config.loss
  counts = np.asarray(class_counts, np.int64)
  if lc.kind == "agcl" and np.any(counts <= 0):
    raise ValueError("A-GCL needs every class to have training images; empty classes: "
                     f"{np.flatnonzero(counts <= 0)[:10].tolist()}")
  counts_j = jnp.asarray(np.maximum(counts, 1), jnp.float32)
  common = dict(margin=float(lc.margin), scale=float(lc.scale), noise_mul=float(lc.noise_mul),
                noise_std=float(lc.noise_std), label_smoothing=float(lc.label_smoothing))
  cb_kw = dict(common, gamma_pos=float(lc.cb_gamma_pos), gamma_neg=float(lc.cb_gamma_neg))
  ib_kw = dict(common, gamma_pos=float(lc.ib_gamma_pos), gamma_neg=float(lc.ib_gamma_neg))
  cosine_head = config.model.head == "cosine"
  match_w = float(lc.match_weight)

  def cls_loss(logits, labels, key, kw):
    if lc.kind == "agcl":
      return agcl_loss(logits, labels, counts_j, key, **kw)
    z = logits * float(lc.scale) if cosine_head else logits
    onehot = optax.smooth_labels(jax.nn.one_hot(labels, z.shape[-1]),
                                 float(lc.ce_label_smoothing))
    return optax.softmax_cross_entropy(z, onehot).mean()

  def rsim(out, sl):
    if "similarity" not in out:
      return jnp.zeros((), jnp.float32)
    return reduced_similarity(out["similarity"][sl], out["indices"][sl])

  def loss_fn(params, model_state, batch, rng):
    r_fwd, r_cb, r_ib = jax.random.split(rng, 3)
    if "cb" in batch:
      cb, ib = batch["cb"], batch["ib"]
      b = cb["label"].shape[0]
      out = forward(params, jnp.concatenate([cb["image"], ib["image"]]), r_fwd)
      first, second = slice(0, b), slice(b, None)
      l_cb = cls_loss(out["logits"][first], cb["label"], r_cb, cb_kw)
      l_ib = cls_loss(out["logits"][second], ib["label"], r_ib, ib_kw)
      rs_cb, rs_ib = rsim(out, first), rsim(out, second)
      w = jnp.mean(batch["ib_weight"])
      loss = phase2_objective(l_cb, rs_cb, l_ib, rs_ib, w, match_w)
      acc = jnp.mean(jnp.argmax(out["logits"][first], -1) == cb["label"])
      metrics = {"loss_cb": l_cb, "loss_ib": l_ib, "ib_weight": w, "accuracy_cb": acc}
      if "similarity" in out:
        metrics.update(reduced_sim_cb=rs_cb, reduced_sim_ib=rs_ib)
    else:
      out = forward(params, batch["image"], r_fwd)
      l = cls_loss(out["logits"], batch["label"], r_cb, cb_kw)
      rs = rsim(out, slice(None))
      loss = l - match_w * rs
      metrics = {"loss_cls": l, "accuracy": jnp.mean(jnp.argmax(out["logits"], -1) == batch["label"])}
      if "similarity" in out:
        metrics["reduced_sim"] = rs
    return loss, (model_state, metrics)

  return loss_fn


def make_tx(stage_cfg, steps_per_epoch: int):
  """`make_tx(trainable, rules, total_steps)` for run_stage: the stage's per-epoch schedule
  (LPT: `schedules.lpt_cosine` stepped after every 0-based epoch, first_epoch=0)."""
  o = stage_cfg.optimizer
  epochs = int(stage_cfg.total_epochs)
  fn = schedules.by_name(o.schedule, base_lr=float(o.lr), epochs=epochs, params=o)

  def build(trainable, rules, total_steps):
    if not epochs:
      raise ValueError("these pipelines schedule per epoch: set total_epochs")
    schedule = schedules.per_epoch(fn, steps_per_epoch, first_epoch=0, num_epochs=epochs)
    return trainer.default_tx(trainable, rules, o, total_steps, learning_rate=schedule)

  return build


# ============================================================== params


def overlay(base: Mapping, update: Mapping) -> dict:
  """`base` with the leaves of `update` replacing (or adding) those at the same paths."""
  out = dict(base)
  for k, v in update.items():
    out[k] = overlay(out.get(k, {}), v) if isinstance(v, Mapping) else v
  return out


def init_params(config, img_params: Mapping, vit_cfg: ViTConfig, spec: lpt_model.PromptSpec
                ) -> dict:
  """Full tree {'img', 'prompt', 'head'} as numpy: prompts and head from `config.seed`."""
  trainables = jax.jit(lambda r: lpt_model.init_trainables(r, vit_cfg, spec))(
      jax.random.key(int(config.seed)))
  return {"img": img_params, **jax.device_get(trainables)}


def params_after(workdir: str, stages: Sequence[str], base: Mapping) -> dict:
  """`base` with the trained leaves of each finished stage laid over it, in order."""
  params = dict(base)
  for stage in stages:
    trained, _ = ckpt_lib.read_params(workdir, stage)
    params = overlay(params, trained)
  return params


def log_counts(workdir: str, params: Mapping, spec: lpt_model.PromptSpec) -> dict:
  shapes = jax.eval_shape(lambda p: p, params)
  counts = lpt_model.parameter_counts(shapes, spec)
  logging.info("parameter counts (%s): %s", spec.method, counts)
  metrics_lib.write_json(os.path.join(workdir, "param_counts.json"), counts, indent=1)
  return counts


# ============================================================== driver pieces


class Context:
  """What every stage of a run needs: tower, datasets, class counts, prompt spec."""

  def __init__(self, config):
    self.config = config
    self.released: Optional[dict] = None
    path = config.model.released_checkpoint
    if path:
      if config.method != "lpt":
        raise ValueError(f"model.released_checkpoint is supported for LPT's released "
                         f"LPT_places.pth only, not method {config.method!r}: unset it")
      self.vit, self.released, info = load_released(config)
      self.img_params = self.released["img"]
      self.train, self.test = load_datasets(config, check_train_files=False)
      check_released(config, info, self.train.num_classes)
      self.vit_source = str(path)
    else:
      self.vit, self.img_params = build_vit(config)
      self.train, self.test = load_datasets(config)
      self.vit_source = (f"tiny_random({dict(config.model.tiny)})" if config.model.tiny_random
                         else str(config.model.weights))
    self.counts = self.train.class_counts()
    self.spec = prompt_spec(config, self.train.num_classes)
    logging.info("dataset %s: %d train / %d test images, %d classes (counts %d..%d)",
                 config.data.name, len(self.train), len(self.test), self.train.num_classes,
                 int(self.counts.max()), int(self.counts.min()))

  def init_params(self) -> dict:
    """The full tree: fresh prompts and head, or the released checkpoint's."""
    if self.released is not None:
      return self.released
    return init_params(self.config, self.img_params, self.vit.config, self.spec)


# The name the drivers' callers used before; the run context of either family is `Context`.
Setup = Context


def open_run(config, workdir: str) -> Context:
  """The run's context, its trainable counts logged and written to `param_counts.json`."""
  setup = Context(config)
  log_counts(workdir, setup.init_params(), setup.spec)
  return setup


def classifier_forward(setup: Context) -> ForwardFn:
  """Prompts (if any) -> frozen tower -> head: LPT phase 1, VPT and the linear probe."""
  spec = setup.spec

  def forward(params, images, rng):
    return {"logits": lpt_model.classifier_forward(setup.vit, params, images, spec, rng=rng)}
  return forward


def train_stage(setup: Context, workdir: str, stage: str, *, rules, forward: ForwardFn,
                init, seed_offset: int = 0, frozen_source: str = "", resume_init=None,
                carry: Sequence[str] = (), on_epoch_end: Optional[Callable] = None):
  """One training stage on `run_stage` with this family's loader, loss and schedule
  (`resume_init` / `carry`: resume without reading earlier stages, see `trainer.run_stage`;
  `on_epoch_end`: `evaluate.select_hook` for eval.select='best')."""
  cfg = setup.config[stage]
  loader = make_train_loader(setup.config, setup.train, int(cfg.total_epochs),
                             int(setup.config.seed) + seed_offset)
  return trainer.run_stage(
      seeds.for_stage(cfg, stage), workdir=workdir, stage=stage, init=init,
      loss_fn=make_loss_fn(setup.config, forward, setup.counts), rules=rules, loader=loader,
      make_tx=make_tx(cfg, loader.steps_per_epoch(0)),
      frozen_source=frozen_source or setup.vit_source, resume_init=resume_init, carry=carry,
      on_epoch_end=on_epoch_end)


