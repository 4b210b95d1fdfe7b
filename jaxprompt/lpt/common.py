"""Pieces shared by the long-tailed classification pipelines (`lpt`, `vpt`).

* `base_config` / `paper_config`: the config schema and the reference recipes;
* `build_vit`: the frozen tower from a weight file or a tiny random spec;
* `load_datasets`: Places-LT, CIFAR-100-LT, iNaturalist 2018, a list file, or a
  generated long-tailed set;
* `make_train_loader`: dual (class-aware + instance-balanced), instance or
  class-aware sampling, with fixed batch shapes;
* `make_loss_fn`: A-GCL (or cross-entropy) on one or two batches, with LPT's
  matching term when the forward returns key similarities;
* `make_tx`: SGD/Adam with a per-epoch schedule (LPT's timm cosine or VPT's
  warmup cosine);
* `evaluate` / `predict_folder`: shot accuracies, plots, results JSON, and class
  ids for a folder of images.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics as metrics_lib
from jaxprompt import optim
from jaxprompt import schedules
from jaxprompt.data import files as data_files
from jaxprompt.lpt import data as longtail
from jaxprompt.data.loader import Loader, PaddedSequentialSampler, ShuffleSampler
from jaxprompt.lpt.samplers import (ClassAwareSampler, InstanceBalancedSampler,
                                        ib_loss_weight, lpt_steps_per_epoch)
from jaxprompt.lpt.transforms import lpt_test_transform, make_lt_decode
from jaxprompt.lpt import evaluate as lt_eval
from jaxprompt.lpt.losses import AGCL_CB, AGCL_IB, agcl_loss, phase2_objective, reduced_similarity
from jaxprompt.lpt import model as lpt_model
from jaxprompt.convert.timm_vit import load_vit
from jaxprompt.models.vit import ViT, ViTConfig
from jaxprompt.trainer import stage_defaults

DATASETS = ("places_lt", "cifar100_lt", "inat2018", "list", "synthetic")
# predict_folder accepts every format PIL reads well, not only the datasets' own.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# ============================================================== configuration


def stage_config(*, epochs: int, lr: float, weight_decay: float, schedule: str,
                 warmup_epochs: int, warmup_lr_init: float, seed_ref, precision_ref,
                 fsdp_ref, optimizer: str = "sgd", momentum: float = 0.9
                 ) -> ml_collections.ConfigDict:
  """`trainer.stage_defaults()` plus the per-epoch schedule fields this family reads.

  optimizer.lr is the actual learning rate (the builder applies base_lr * batch / 256);
  optimizer.schedule: 'lpt_cosine' (timm cosine, epoch 0 at warmup_lr_init) or
  'vpt_cosine' (linear warm-up from 0 over warmup_epochs, then cosine to 0 over the rest).
  """
  s = stage_defaults()
  s.seed = seed_ref
  s.precision = precision_ref
  s.fsdp = fsdp_ref
  s.total_epochs = int(epochs)
  s.optimizer.name = optimizer
  s.optimizer.lr = float(lr)
  s.optimizer.weight_decay = float(weight_decay)
  s.optimizer.coupled_decay = True  # torch SGD weight_decay: L2 added to the gradient
  s.optimizer.schedule = schedule
  s.optimizer.warmup_epochs = int(warmup_epochs)
  s.optimizer.warmup_lr_init = float(warmup_lr_init)
  if optimizer == "sgd":
    s.optimizer.hparams = ml_collections.ConfigDict(dict(momentum=float(momentum),
                                                         nesterov=False))
  s.ckpt_every_steps = 500
  s.log_every_steps = 20
  return s


def parse_dataset(dataset: str, imbalance_ratio: Optional[int] = None) -> tuple[str, int]:
  """'cifar100_lt', 'cifar100_lt:50' or 'cifar100_lt_r50' -> ('cifar100_lt', 50)."""
  name, ratio = dataset, imbalance_ratio
  for sep in (":", "_r"):
    if name.startswith("cifar100_lt" + sep):
      name, ratio = "cifar100_lt", int(name[len("cifar100_lt" + sep):])
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
  if name == "cifar100_lt":
    ratio = int(ratio or 100)
    if ratio not in longtail.CIFAR_LT_RATIOS:
      raise ValueError(f"CIFAR-100-LT ratio {ratio} not in {longtail.CIFAR_LT_RATIOS}")
  return name, int(ratio or 0)


def paper_config(dataset: str, method: str, *, imbalance_ratio: Optional[int] = None,
                 vit_weights: str = "", tiny_random: Optional[Mapping[str, int]] = None,
                 data_root: str = "", image_size: Optional[int] = None,
                 batch_size: Optional[int] = None, epochs: Optional[int] = None,
                 phase1_epochs: Optional[int] = None, phase2_epochs: Optional[int] = None,
                 seed: int = 42, balanced: bool = False) -> ml_collections.ConfigDict:
  """The reference recipe for (dataset, method); every field documented in `base_config`.

  Args:
    dataset: 'places_lt', 'cifar100_lt' (ratio via `imbalance_ratio` or
      'cifar100_lt:200'), 'inat2018', 'list' (own list files) or 'synthetic'
      (generated long-tailed arrays, for tests and demos).
    method: 'lpt' (pipeline 'lpt': phase1, phase2, eval), 'vpt_deep',
      'vpt_shallow' or 'linear' (pipeline 'vpt': train, eval).
    vit_weights: timm state dict or AugReg `.npz` of the tower (LPT: AugReg
      ViT-B/16 IN-21k, `B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz`);
      also a pretrained tiny ViT in either layout.
    tiny_random: instead of weights, a random tower {width, depth, heads, mlp_dim,
      patch, seed} (keys optional; defaults width 64, depth 4, heads 1, mlp 128,
      patch 4, seed 0).
    data_root: dataset root (see `base_config` data.*).
    image_size / batch_size / epochs: override the recipe (epochs sets every
      training stage; phase1_epochs / phase2_epochs set one). The learning rate
      is rescaled linearly with the batch (base lr at 256).
    balanced: the "balanced sampling" rows of LPT's Table 1 for the VPT and linear
      baselines: cosine head, dual (class-aware + instance-balanced) sampling, A-GCL.
  """
  name, ratio = parse_dataset(dataset, imbalance_ratio)
  c = base_config(method, seed=seed)
  if balanced:
    c.model.head, c.data.sampling, c.loss.kind = "cosine", "dual", "agcl"
  c.data.dataset = name
  c.data.root = data_root
  c.data.imbalance_ratio = ratio or 100
  if vit_weights:
    c.model.vit_weights = vit_weights
  if tiny_random is not None:
    c.model.tiny_random = True
    for k, v in dict(tiny_random).items():
      if k not in c.model.tiny:
        raise KeyError(f"tiny_random: unknown field {k!r}; known {sorted(c.model.tiny)}")
      c.model.tiny[k] = int(v)
  if image_size:
    c.model.image_size = int(image_size)
  bs = int(batch_size or c.data.batch_size)
  c.data.batch_size = bs
  c.data.eval_batch_size = min(c.data.eval_batch_size, max(bs, 8))
  notes = [c.recipe_notes]
  if name == "cifar100_lt":
    notes.append(f"CIFAR-100-LT ratio {ratio}: the reference gives no per-dataset recipe; "
                 "its defaults (90 epochs, lr 0.02 @ 256) are used.")
  elif name == "inat2018":
    notes.append("iNaturalist 2018: not in the reference repo; its defaults are used.")
  elif name == "places_lt":
    notes.append("Places-LT: the reference's released phase-2 recipe (train_dual_dualloss.py).")
  c.recipe_notes = " ".join(notes)
  for stage in stage_names(method):
    s = c[stage]
    e = epochs or (phase1_epochs if stage == "phase1" else phase2_epochs if stage == "phase2"
                   else None)
    if e:
      s.total_epochs = int(e)
    s.optimizer.lr = float(s.optimizer.base_lr_at_256) * bs / 256.0
  return c


def stage_names(method: str) -> tuple[str, ...]:
  return ("phase1", "phase2") if method == "lpt" else ("train",)


def base_config(method: str = "lpt", *, seed: int = 42) -> ml_collections.ConfigDict:
  """The full schema with the reference defaults (lpt.md 10; VPT baselines lpt.md 7).

  Top level: pipeline ('lpt' | 'vpt'), method, seed, precision ('float32' |
  'bfloat16'), fsdp (0 data parallel, n / -1 fsdp axis), recipe_notes (provenance).
  model.*: tower and prompts. data.*: dataset, sampling, transforms, batches.
  loss.*: A-GCL / CE constants. eval.*: buckets, checkpoints, plots, prediction.
  phase1 / phase2 (LPT) or train (VPT): trainer stage configs.
  """
  if method not in lpt_model.METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {lpt_model.METHODS}")
  lpt = method == "lpt"
  c = ml_collections.ConfigDict()
  c.pipeline = "lpt" if lpt else "vpt"
  c.method = method
  c.seed = seed
  c.precision = "float32"
  c.fsdp = 0
  c.recipe_notes = (
      "LPT: DongSky/LPT phase-2 code defaults (lpt.md 10); phase 1 = same loss, dual "
      "sampling, SGD and wd 0.01 without the pool (the author's description; no script)."
      if lpt else
      "VPT baseline in LPT's setting: AugReg IN-21k tower, LPT transforms (mean=std=0.5), "
      "VPT's own optimisation (SGD 0.9, warm-up cosine, base config 100 epochs / 10 warm-up, "
      "wd 1e-4, batch 128, lr 0.1 @ 256 from its CUB yaml: the LPT paper does not give its "
      "VPT hyper-parameters), linear head + CE, instance-balanced sampling (Table 1 rows "
      "without balanced sampling; set data.sampling='dual' for the balanced rows).")

  m = ml_collections.ConfigDict()
  m.vit_weights = ""          # timm .pth/.safetensors or AugReg/big_vision .npz
  m.tiny_random = False       # build a random tower from model.tiny instead of weights
  m.released_checkpoint = ""  # LPT: the authors' LPT_places.pth, evaluated by --stage eval
                              # instead of this workdir's checkpoints (vit_weights unused)
  m.tiny = ml_collections.ConfigDict(dict(width=64, depth=4, heads=1, mlp_dim=128, patch=4,
                                          seed=0))
  m.image_size = 224          # input side; the position embedding is resized to it
  m.ln_eps = 1e-5             # LPT builds its blocks with torch's default LayerNorm eps
  m.exact_gelu = True
  m.prompt_length = 10        # T: tokens per layer (shared, group, VPT)
  m.pool_size = 20            # LPT: number of group prompts / keys
  m.group_layers = 6          # LPT: the last K blocks carry group prompts
  m.top_k = 2                 # LPT: group prompts selected (and averaged) per image
  # Dropout on the final feature, training only: LPT's VPT_ViT has it (0.1); VPT's own
  # code runs the backbone in eval mode and feeds the CLS feature straight to its Linear.
  m.dropout = 0.1 if method == "lpt" else 0.0
  m.prompt_dropout = 0.1 if method == "vpt_deep" else 0.0  # VPT demo values; LPT none
  m.head = "cosine" if lpt else ("linear")
  m.prompt_init = "trunc_normal" if lpt else "vpt_uniform"
  c.model = m

  d = ml_collections.ConfigDict()
  d.dataset = "places_lt"     # places_lt | cifar100_lt | inat2018 | list | synthetic
  d.root = ""                 # places: Places365 root; cifar: folder with cifar-100-python
                              # (or TFDS data_dir); inat/list: image root
  d.lists_dir = ""            # places: folder of Places_LT_{train,test}.txt (default root)
  d.imbalance_ratio = 100     # cifar100_lt: 10 | 50 | 100 | 200
  d.cifar_source = "python"   # 'python' pickles or 'tfds'
  d.train_file = ""           # inat2018: train2018.json or iNaturalist18_train.txt; list: train list
  d.test_file = ""            # inat2018: val2018.json or iNaturalist18_val.txt; list: test list
  d.num_classes = 0           # list: number of classes (0: max label + 1)
  d.test_split = "test"       # places_lt: 'test' (the reference) or 'val'
  d.check_files = True        # list readers check every image exists
  d.synthetic = ml_collections.ConfigDict(dict(
      num_classes=10, image_size=16, max_count=60, min_count=3, test_per_class=10, seed=0))
  d.mean = (0.5, 0.5, 0.5)
  d.std = (0.5, 0.5, 0.5)
  d.resize = 0                # test square resize; 0: image_size * 8 // 7 (256 for 224)
  d.crop_scale = (0.08, 1.0)  # RandomResizedCrop scale range
  d.batch_size = 256 if lpt else 128
  d.eval_batch_size = 256
  d.sampling = "dual" if lpt else "instance"  # dual | instance | class_aware
  d.num_samples_cls = 4       # class-aware: images per visited class
  d.ib_start_weight = 0.5     # dual: w_e = start * (E - e) / E
  d.workers = 8
  c.data = d

  lo = ml_collections.ConfigDict()
  lo.kind = "agcl" if lpt else "ce"   # 'agcl' | 'ce' (softmax CE; cosine logits x scale)
  lo.margin = 0.1
  lo.scale = 20.0
  lo.noise_mul = 0.5
  lo.noise_std = 1.0 / 3.0
  lo.label_smoothing = 0.1            # A-GCL's ASL smoothing (CE uses ce_label_smoothing)
  lo.ce_label_smoothing = 0.0
  lo.cb_gamma_pos = AGCL_CB["gamma_pos"]
  lo.cb_gamma_neg = AGCL_CB["gamma_neg"]
  lo.ib_gamma_pos = AGCL_IB["gamma_pos"]
  lo.ib_gamma_neg = AGCL_IB["gamma_neg"]
  lo.match_weight = 0.5               # phase 2: -0.5 * sum of the top-2 cosines
  c.loss = lo

  ev = ml_collections.ConfigDict()
  ev.convention = "lpt"               # shot buckets: 'lpt' (few <= 20) or 'oltr' (few < 20)
  ev.stages = ("phase1", "phase2") if lpt else ("train",)  # finished stages to evaluate
  ev.fused = True                     # LPT: share the first blocks of the two passes
  ev.plots = True
  ev.predict_dir = ""                 # folder of images: write predicted class ids
  ev.predict_output = ""              # default <workdir>/eval/<stage>/predictions.tsv
  c.eval = ev

  seed_ref, prec_ref, fsdp_ref = c.get_ref("seed"), c.get_ref("precision"), c.get_ref("fsdp")
  if lpt:
    for stage in ("phase1", "phase2"):
      s = stage_config(epochs=90, lr=0.02, weight_decay=0.01, schedule="lpt_cosine",
                       warmup_epochs=1, warmup_lr_init=1e-6, seed_ref=seed_ref,
                       precision_ref=prec_ref, fsdp_ref=fsdp_ref)
      s.optimizer.base_lr_at_256 = 0.02
      c[stage] = s
  else:
    s = stage_config(epochs=100, lr=0.1 * 128 / 256, weight_decay=1e-4, schedule="vpt_cosine",
                     warmup_epochs=10, warmup_lr_init=0.0, seed_ref=seed_ref,
                     precision_ref=prec_ref, fsdp_ref=fsdp_ref)
    s.optimizer.base_lr_at_256 = 0.1
    c.train = s
  return c


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


def build_vit(config) -> tuple[ViT, dict]:
  """The frozen tower: `model.vit_weights` (timm or AugReg layout) or `model.tiny_random`."""
  m = config.model
  if m.tiny_random:
    return tiny_vit(m.tiny, int(m.image_size), ln_eps=float(m.ln_eps), exact_gelu=m.exact_gelu)
  if not m.vit_weights:
    raise ValueError("set model.vit_weights (a timm or AugReg ViT file) or model.tiny_random")
  model, variables = load_vit(m.vit_weights, image_size=int(m.image_size), ln_eps=float(m.ln_eps),
                              exact_gelu=bool(m.exact_gelu))
  return model.img, jax.device_get(variables["params"]["img"])


# ============================================================== data


def synthetic_lt(num_classes: int = 10, image_size: int = 16, max_count: int = 60,
                 min_count: int = 3, test_per_class: int = 10, seed: int = 0
                 ) -> tuple[longtail.LTDataset, longtail.LTDataset]:
  """A generated long-tailed set of uint8 arrays: counts fall geometrically from
  max_count to min_count; each class is a random colour pattern plus noise."""
  rng = np.random.default_rng(seed)
  ratio = max_count / max(min_count, 1)
  counts = [max(int(max_count * ratio ** (-i / max(num_classes - 1, 1))), min_count)
            for i in range(num_classes)]
  proto = rng.uniform(40, 215, size=(num_classes, 4, 4, 3))

  def make(label: int) -> np.ndarray:
    base = np.kron(proto[label], np.ones((image_size // 4 + 1, image_size // 4 + 1, 1)))
    img = base[:image_size, :image_size] + rng.normal(0, 25, (image_size, image_size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)

  train = [longtail.LTRecord(make(y), y) for y, n in enumerate(counts) for _ in range(n)]
  test = [longtail.LTRecord(make(y), y) for y in range(num_classes) for _ in range(test_per_class)]
  return longtail.LTDataset(train, num_classes), longtail.LTDataset(test, num_classes)


def load_datasets(config, *, check_train_files: bool = True
                  ) -> tuple[longtail.LTDataset, longtail.LTDataset]:
  """(train, test) for `data.dataset`.

  `check_train_files=False` reads the train labels without checking that the images
  exist (evaluation needs only the class counts).
  """
  d = config.data
  name = d.dataset
  check = bool(d.check_files)
  check_train = check and check_train_files
  if name == "synthetic":
    return synthetic_lt(**dict(d.synthetic))
  if name == "cifar100_lt":
    root = d.root or None
    return (longtail.load_cifar100_lt(root, d.imbalance_ratio, "train", seed=int(config.seed),
                                      source=d.cifar_source),
            longtail.load_cifar100_lt(root, d.imbalance_ratio, "test", source=d.cifar_source))
  if name == "places_lt":
    lists = d.lists_dir or None
    return (longtail.load_places_lt(d.root, "train", lists_dir=lists, check_files=check_train),
            longtail.load_places_lt(d.root, d.test_split, lists_dir=lists, check_files=check))
  if name == "inat2018":
    if not (d.train_file and d.test_file):
      raise ValueError("inat2018 needs data.train_file and data.test_file (json or txt lists)")
    def one(path, check_files):
      if path.endswith(".json"):
        return longtail.load_inat2018_json(path, d.root, check_files=check_files)
      return longtail.load_inat2018_list(path, d.root, check_files=check_files)
    return one(d.train_file, check_train), one(d.test_file, check)
  if name == "list":
    if not (d.train_file and d.test_file):
      raise ValueError("dataset 'list' needs data.train_file and data.test_file")
    nc = int(d.num_classes) or None
    tr = longtail.read_lt_list(d.train_file, d.root, num_classes=nc, check_files=check_train)
    te = longtail.read_lt_list(d.test_file, d.root, num_classes=nc, check_files=check)
    nc = nc or int(max(r.label for r in tr + te)) + 1
    return longtail.LTDataset(tr, nc), longtail.LTDataset(te, nc)
  raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


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


def vpt_cosine(epoch: Any, *, base_lr: float, epochs: int, warmup_epochs: int) -> Any:
  """VPT's WarmupCosineSchedule per epoch: e / W below W, then 0.5 (1 + cos(pi p)) with
  p = (e - W) / (E - W)."""
  e = float(epoch)
  if e < warmup_epochs:
    return base_lr * e / max(1, warmup_epochs)
  p = (e - warmup_epochs) / max(1, epochs - warmup_epochs)
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


def make_tx(stage_cfg, steps_per_epoch: int):
  """`make_tx(trainable, rules, total_steps)` for run_stage: the stage's per-epoch schedule
  (LPT: `schedules.lpt_cosine` stepped after every 0-based epoch, first_epoch=0)."""
  o = stage_cfg.optimizer
  epochs = int(stage_cfg.total_epochs)
  lr = float(o.lr)
  if o.schedule == "lpt_cosine":
    fn = lambda e: schedules.lpt_cosine(e, base_lr=lr, epochs=epochs,  # noqa: E731
                                        warmup_epochs=int(o.warmup_epochs),
                                        warmup_lr_init=float(o.warmup_lr_init))
  elif o.schedule == "vpt_cosine":
    fn = lambda e: vpt_cosine(e, base_lr=lr, epochs=epochs,  # noqa: E731
                              warmup_epochs=int(o.warmup_epochs))
  elif o.schedule == "constant":
    fn = lambda e: lr  # noqa: E731
  else:
    raise ValueError(f"unknown schedule {o.schedule!r}; expected lpt_cosine | vpt_cosine | constant")

  def build(trainable, rules, total_steps):
    if not epochs:
      raise ValueError("these pipelines schedule per epoch: set total_epochs")
    schedule = schedules.per_epoch(fn, steps_per_epoch, first_epoch=0, num_epochs=epochs)
    tx = optim.make_optimizer(trainable, rules, name=o.name, learning_rate=schedule,
                              weight_decay=float(o.weight_decay),
                              coupled_decay=bool(o.coupled_decay), **dict(o.hparams or {}))
    return tx, schedule

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


# ============================================================== evaluation


def _batched(records: Sequence, decode, batch: int, workers: int) -> Iterator[tuple[dict, int]]:
  """Fixed-shape batches over all records (the last one padded with record 0): (batch, valid)."""
  n = len(records)
  loader = Loader(records, decode, PaddedSequentialSampler(n, batch), batch, seed=0,
                  workers=workers, process_index=0, process_count=1)
  for i, b in enumerate(loader.iterate(0)):
    yield b, min(batch, n - i * batch)


def run_predict(predict, params, records: Sequence, decode, batch: int, workers: int
                ) -> dict[str, np.ndarray]:
  """Concatenated outputs of `predict(params, images)` over `records` (padding removed)."""
  outs: dict[str, list] = {}
  for b, valid in _batched(records, decode, batch, workers):
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
                    int(d.eval_batch_size), int(d.workers))
  labels = test.labels
  conv = config.eval.convention
  acc = lt_eval.shot_accuracy(res["pred"], labels, train_counts, conv)
  other = "oltr" if conv == "lpt" else "lpt"
  per_class = lt_eval.per_class_accuracy(res["pred"], labels, test.num_classes)
  buckets = lt_eval.shot_buckets(train_counts, conv)
  result = {
      "name": name, "convention": conv, **{k: 100.0 * v for k, v in acc.items()},
      f"{other}_convention": {k: 100.0 * v for k, v in
                              lt_eval.shot_accuracy(res["pred"], labels, train_counts,
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
      lt_eval.plot_per_class_accuracy(res["pred"], labels, train_counts,
                                      os.path.join(out_dir, "per_class_accuracy.png"),
                                      convention=conv)
      lt_eval.plot_bucket_accuracy({name: acc}, os.path.join(out_dir, "bucket_accuracy.png"),
                                   title=f"{name} ({conv} buckets)")
  logging.info("%s: overall %.2f | many %.2f | medium %.2f | few %.2f (%s buckets)", name,
               result["overall"], result["many"], result["medium"], result["few"], conv)
  return result


def predict_folder(config, predict, params, folder: str, output: str,
                   class_names: Optional[Sequence[str]] = None) -> list[tuple[str, int]]:
  """Writes `<relative path>\\t<class id>[\\t<class name>]` per image of `folder`."""
  from jaxprompt.clipreid.transforms import load_image
  paths = data_files.list_images(folder, IMAGE_EXTS)
  size, d = int(config.model.image_size), config.data
  resize = int(d.resize) or None

  def decode(path, rng):
    del rng
    x = lpt_test_transform(load_image(path), size, resize, mean=tuple(d.mean), std=tuple(d.std))
    return {"image": np.ascontiguousarray(x)}

  res = run_predict(predict, params, paths, decode, int(d.eval_batch_size), int(d.workers))
  rows = [(os.path.relpath(p, folder), int(c)) for p, c in zip(paths, res["pred"])]
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      for rel, c in rows:
        extra = f"\t{class_names[c]}" if class_names else ""
        f.write(f"{rel}\t{c}{extra}\n")
  logging.info("predicted %d images of %s -> %s", len(rows), folder, output)
  return rows


# ============================================================== driver pieces


class Setup:
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
                         else str(config.model.vit_weights))
    self.counts = self.train.class_counts()
    self.spec = prompt_spec(config, self.train.num_classes)
    logging.info("dataset %s: %d train / %d test images, %d classes (counts %d..%d)",
                 config.data.dataset, len(self.train), len(self.test), self.train.num_classes,
                 int(self.counts.max()), int(self.counts.min()))

  def init_params(self) -> dict:
    """The full tree: fresh prompts and head, or the released checkpoint's."""
    if self.released is not None:
      return self.released
    return init_params(self.config, self.img_params, self.vit.config, self.spec)


