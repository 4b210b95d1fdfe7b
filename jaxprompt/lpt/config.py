"""LPT recipe (and its VPT-deep / linear-probe baselines): base config, per-row differences, `tiny`.

Every row of Dong et al., "LPT: Long-tailed Prompt Tuning" (ICLR 2023), Tables 1, 2 and 8,
is `paper_config(dataset, method, ...)`; `configs/lpt/<row>.py` holds one each, with its
launch command and the paper's numbers. LPT's recipe follows DongSky/LPT
phase2_test/train_dual_dualloss.py; the baselines follow KMnP/vpt configs/prompt/cub.yaml
over configs/base-prompt.yaml (linear probe: configs/linear/cub.yaml over base-linear.yaml).
"""
from __future__ import annotations

from typing import Mapping, Optional

import ml_collections

from jaxprompt.lpt import data as longtail
from jaxprompt.lpt import model as lpt_model
from jaxprompt.lpt.data import DATASETS
from jaxprompt.lpt.losses import AGCL_CB, AGCL_IB
from jaxprompt import validate
from jaxprompt.trainer import stage_defaults

# The recipes' lr at batch 256 (rescaled linearly with data.batch_size by paper_config): LPT's
# 0.02 (DongSky/LPT phase2_test/train_dual_dualloss.py), VPT's 0.1 (KMnP/vpt
# configs/prompt/cub.yaml and configs/linear/cub.yaml).
BASE_LR_AT_256 = {"lpt": 0.02, "baselines": 0.1}

# Default `rules` of each stage: [(regex, 'freeze' | 'train' | {lr_mult, wd_mult})] over
# '/'-joined parameter names, first full match wins (`optim.rules_from_config`).
# LPT phase 1: shared prompts and head; group prompts and keys exist but stay frozen.
PHASE1_RULES = [("prompt/shared", "train"), ("head/.*", "train"), (".*", "freeze")]
# LPT phase 2: group prompts, keys and head; shared prompts and the tower frozen.
PHASE2_RULES = [("prompt/group", "train"), ("prompt/keys", "train"), ("head/.*", "train"),
                (".*", "freeze")]
