"""CLIP-ReID recipe: the base config, the per-row differences of the paper's tables, `tiny`.

Every row of Li et al., "CLIP-ReID" (AAAI 2023), Tables 2-3, is `paper_config(dataset,
backbone, variant)`; `configs/clipreid/<dataset>_<backbone>_<variant>.py` holds one each,
with its launch command and the paper's numbers. The recipe follows the authors' code
(Syliz517/CLIP-ReID configs/person/vit_clipreid.yml and its CNN, baseline and vehicle
counterparts).
"""
from __future__ import annotations

import ml_collections

from jaxprompt import trainer
from jaxprompt import validate

# Stage 1's default `rules` (see base_config): only the identity tokens train.
STAGE1_DEFAULT_RULES = [("prompt/cls_ctx", "train"), (".*", "freeze")]


VARIANTS = ("clipreid", "sie_olp", "baseline")


BACKBONES = ("vit_b16", "rn50")


DATASETS = ("market1501", "msmt17", "dukemtmc", "occ_duke", "veri", "vehicleid", "generic")


PERSON = ("market1501", "msmt17", "dukemtmc", "occ_duke")


def _stage(seed_ref, precision_ref, fsdp_ref, *, epochs: int, batch_size: int, lr: float,
           weight_decay: float) -> ml_collections.ConfigDict:
  s = trainer.stage_defaults()
  s.seed = seed_ref
  s.precision = precision_ref
  s.fsdp = fsdp_ref
  s.total_epochs = epochs
  s.optimizer.name = "adam"          # torch Adam: betas (0.9, 0.999), eps 1e-8
  s.optimizer.lr = lr
  s.optimizer.weight_decay = weight_decay
  s.optimizer.coupled_decay = True   # L2 added to the gradient, not AdamW
  del s.optimizer["warmup_steps"]    # the per-epoch `lr_schedule` has its own warm-up
  s.batch_size = batch_size
  return s