def load_released(config) -> tuple[ViT, dict, dict]:
  """(tower, host params {'img', 'prompt', 'head'}, converter info) of
  `model.released_checkpoint` (LPT's phase-2 model)."""
  from jaxprompt.lpt import released as lpt_ckpt  # pylint: disable=import-outside-toplevel
  path = config.model.released_checkpoint
  model, params, info = lpt_ckpt.convert(path)
  logging.info("released checkpoint %s: %d classes, depth %d, prompts %d x %d, pool %d, "
               "group layers %d, grid %s", path, info["num_classes"], info["depth"],
               info["depth"], info["prompt_length"], info["pool_size"], info["group_layers"],
               info["grid"])
  return model.img, jax.device_get(params), info


def check_released(config, info: Mapping[str, Any], num_classes: int) -> None:
  """Refuse a released LPT checkpoint that does not fit the config or the dataset,
  naming the config field to change."""
  m, path = config.model, config.model.released_checkpoint
  vcfg = info["config"]
  side = [g * vcfg.patch for g in info["grid"]]
  wrong = []
  if side[0] != side[1] or int(m.image_size) != side[0]:
    wrong.append(f"model.image_size={side[0]} (its position embedding is a "
                 f"{info['grid'][0]}x{info['grid'][1]} grid of {vcfg.patch}-pixel patches; "
                 f"config {m.image_size})")
  for field, key in (("prompt_length", "prompt_length"), ("pool_size", "pool_size"),
                     ("group_layers", "group_layers")):
    if int(m[field]) != int(info[key]):
      wrong.append(f"model.{field}={info[key]} (config {m[field]})")
  if float(m.ln_eps) != float(info["ln_eps"]):
    wrong.append(f"model.ln_eps={info['ln_eps']} (config {m.ln_eps})")
  if not m.exact_gelu:
    wrong.append("model.exact_gelu=True")
  if m.head != "cosine":
    wrong.append(f"model.head='cosine' (config {m.head!r})")
  if wrong:
    raise ValueError(f"{path} does not fit this config: set " + "; ".join(wrong))
  if int(info["num_classes"]) != int(num_classes):
    hint = (f"set data.num_classes={info['num_classes']} if the lists use that many labels"
            if config.data.dataset == "list" else
            "set data.dataset (and data.root / data.lists_dir) to the dataset it was trained on")
    raise ValueError(
        f"{path} classifies {info['num_classes']} classes but data.dataset="
        f"{config.data.dataset!r} has {num_classes}: {hint}")