# VPT / linear probe: prompts (none for the probe: the rule then matches nothing) and head.
# VPT's optimizer exempts the last layer's bias from weight decay (KMnP/vpt
# src/solver/optimizer.py); the cosine head of the balanced rows has no bias.
BASELINE_RULES = [("prompt/.*", "train"), ("head/bias", {"wd_mult": 0.0}), ("head/.*", "train"),
                  (".*", "freeze")]


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
  if schedule == "lpt_cosine":  # VPT's cosine warms up from 0
    s.optimizer.warmup_lr_init = float(warmup_lr_init)
  del s.optimizer["warmup_steps"]  # the per-epoch schedule warms up in epochs
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
                 weights: str = "", tiny_random: Optional[Mapping[str, int]] = None,
                 root: str = "", image_size: Optional[int] = None,
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
    weights: timm state dict or AugReg `.npz` of the tower (LPT: AugReg
      ViT-B/16 IN-21k, `B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz`);
      also a pretrained tiny ViT in either layout.
    tiny_random: instead of weights, a random tower {width, depth, heads, mlp_dim,
      patch, seed} (keys optional; defaults width 64, depth 4, heads 1, mlp 128,
      patch 4, seed 0).
    root: dataset root (see `base_config` data.*).
    image_size / batch_size / epochs: override the recipe (epochs sets every
      training stage; phase1_epochs / phase2_epochs set one). The learning rate
      is rescaled linearly with the batch (base lr at 256).
    balanced: the "balanced sampling" rows of LPT's Table 1, as the paper's numbers
      identify them. 'linear': Table 8 row (a) (phase 1 without prompts and without
      A-GCL) reports exactly Table 1's linear-balanced numbers, so it is LPT's phase-1
      recipe (cosine head, dual sampling, dropout 0.1, SGD lr 0.02 @ 256, wd 0.01, 90
      epochs) with softmax CE on the scaled cosine logits. 'vpt_deep' / 'vpt_shallow':
      Table 8 row (b) (prompts + phase 1 without A-GCL, 49.10) is not Table 1's
      VPT-balanced (44.17), so that row is VPT's own recipe with class-balanced
      (class-aware) sampling.
  """
  name, ratio = parse_dataset(dataset, imbalance_ratio)
  c = base_config(method, seed=seed)
  # The linear-balanced row trains with LPT's phase-1 optimisation, lr included.
  lr_recipe = "lpt" if method == "lpt" or (balanced and method == "linear") else "baselines"
  if balanced and method == "linear":
    c.model.head, c.data.sampling, c.loss.kind = "cosine", "dual", "ce"
    c.model.dropout = 0.1
    c.data.batch_size = 256
    c.train = lpt_stage_config(c.get_ref("seed"), c.get_ref("precision"), c.get_ref("fsdp"))
    c.train.rules = tuple(BASELINE_RULES)
    c.recipe_notes = (
        "Linear probe with balanced sampling = LPT Table 8 row (a): LPT's phase-1 recipe "
        "(cosine head, dual sampling, feature dropout 0.1, SGD 0.9, lr 0.02 @ 256, wd 0.01, "
        "90 epochs, timm cosine) without prompts and with softmax CE instead of A-GCL.")
  elif balanced:
    if method == "lpt":
      raise ValueError("balanced=True selects the baselines' balanced rows; LPT is always "
                       "trained with dual sampling")
    c.data.sampling = "class_aware"
    c.recipe_notes += (" Balanced row: class-balanced (class-aware, 4 per class) sampling "
                       "instead of instance-balanced; everything else VPT's recipe.")
  c.data.name = name
  c.data.root = root
  c.data.imbalance_ratio = ratio or 100
  if weights:
    c.model.weights = weights
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
  c.eval.batch_size = min(c.eval.batch_size, max(bs, 8))
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
    s.optimizer.lr = BASE_LR_AT_256[lr_recipe] * bs / 256.0
  return c


def stage_names(method: str) -> tuple[str, ...]:
  return ("phase1", "phase2") if method == "lpt" else ("train",)


def base_config(method: str = "lpt", *, seed: int = 42) -> ml_collections.ConfigDict:
  """The full schema with the reference defaults (DongSky/LPT phase2_test/train_dual_dualloss.py; VPT
  baselines: KMnP/vpt configs/base-prompt.yaml).

  Top level: pipeline ('lpt' | 'vpt'), method, seed, precision ('float32' |
  'bfloat16'), fsdp (0 data parallel, n / -1 fsdp axis), recipe_notes (provenance).
  model.*: tower and prompts. data.*: dataset, sampling, transforms, batches.
  loss.*: A-GCL / CE constants. eval.*: batch size, buckets, checkpoints, plots, prediction.
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
      "LPT: DongSky/LPT phase-2 code defaults (phase2_test/train_dual_dualloss.py); phase 1 = same loss, dual "
      "sampling, SGD and wd 0.01 without the pool (the author's description; no script)."
      if lpt else
      ("VPT baseline: one VPT configuration, KMnP/vpt "
       + ("configs/linear/cub.yaml over configs/base-linear.yaml (batch 1024"
          if method == "linear" else
          "configs/prompt/cub.yaml over configs/base-prompt.yaml (batch 128")
       + ", SGD 0.9, lr 0.1 @ 256, wd 0.01, 100 epochs with 10 warm-up, warm-up cosine; the "
       "LPT paper gives no VPT hyper-parameters), linear head + CE, instance-balanced "
       "sampling. Deliberately shared with LPT so the baseline is comparable: the AugReg "
       "IN-21k tower, LayerNorm eps 1e-5, mean = std = 0.5 and LPT's crops "
       "(RandomResizedCrop(224) + flip; square Resize(256) + CenterCrop(224)); VPT's own "
       "code uses the ViT-paper weights, eps 1e-6, ImageNet mean/std and "
       "Resize(256) + RandomCrop(224)."))

  m = ml_collections.ConfigDict()
  m.weights = ""              # timm .pth/.safetensors or AugReg/big_vision .npz
  m.tiny_random = False       # build a random tower from model.tiny instead of weights
  m.released_checkpoint = ""  # LPT: the authors' LPT_places.pth, evaluated by --stage eval
                              # instead of this workdir's checkpoints (model.weights unused)
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
  d.name = "places_lt"        # places_lt | cifar100_lt | inat2018 | list | synthetic
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
  # VPT: configs/base-prompt.yaml (128) and configs/base-linear.yaml (1024).
  d.batch_size = 256 if lpt else (1024 if method == "linear" else 128)
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
  ev.batch_size = 256                 # test / prediction images per batch
  ev.convention = "lpt"               # shot buckets: 'lpt' (few <= 20) or 'oltr' (few < 20)
  ev.stages = ("phase1", "phase2") if lpt else ("train",)  # finished stages to evaluate
  ev.fused = True                     # LPT: share the first blocks of the two passes
  ev.plots = True
  # 'last': the final checkpoint of each stage (default). 'best': the epoch with the best
  # overall accuracy on the evaluation split, checked after every epoch of training, as
  # DongSky/LPT keeps max-va.pth, selected on the Places-LT *test* list (so it is
  # optimistic); the run must be trained with it.
  ev.select = "last"
  ev.predict_dir = ""                 # folder of images: write predicted class ids
  ev.predict_output = ""              # default <workdir>/eval/<stage>/predictions.tsv
  c.eval = ev

  seed_ref, prec_ref, fsdp_ref = c.get_ref("seed"), c.get_ref("precision"), c.get_ref("fsdp")
  if lpt:
    for stage in ("phase1", "phase2"):
      s = lpt_stage_config(seed_ref, prec_ref, fsdp_ref)
      s.rules = tuple(PHASE1_RULES if stage == "phase1" else PHASE2_RULES)
      c[stage] = s
  else:
    # KMnP/vpt configs/{prompt,linear}/cub.yaml: BASE_LR 0.1, WEIGHT_DECAY 0.01.
    s = stage_config(epochs=100, lr=0.1 * d.batch_size / 256, weight_decay=0.01,
                     schedule="vpt_cosine", warmup_epochs=10, warmup_lr_init=0.0,
                     seed_ref=seed_ref, precision_ref=prec_ref, fsdp_ref=fsdp_ref)
    s.rules = tuple(BASELINE_RULES)
    c.train = s
  return c