def base_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads, with the Market-1501 ViT-B/16 CLIP-ReID recipe.

  Top level:
    pipeline      'clipreid'
    variant       'clipreid' | 'sie_olp' | 'baseline' (no stage 1, no i2t loss)
    backbone      'vit_b16' | 'rn50' (picks normalisation constants and tower options)
    seed          1234 (the reference's SEED); every stage's seed follows it
    precision     'float32' | 'bfloat16' (compute dtype; params, optimizer and losses fp32)
    fsdp          0 data parallel; n: fsdp axis of n devices; -1: all devices
  data:
    name          dataset key: market1501 msmt17 dukemtmc occ_duke veri vehicleid generic
    root          folder holding the dataset (the reference's DATASETS.ROOT_DIR)
    size          [H, W] train = test input size (256x128 person, 256x256 vehicle)
    num_instances K of the P x K identity sampler (4)
    workers       decoding threads
    veri_keypoint_train / veri_keypoint_test  viewpoint files ('' = inside the VeRi folder)
    vehicleid_test_size  800 | 1600 | 2400;  vehicleid_trials  random gallery draws (10)
  model:
    weights       OpenAI/open_clip checkpoint (any file load_clip reads), or '' with
    tiny_random   True: a small CLIP built in code from `tiny` (tests, demos)
    tiny          seed (random init), vision 'vit'|'resnet', width, layers, heads,
                  patch_size, rn_layers, embed_dim, text_width, text_heads, text_layers
                  (context 77, full vocabulary)
    stride        ViT patch-embedding stride: 16, or 12 for OLP (ViT only)
    last_stride   ModifiedResNet layer4 stride (1, the ReID change; RN only)
    sie_camera / sie_view / sie_coe   SIE on the class token (ViT only), coefficient lambda
    sie_clamp     False: a camera/view index outside the SIE table is an error; True: it
                  uses the last row (only VehicleID SIE + OLP, whose test cameras the
                  training table cannot index)
    trained_params  a full params file (npz/safetensors with '/'-joined names, e.g. a
                  converted released checkpoint) used by 'eval' and 'extract' instead of
                  this workdir's stage-2 checkpoint; names may start with 'params/' and
                  'batch_stats/' (else all are params)
    released_checkpoint  one of the authors' released CLIP-ReID `.pth` state dicts,
                  evaluated by 'eval' / 'extract' in place of this workdir's checkpoints
                  (training stages refuse to run with it); the tower comes from the file,
                  built for data.size / stride / last_stride / SIE of this config, and
                  model.weights is not needed (only the image side is used)
  loss:
    id_weight (0.25 ViT, 1.0 RN / baseline), triplet_weight 1, i2t_weight 1,
    label_smoothing 0.1 (0 = plain CE; VehicleID RN and VehicleID baselines), margin 0.3
  stage1, stage2: `trainer.stage_defaults()` plus
    batch_size    global batch (stage 1: 64, 256 on VehicleID; stage 2: P*K = 64)
    lr_schedule   stage 1: timm cosine {warmup_t 5, warmup_lr_init 1e-5, lr_min 1e-6},
                  per epoch on the 1-based epoch (t_initial = total_epochs);
                  stage 2: warmup multistep {milestones, gamma 0.1, warmup_factor,
                  warmup_iters 10}, per epoch, 1-based
    rules         [(regex, 'freeze' | 'train' | {lr_mult, wd_mult})] over '/'-joined param
                  names, first full match wins (`optim.rules_from_config`). Stage 1: only
                  `prompt/cls_ctx` trains. Stage 2: text tower and identity tokens (and their
                  features) frozen, any name containing 'bias' at 2x lr (the reference's
                  SOLVER.BIAS_LR_FACTOR), the rest trains; weight decay on every trained leaf
  eval:
    batch_size 64; max_rank 50; rerank False with k1 50, k2 15, lambda_value 0.3 (the
    values the reference would use); block (queries per distance block); plots True;
    grid_queries, grid_topk (ranked-results figure)
  extract:
    images        folder of images to embed (recursive); out  output .npz (paths, features)
    source        'trained' (model.released_checkpoint or model.trained_params, else this
                  workdir's final stage 2) or
                  'pretrained' (the CLIP image tower before fine-tuning)
    camid, viewid SIE indices applied to every image (SIE models only)
    batch_size    images per jitted batch (rounded up to a multiple of the device count)
  """
  c = ml_collections.ConfigDict()
  c.pipeline = "clipreid"
  c.variant = "clipreid"
  c.backbone = "vit_b16"
  c.seed = 1234
  c.precision = "float32"
  c.fsdp = 0

  c.data = ml_collections.ConfigDict(dict(
      name="market1501", root="", size=(256, 128), num_instances=4, workers=8,
      veri_keypoint_train="", veri_keypoint_test="", vehicleid_test_size=800,
      vehicleid_trials=10))

  c.model = ml_collections.ConfigDict(dict(
      weights="", stride=16, last_stride=1, sie_camera=False, sie_view=False,
      sie_coe=3.0,
      sie_clamp=False,  # True: out-of-table SIE indices use the last row instead of raising
      trained_params="", released_checkpoint=""))
  c.model.tiny_random = False  # True: the small CLIP of `model.tiny` instead of weights
  c.model.tiny = ml_collections.ConfigDict(dict(
      seed=0, vision="vit", width=32, layers=2, heads=2, patch_size=8,
      rn_layers=[1, 1, 1, 1], embed_dim=32, text_width=32, text_heads=2, text_layers=1))

  c.loss = ml_collections.ConfigDict(dict(
      id_weight=0.25, triplet_weight=1.0, i2t_weight=1.0, label_smoothing=0.1, margin=0.3))

  seed, prec, fsdp = c.get_ref("seed"), c.get_ref("precision"), c.get_ref("fsdp")
  c.stage1 = _stage(seed, prec, fsdp, epochs=120, batch_size=64, lr=3.5e-4, weight_decay=1e-4)
  c.stage1.rules = tuple(STAGE1_DEFAULT_RULES)
  c.stage1.optimizer.schedule = "timm_cosine"
  c.stage1.lr_schedule = ml_collections.ConfigDict(dict(
      warmup_t=5, warmup_lr_init=1e-5, lr_min=1e-6))

  c.stage2 = _stage(seed, prec, fsdp, epochs=60, batch_size=64, lr=5e-6, weight_decay=1e-4)
  # The baseline has no `txt` / `cls_ctx`: the first two rules then match nothing.
  c.stage2.rules = (("txt/.*", "freeze"), ("prompt/(cls_ctx|text_feats)", "freeze"),
                    (".*bias.*", {"lr_mult": 2.0}), (".*", "train"))
  c.stage2.optimizer.schedule = "warmup_multistep"
  c.stage2.lr_schedule = ml_collections.ConfigDict(dict(
      milestones=(30, 50), gamma=0.1, warmup_factor=0.1, warmup_iters=10))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=64, max_rank=50, rerank=False, k1=50, k2=15, lambda_value=0.3, block=256,
      plots=True, grid_queries=8, grid_topk=10))
  c.extract = ml_collections.ConfigDict(dict(
      images="", out="", source="trained", camid=0, viewid=0, batch_size=64))
  return c


def _dataset_key(dataset: str) -> str:
  key = dataset.lower().replace("-", "").replace("_", "")
  aliases = {"market1501": "market1501", "market": "market1501", "msmt17": "msmt17",
             "dukemtmc": "dukemtmc", "dukemtmcreid": "dukemtmc", "occduke": "occ_duke",
             "occludedduke": "occ_duke", "veri": "veri", "veri776": "veri",
             "vehicleid": "vehicleid", "generic": "generic"}
  if key not in aliases:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
  return aliases[key]


def paper_config(dataset: str = "market1501", backbone: str = "vit_b16",
                 variant: str = "clipreid", root: str = "",
                 weights: str = "") -> ml_collections.ConfigDict:
  """The reference recipe for one (dataset, backbone, variant) row (Syliz517/CLIP-ReID
  configs/*/*_clipreid.yml and the baselines' configs).

  dataset: market1501 | msmt17 | dukemtmc | occ_duke | veri | vehicleid (VehicleID,
    'VeRi-776' etc. accepted); backbone: vit_b16 | rn50; variant: clipreid | sie_olp (ViT:
    camera SIE with lambda 1.0, plus view SIE on VeRi, patch stride 12) | baseline (image
    tower fine-tuned with ID + triplet only). `root` / `weights` fill data.root and
    model.weights (both can be set from the command line instead).
  """
  ds, bb = _dataset_key(dataset), backbone.lower().replace("-", "_").replace("/", "")
  bb = {"vitb16": "vit_b16", "vit_b_16": "vit_b16", "vit_b16": "vit_b16", "rn50": "rn50"}.get(bb, bb)
  if bb not in BACKBONES:
    raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  vit = bb == "vit_b16"
  if variant == "sie_olp" and not vit:
    raise ValueError("SIE + OLP is a ViT-B/16 recipe (SIE is never applied to RN50 and OLP is "
                     "a patch stride)")
  vehicle = ds in ("veri", "vehicleid")

  c = base_config()
  c.variant, c.backbone = variant, bb
  c.data.name, c.data.root = ds, root
  c.data.size = (256, 256) if vehicle else (256, 128)
  c.model.weights = weights

  # Stage 1 (SOLVER.STAGE1 of Syliz517/CLIP-ReID configs/*/*_clipreid.yml): 120 epochs for
  # person ViT, 60 otherwise; batch 256 on VehicleID.
  c.stage1.total_epochs = 120 if (vit and ds in PERSON) else 60
  c.stage1.batch_size = 256 if ds == "vehicleid" else 64

  # Stage 2 (SOLVER.STAGE2 of the same files) and the baseline (SOLVER of its configs).
  if vit:
    c.stage2.optimizer.lr = 5e-5 if ds == "vehicleid" else 5e-6
    c.stage2.total_epochs = 60
    c.stage2.optimizer.weight_decay = 1e-4
    c.stage2.lr_schedule.warmup_factor = 0.1
    c.stage2.lr_schedule.milestones = (30, 50)
    c.loss.id_weight = 1.0 if variant == "baseline" else 0.25
  else:
    c.stage2.optimizer.lr = 3.5e-4
    c.stage2.total_epochs = 120
    c.stage2.optimizer.weight_decay = 5e-4
    c.stage2.lr_schedule.warmup_factor = 0.01
    c.stage2.lr_schedule.milestones = (40, 70)
    c.loss.id_weight = 1.0
  # Label smoothing is off for VehicleID-CNN and for both VehicleID baselines.
  ls_off = ds == "vehicleid" and (not vit or variant == "baseline")
  c.loss.label_smoothing = 0.0 if ls_off else 0.1
  c.loss.i2t_weight = 0.0 if variant == "baseline" else 1.0

  if variant == "sie_olp":
    c.model.stride = 12
    c.model.sie_camera = True
    c.model.sie_view = ds == "veri"
    c.model.sie_coe = 1.0
    # VehicleID trains on camera 0 only and tests the gallery as camera 1, which the
    # reference's one-row table cannot index; clamping is the only runnable reading.
    c.model.sie_clamp = ds == "vehicleid"
  return c


def _is_vit(config) -> bool:
  return config.backbone.lower().startswith("vit")


def _baseline(config) -> bool:
  return config.variant == "baseline"


def _sie_on(config) -> bool:
  return bool(config.model.sie_camera or config.model.sie_view)


def _validate(config) -> None:
  if config.variant not in VARIANTS:
    raise ValueError(f"config.variant must be one of {VARIANTS}, got {config.variant!r}")
  if _sie_on(config) and not _is_vit(config):
    raise ValueError("SIE (model.sie_camera / sie_view) applies to ViT towers only; the "
                     "reference never feeds it to RN50")
  if config.model.released_checkpoint:
    if config.model.trained_params:
      raise ValueError("set only one of model.released_checkpoint and model.trained_params")
    return  # the tower comes from the released file
  if not config.model.weights and not config.model.tiny_random:
    raise ValueError("set model.weights to a CLIP checkpoint (e.g. ViT-B-16.pt / RN50.pt) "
                     "or model.tiny_random=True")


def tiny(config: ml_collections.ConfigDict, root: str) -> ml_collections.ConfigDict:
  """`config` (any row) shrunk to run in seconds: a tiny random CLIP of the row's backbone
  kind, 32x16 inputs, 8-image batches, 2 steps per stage, on a Market-1501-layout folder
  `root` (e.g. the one `jaxprompt.demo.reid_data.write_synthetic_market` generates).

  The recipe's structure (variant, stages, rules, losses, schedules, camera SIE) is kept;
  view SIE is dropped, since the generated set has no viewpoints.
  """
  c = config.copy_and_resolve_references()
  c.data.name, c.data.root = "market1501", root
  c.data.size = (32, 16)
  c.data.workers = 2
  c.data.num_instances = 2
  c.model.tiny_random = True
  t = c.model.tiny
  t.vision = "vit" if _is_vit(c) else "resnet"
  c.model.weights = ""
  c.model.stride = min(int(c.model.stride), 8)
  c.model.sie_view = False
  for s in (c.stage1, c.stage2):
    s.batch_size = 8
    s.total_steps = 2
    s.progress = False
    s.log_every_steps = 1
    s.ckpt_every_steps = 0
    s.async_checkpoints = False
  c.stage1.lr_schedule.warmup_t = 1
  c.stage2.lr_schedule.warmup_iters = 1
  c.eval.batch_size = 8
  c.eval.plots = False
  return c


def validate_config(config) -> None:
  """Types and values of the fields the pipeline reads, each error naming its field
  (`launch.py` calls this before any work starts)."""
  v = validate
  v.one_of(config, "variant", VARIANTS)
  v.one_of(config, "backbone", BACKBONES)
  v.one_of(config, "data.name", DATASETS, key=_dataset_key)
  v.existing_path(config, "data.root", kind="dir")
  v.size_hw(config, "data.size")
  v.positive(config, "data.num_instances")
  v.integer(config, "data.workers", minimum=0)
  for field in ("data.veri_keypoint_train", "data.veri_keypoint_test", "model.weights",
                "model.released_checkpoint", "model.trained_params"):
    v.existing_path(config, field, kind="file")
  v.positive(config, "model.stride")
  v.positive(config, "model.last_stride")
  v.number(config, "model.sie_coe")
  v.one_of(config, "model.tiny.vision", ("vit", "resnet"))
  v.precision(config, "precision")
  v.integer(config, "seed")
  for stage in (("stage2",) if _baseline(config) else ("stage1", "stage2")):
    v.stage_fields(config, stage, batch_size=True)
  if int(config.stage2.batch_size) % int(config.data.num_instances):
    raise validate.ConfigError(
        f"stage2.batch_size ({config.stage2.batch_size}) must be a multiple of "
        f"data.num_instances ({config.data.num_instances})")
  for field in ("loss.id_weight", "loss.triplet_weight", "loss.i2t_weight", "loss.margin"):
    v.number(config, field, minimum=0.0)
  if not 0.0 <= v.number(config, "loss.label_smoothing") < 1.0:
    raise validate.ConfigError(f"loss.label_smoothing must be in [0, 1), got "
                               f"{config.loss.label_smoothing}")
  v.positive(config, "eval.batch_size")
  v.positive(config, "eval.max_rank")
  v.positive(config, "extract.batch_size")
  v.one_of(config, "extract.source", ("trained", "pretrained"))
  _validate(config)