def train_stage(setup: Setup, workdir: str, stage: str, *, rules, forward: ForwardFn,
                init, seed_offset: int = 0, frozen_source: str = ""):
  """One training stage on `run_stage` with this family's loader, loss and schedule."""
  from jaxprompt import trainer  # pylint: disable=import-outside-toplevel
  cfg = setup.config[stage]
  loader = make_train_loader(setup.config, setup.train, int(cfg.total_epochs),
                             int(setup.config.seed) + seed_offset)
  return trainer.run_stage(
      cfg, workdir=workdir, stage=stage, init=init,
      loss_fn=make_loss_fn(setup.config, forward, setup.counts), rules=rules, loader=loader,
      make_tx=make_tx(cfg, loader.steps_per_epoch(0)),
      frozen_source=frozen_source or setup.vit_source)


def eval_stage(setup: Setup, workdir: str, stage_chain: Sequence[str], *, phase: int = 2,
               predict_images: bool = True) -> dict:
  """Evaluate the model after the last stage of `stage_chain` (read from the checkpoints
  of the whole chain); predictions for `eval.predict_dir` if set."""
  name = stage_chain[-1]
  params = params_after(workdir, stage_chain, setup.init_params())
  return evaluate_params(setup, workdir, name, params, phase=phase,
                         predict_images=predict_images)


def eval_released(setup: Setup, workdir: str, *, predict_images: bool = True) -> dict:
  """Evaluate `model.released_checkpoint` (LPT's phase-2 model) as the phase-2 stage:
  results in `<workdir>/eval/phase2/`, as for a trained run."""
  if setup.released is None:
    raise ValueError("model.released_checkpoint is not set")
  return evaluate_params(setup, workdir, "phase2", setup.released, phase=2,
                         predict_images=predict_images, label="phase2 (released)",
                         extra={"weights": str(setup.config.model.released_checkpoint)})


def evaluate_params(setup: Setup, workdir: str, name: str, params: Mapping, *, phase: int,
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