def lpt_stage_config(seed_ref, precision_ref, fsdp_ref) -> ml_collections.ConfigDict:
  """DongSky/LPT train_dual_dualloss.py: SGD 0.9, lr 0.02 @ 256, wd 0.01, 90 epochs, timm
  cosine with one warm-up epoch at 1e-6 (both phases; the linear-balanced baseline)."""
  return stage_config(epochs=90, lr=0.02, weight_decay=0.01, schedule="lpt_cosine",
                      warmup_epochs=1, warmup_lr_init=1e-6, seed_ref=seed_ref,
                      precision_ref=precision_ref, fsdp_ref=fsdp_ref)


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (any row) shrunk to run in seconds: a tiny random ViT on the generated
  long-tailed set (`data.name='synthetic'`, 16x16 images), 8-image batches, 2 steps per
  stage. Method, sampling, head, loss and rules are kept; the prompt pool is shrunk to fit
  the 4-block tower."""
  c = config.copy_and_resolve_references()
  c.data.name, c.data.root = "synthetic", ""
  c.data.batch_size = 8
  c.eval.batch_size = 16
  c.data.workers = 2
  c.data.resize = 0
  c.model.tiny_random = True
  c.model.weights = ""
  c.model.image_size = 16
  c.model.prompt_length = 2
  c.model.pool_size = 4
  c.model.group_layers = 2
  c.eval.plots = False
  for name in stage_names(c.method):
    s = c[name]
    s.total_epochs = 2  # the per-epoch schedules need an epoch count; total_steps cuts it short
    s.total_steps = 2
    s.progress = False
    s.log_every_steps = 1
    s.ckpt_every_steps = 0
    s.async_checkpoints = False
  return c


def validate_config(config) -> None:
  """Types and values of the fields the LPT / VPT / linear pipelines read, each error naming
  its field (`launch.py` calls this before any work starts)."""
  v = validate
  v.one_of(config, "method", lpt_model.METHODS)
  v.one_of(config, "data.name", DATASETS, key=lambda d: parse_dataset(d)[0])
  v.existing_path(config, "data.root", kind="dir")
  for field in ("data.lists_dir",):
    v.existing_path(config, field, kind="dir")
  for field in ("data.train_file", "data.test_file", "model.weights",
                "model.released_checkpoint"):
    v.existing_path(config, field, kind="file")
  v.existing_path(config, "eval.predict_dir", kind="dir")
  v.one_of(config, "data.sampling", ("dual", "instance", "class_aware"))
  v.positive(config, "data.batch_size")
  v.positive(config, "eval.batch_size")
  v.positive(config, "data.num_samples_cls")
  v.integer(config, "data.workers", minimum=0)
  v.integer(config, "data.resize", minimum=0)
  v.sequence(config, "data.mean", length=3)
  v.sequence(config, "data.std", length=3)
  v.positive(config, "model.image_size")
  v.one_of(config, "model.head", lpt_model.HEADS)
  v.one_of(config, "model.prompt_init", ("trunc_normal", "vpt_uniform"))
  v.integer(config, "model.prompt_length", minimum=0)
  if config.method == "lpt":
    v.positive(config, "model.pool_size")
    v.positive(config, "model.group_layers")
    top_k = v.positive(config, "model.top_k")
    if top_k > int(config.model.pool_size):
      raise validate.ConfigError(f"model.top_k ({top_k}) must be at most model.pool_size "
                                 f"({config.model.pool_size})")
  v.one_of(config, "loss.kind", ("agcl", "ce"))
  v.one_of(config, "eval.convention", ("lpt", "oltr"))
  stages = stage_names(config.method)
  for stage in stages:
    v.stage_fields(config, stage)
    if not int(config[stage].total_epochs):
      raise validate.ConfigError(f"{stage}.total_epochs must be positive (the schedules are "
                                 "per epoch; total_steps only cuts a stage short)")
  for name in v.sequence(config, "eval.stages"):
    if name not in stages:
      raise validate.ConfigError(f"eval.stages: unknown stage {name!r}; the {config.method} "
                                 f"pipeline has {stages}")
  v.precision(config, "precision")
  v.integer(config, "seed")
