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

Spec: /work/shared/specs/clipreid.md (sections 3, 4, 5, 9).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics as metrics_lib
from jaxprompt import optim
from jaxprompt import precision
from jaxprompt import schedules
from jaxprompt import sharding as shd
from jaxprompt import trainer
from jaxprompt.data import files as data_files
from jaxprompt.clipreid import data as reid_data
from jaxprompt.clipreid import transforms
from jaxprompt.data.loader import Loader
from jaxprompt.clipreid.samplers import IdentitySampler, RandomSampler
from jaxprompt.clipreid import losses as reid_losses
from jaxprompt.clipreid import model as clipreid
from jaxprompt.models.clip import CLIP, CLIPConfig, load_clip
from jaxprompt.optim import FREEZE, Rule
from jaxprompt.clipreid import evaluate as common

VARIANTS = ("clipreid", "sie_olp", "baseline")
BACKBONES = ("vit_b16", "rn50")
DATASETS = ("market1501", "msmt17", "dukemtmc", "occ_duke", "veri", "vehicleid", "generic")
PERSON = ("market1501", "msmt17", "dukemtmc", "occ_duke")

# ============================================================================ configuration


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
    clip_weights  OpenAI/open_clip checkpoint (any file load_clip reads), or '' with
    tiny_random   enabled=True: a small CLIP built in code, random init from `seed` (tests,
                  demos): vision 'vit'|'resnet', width, layers, heads, patch_size, rn_layers,
                  embed_dim, text_width, text_heads, text_layers (context 77, full vocabulary)
    stride        ViT patch-embedding stride: 16, or 12 for OLP (ViT only)
    last_stride   ModifiedResNet layer4 stride (1, the ReID change; RN only)
    sie_camera / sie_view / sie_coe   SIE on the class token (ViT only), coefficient lambda
    trained_params  a full params file (npz/safetensors with '/'-joined names, e.g. a
                  converted released checkpoint) used by 'eval' and 'extract' instead of
                  this workdir's stage-2 checkpoint; names may start with 'params/' and
                  'batch_stats/' (else all are params)
    released_checkpoint  one of the authors' released CLIP-ReID `.pth` state dicts,
                  evaluated by 'eval' / 'extract' in place of this workdir's checkpoints
                  (training stages refuse to run with it); the tower comes from the file,
                  built for data.size / stride / last_stride / SIE of this config, and
                  clip_weights is not needed (only the image side is used)
  loss:
    id_weight (0.25 ViT, 1.0 RN / baseline), triplet_weight 1, i2t_weight 1,
    label_smoothing 0.1 (0 = plain CE; VehicleID RN and VehicleID baselines), margin 0.3
  stage1, stage2: `trainer.stage_defaults()` plus
    batch_size    global batch (stage 1: 64, 256 on VehicleID; stage 2: P*K = 64)
    lr_schedule   stage 1: timm cosine {warmup_t 5, warmup_lr_init 1e-5, lr_min 1e-6},
                  per epoch on the 1-based epoch (t_initial = total_epochs);
                  stage 2: warmup multistep {milestones, gamma 0.1, warmup_factor,
                  warmup_iters 10}, per epoch, 1-based
    bias_lr_factor  stage 2: lr multiplier of every parameter whose name contains 'bias' (2)
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
      clip_weights="", stride=16, last_stride=1, sie_camera=False, sie_view=False,
      sie_coe=3.0, trained_params="", released_checkpoint=""))
  c.model.tiny_random = ml_collections.ConfigDict(dict(
      enabled=False, seed=0, vision="vit", width=32, layers=2, heads=2, patch_size=8,
      rn_layers=[1, 1, 1, 1], embed_dim=32, text_width=32, text_heads=2, text_layers=1))

  c.loss = ml_collections.ConfigDict(dict(
      id_weight=0.25, triplet_weight=1.0, i2t_weight=1.0, label_smoothing=0.1, margin=0.3))

  seed, prec, fsdp = c.get_ref("seed"), c.get_ref("precision"), c.get_ref("fsdp")
  c.stage1 = _stage(seed, prec, fsdp, epochs=120, batch_size=64, lr=3.5e-4, weight_decay=1e-4)
  c.stage1.optimizer.schedule = "timm_cosine"
  c.stage1.lr_schedule = ml_collections.ConfigDict(dict(
      warmup_t=5, warmup_lr_init=1e-5, lr_min=1e-6))

  c.stage2 = _stage(seed, prec, fsdp, epochs=60, batch_size=64, lr=5e-6, weight_decay=1e-4)
  c.stage2.optimizer.schedule = "warmup_multistep"
  c.stage2.lr_schedule = ml_collections.ConfigDict(dict(
      milestones=(30, 50), gamma=0.1, warmup_factor=0.1, warmup_iters=10))
  c.stage2.bias_lr_factor = 2.0

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
                 clip_weights: str = "") -> ml_collections.ConfigDict:
  """The reference recipe (spec 3.5, 4.7, 4.8) for one (dataset, backbone, variant) row.

  dataset: market1501 | msmt17 | dukemtmc | occ_duke | veri | vehicleid (VehicleID,
    'VeRi-776' etc. accepted); backbone: vit_b16 | rn50; variant: clipreid | sie_olp (ViT:
    camera SIE with lambda 1.0, plus view SIE on VeRi, patch stride 12) | baseline (image
    tower fine-tuned with ID + triplet only). `root` / `clip_weights` fill data.root and
    model.clip_weights (both can be set from the command line instead).
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
  c.model.clip_weights = clip_weights

  # Stage 1 (spec 3.5): 120 epochs for person ViT, 60 otherwise; batch 256 on VehicleID.
  c.stage1.total_epochs = 120 if (vit and ds in PERSON) else 60
  c.stage1.batch_size = 256 if ds == "vehicleid" else 64

  # Stage 2 (spec 4.7) and the baseline (spec 4.8).
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
  return c


# ============================================================================ the run context


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
  if not config.model.clip_weights and not config.model.tiny_random.enabled:
    raise ValueError("set model.clip_weights to a CLIP checkpoint (e.g. ViT-B-16.pt / RN50.pt) "
                     "or model.tiny_random.enabled=True")


def tiny_clip_config(config) -> CLIPConfig:
  """The small CLIP of `model.tiny_random`, built for `data.size` and the stride options."""
  t = config.model.tiny_random
  vit = t.vision == "vit"
  if vit != _is_vit(config):
    raise ValueError(f"model.tiny_random.vision={t.vision!r} does not match "
                     f"backbone={config.backbone!r}")
  base = CLIPConfig(
      embed_dim=t.embed_dim, vision="vit" if vit else "resnet", vision_width=t.width,
      vision_layers=t.layers if vit else tuple(t.rn_layers),
      vision_heads=t.heads if vit else max(1, 32 * t.width // 64),
      patch_size=t.patch_size if vit else 32, pretrained_grid=4, context_length=77,
      vocab_size=49408, text_width=t.text_width, text_heads=t.text_heads,
      text_layers=t.text_layers)
  if vit:
    return base.with_input(tuple(config.data.size), patch_stride=int(config.model.stride))
  return base.with_input(tuple(config.data.size), last_stride=int(config.model.last_stride))


def load_backbone(config) -> tuple[CLIP, dict]:
  """(CLIP model, host variables) from `model.clip_weights` or `model.tiny_random`."""
  dtype = precision.compute_dtype(config.precision)
  if config.model.clip_weights:
    kw = (dict(patch_stride=int(config.model.stride)) if _is_vit(config)
          else dict(last_stride=int(config.model.last_stride)))
    model, variables = load_clip(config.model.clip_weights, image_size=tuple(config.data.size),
                                 dtype=dtype, **kw)
    if (model.config.vision == "vit") != _is_vit(config):
      raise ValueError(f"{config.model.clip_weights} holds a {model.config.vision} image tower "
                       f"but backbone={config.backbone!r}")
    return model, jax.device_get(variables)
  cfg = tiny_clip_config(config)
  model = CLIP(cfg, dtype=dtype)
  h, w = cfg.input_size

  @jax.jit
  def init(rng):
    return model.init(rng, jnp.zeros((1, h, w, 3)), jnp.zeros((1, 77), jnp.int32))

  variables = jax.device_get(init(jax.random.key(int(config.model.tiny_random.seed))))
  return model, {k: dict(v) for k, v in variables.items()}


def _strides_fitting(rows: int, size, patch: int) -> list[int]:
  """Patch strides whose token grid at `size` has `rows - 1` tokens."""
  h, w = size
  if h < patch or w < patch:
    return []
  return [s for s in range(patch, 0, -1)
          if ((h - patch) // s + 1) * ((w - patch) // s + 1) + 1 == rows]


def load_released(config) -> tuple[CLIP, dict, dict]:
  """(CLIP model, host variables, converter info) from `model.released_checkpoint`.

  The tower is built for this config (data.size, model.stride / last_stride); a file
  that does not fit raises a ValueError naming the config field to change. Variables:
  {'params': {'img', 'prompt'?, 'head'} (no text tower), 'batch_stats': {'img'?, 'head'}}.
  """
  # pylint: disable=import-outside-toplevel
  from jaxprompt.clipreid import released as clipreid_ckpt
  from jaxprompt.convert.io import WeightMismatchError, read_arrays
  path = config.model.released_checkpoint
  size = tuple(int(s) for s in config.data.size)
  sd = {(k[7:] if k.startswith("module.") else k): v for k, v in read_arrays(path).items()}
  vit = _is_vit(config)
  if "image_encoder.proj" in sd or "image_encoder.attnpool.positional_embedding" in sd:
    file_vit = "image_encoder.proj" in sd
    if file_vit != vit:
      raise ValueError(f"{path} holds a {'ViT' if file_vit else 'ResNet'} image encoder but "
                       f"backbone={config.backbone!r}: set backbone="
                       f"{'vit_b16' if file_vit else 'rn50'!r}")
  kw = (dict(patch_stride=int(config.model.stride)) if vit
        else dict(last_stride=int(config.model.last_stride)))
  try:
    model, params, state, info = clipreid_ckpt.convert(sd, image_size=size, **kw)
  except WeightMismatchError as e:
    if "positional_embedding  model" not in str(e):
      raise  # not a grid mismatch: the converter's diff says what is wrong
    if vit:
      rows = int(sd["image_encoder.positional_embedding"].shape[0])
      patch = int(sd["image_encoder.conv1.weight"].shape[-1])
      fits = _strides_fitting(rows, size, patch)
      hint = (f"set model.stride={fits[0]}" if len(fits) == 1 else
              f"set model.stride to the checkpoint's MODEL.STRIDE_SIZE (one of {fits})" if fits
              else f"no patch stride fits data.size={list(size)}: set data.size to the "
                   "checkpoint's INPUT.SIZE_TRAIN")
      raise ValueError(
          f"{path}: its position embedding ({rows - 1} patches) does not fit model.stride="
          f"{config.model.stride} at data.size={list(size)}; {hint}") from None
    raise ValueError(
        f"{path}: its attention-pool grid does not fit data.size={list(size)} with "
        f"model.last_stride={config.model.last_stride}; set model.last_stride (CLIP-ReID "
        "trains with 1) or data.size to the checkpoint's INPUT.SIZE_TRAIN") from None
  model = CLIP(info["config"], dtype=precision.compute_dtype(config.precision))
  # Evaluation and extraction use the image side only; the text tower (whose token table is
  # mostly unknown without clip_weights) would just hold host memory.
  params = {k: v for k, v in params.items() if k != "txt"}
  variables = {"params": jax.device_get(params),
               "batch_stats": jax.device_get(state["batch_stats"])}
  for note in info["notes"]:
    logging.info("released checkpoint: %s", note)
  logging.info("released checkpoint %s: %s %s, %d identities, grid %s, SIE rows %d", path,
               info["kind"], info["backbone"], info["num_ids"], info["grid"], info["sie_rows"])
  return model, variables, info


@dataclasses.dataclass
class SIESpec:
  """How camera/view indices become SIE rows (static; shapes come from the data)."""
  camera: bool
  view: bool
  coefficient: float
  num_views: int

  @property
  def on(self) -> bool:
    return self.camera or self.view

  def vectors(self, table, camid, viewid):
    if not self.on or table is None:
      return None
    idx = clipreid.sie_index(camid, jnp.maximum(viewid, 0), self.num_views, self.camera,
                             self.view)
    # Out-of-range indices (e.g. VehicleID's gallery camera 1) clamp to the last row.
    return self.coefficient * table[jnp.clip(idx, 0, table.shape[0] - 1)]


class Context:
  """Lazily loaded pieces shared by the stages of one run (dataset, CLIP, mesh, jits)."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self._dataset = None
    self._clip = None
    self.released_info: Optional[dict] = None
    self._embed = {}
    c = config.stage2
    self.mesh = shd.make_mesh([tuple(a) for a in c.mesh] if c.mesh
                              else shd.mesh_axes(int(c.fsdp or 0)))
    self.mean, self.std = transforms.norm_constants(config.backbone)
    self.size = tuple(int(s) for s in config.data.size)

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)

  @property
  def dataset(self) -> reid_data.ReIDDataset:
    if self._dataset is None:
      d = self.config.data
      if not d.root:
        raise ValueError("set data.root to the dataset folder")
      name = _dataset_key(d.name)
      kw = {}
      if name == "veri":
        kw = dict(keypoint_train=d.veri_keypoint_train or None,
                  keypoint_test=d.veri_keypoint_test or None)
      elif name == "vehicleid":
        kw = dict(test_size=int(d.vehicleid_test_size), seed=int(self.config.seed))
      self._dataset = reid_data.build_reid_dataset(name, d.root, **kw)
      summary = self._dataset.summary()
      logging.info("\n%s", summary)
      if jax.process_index() == 0:
        print(summary, flush=True)
    return self._dataset

  @property
  def clip(self) -> tuple[CLIP, dict]:
    if self._clip is None:
      if self.config.model.released_checkpoint:
        model, variables, self.released_info = load_released(self.config)
        self._clip = (model, variables)
      else:
        self._clip = load_backbone(self.config)
    return self._clip

  def clip_source(self) -> str:
    m = self.config.model
    return (m.released_checkpoint or m.clip_weights
            or f"tiny_random(seed={m.tiny_random.seed})")

  def sie_spec(self, num_views: Optional[int] = None) -> SIESpec:
    m = self.config.model
    if num_views is None:
      num_views = self.dataset.num_train_views if (m.sie_camera and m.sie_view) else 1
    return SIESpec(bool(m.sie_camera), bool(m.sie_view), float(m.sie_coe), int(num_views))

  def decode(self, train: bool):
    return transforms.make_reid_decode(train, self.size, self.mean, self.std)

  def embed_fn(self, kind: str, sie: SIESpec, batch_size: int) -> common.BatchedApply:
    """Jitted batched image embedding: kind 'test' (eval embedding) or 'proj' (stage 1)."""
    key = (kind, dataclasses.astuple(sie), batch_size)
    if key not in self._embed:
      model, _ = self.clip

      def fn(v, batch):
        variables = {"params": {"img": v["img"]}}
        if v.get("batch_stats") is not None:
          variables["batch_stats"] = {"img": v["batch_stats"]}
        cv = sie.vectors(v.get("sie"), batch["camid"], batch["viewid"])
        feats = model.apply(variables, batch["image"], cv, False, method="image_features")
        return clipreid.test_embedding(feats) if kind == "test" else feats["proj"]

      self._embed[key] = common.BatchedApply(fn, self.mesh, batch_size,
                                             workers=int(self.config.data.workers))
    return self._embed[key]


# ============================================================================ stage 1

STAGE1_RULES = [("prompt/cls_ctx", Rule()), (".*", FREEZE)]


def _save_cache(path: str, **arrays: np.ndarray) -> None:
  """Atomic `.npz` of cached features, from process 0 (a killed run never leaves half a file)."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def stage1_cache(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
  """(features (n, D), labels (n,)) of the pretrained tower on every train image.

  Test transform, eval-mode BN, no SIE (spec 3.1). Computed once, kept in
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
  feats = fn(fn.place(v), ds.train, ctx.decode(False)).astype(np.float32)
  _save_cache(path, features=feats, pids=pids, paths=paths)
  return feats, pids


def make_stage1_loss_fn(model: CLIP, prompt: clipreid.TextPrompt):
  """SupCon(image -> text) + SupCon(text -> image), tau 1, raw features (spec 3.3)."""

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

  s = cfg.lr_schedule
  epoch_fn = functools.partial(schedules.timm_cosine, base_lr=float(cfg.optimizer.lr),
                               t_initial=int(cfg.total_epochs), lr_min=float(s.lr_min),
                               warmup_t=int(s.warmup_t), warmup_lr_init=float(s.warmup_lr_init))
  return trainer.run_stage(
      cfg, workdir=ctx.workdir, stage="stage1", init=init,
      loss_fn=make_stage1_loss_fn(model, prompt), rules=STAGE1_RULES, loader=loader,
      make_tx=_make_tx(cfg, epoch_fn, loader), frozen_source=ctx.clip_source())


def _make_tx(cfg, epoch_fn, loader):
  """Adam with coupled L2 and a per-epoch lr (1-based epochs, switched at epoch starts)."""
  opt = cfg.optimizer

  def make_tx(trainable, rules, total_steps):
    lr = common.epoch_schedule(epoch_fn, loader, total_steps, first_epoch=1)
    tx = optim.make_optimizer(trainable, rules, name=opt.name, learning_rate=lr,
                              weight_decay=float(opt.weight_decay),
                              coupled_decay=bool(opt.coupled_decay),
                              **dict(opt.get("hparams", {}) or {}))
    return tx, lr

  return make_tx


# ============================================================================ stage 2


def stage2_rules(config) -> list[tuple[str, Rule]]:
  """Text tower and identity tokens (and their features) frozen; any name containing
  'bias' at `bias_lr_factor` x lr; everything else (image tower, SIE, heads) trains.
  Weight decay applies to every trained parameter (spec 4.4)."""
  rules = []
  if not _baseline(config):
    rules += [("txt/.*", FREEZE), ("prompt/(cls_ctx|text_feats)", FREEZE)]
  rules += [(".*bias.*", Rule(lr_mult=float(config.stage2.bias_lr_factor))), (".*", Rule())]
  return rules


def make_stage2_loss_fn(model: CLIP, head: nn.Module, config, sie: SIESpec):
  """ID (label-smoothed CE, summed over both classifiers) x weight + triplet over the three
  pre-BN features + i2t CE on raw proj @ text_feats.T (spec 4.3)."""
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
  out = [np.asarray(fn(txt, tokens[i:i + chunk])) for i in range(0, len(tokens), chunk)]
  return np.concatenate(out)[:n].astype(np.float32)


def _check_identities(ctx: Context, num_ids: int) -> None:
  """Refuse a stage-1 checkpoint trained on other identities (spec 8, issue #14)."""
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

  def init(rng):
    r_head, r_sie = jax.random.split(rng)
    hv = jax.device_get(jax.jit(head.init, static_argnames="train")(
        r_head, jnp.zeros((2, dims["final"])), jnp.zeros((2, dims["proj"])), train=False))
    params = {"img": variables["params"]["img"], "head": hv["params"]}
    stats = {"head": hv["batch_stats"]}
    if "batch_stats" in variables:
      stats["img"] = variables["batch_stats"]["img"]
    prompt = {}
    if not baseline:
      # Stage 1's identity tokens, checked against the data, and their frozen text features.
      trained, _ = ckpt_lib.read_params(ctx.workdir, "stage1")
      cls_ctx = np.asarray(trained["prompt"]["cls_ctx"])
      _check_identities(ctx, cls_ctx.shape[0])
      prompt["cls_ctx"] = cls_ctx
      prompt["text_feats"] = stage2_text_cache(ctx, cls_ctx)
      params["txt"] = variables["params"]["txt"]
    if sie.on:
      rows = clipreid.sie_rows(ds.num_train_cams, sie.num_views, sie.camera, sie.view)
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
  s = cfg.lr_schedule
  epoch_fn = functools.partial(schedules.warmup_multistep, base_lr=float(cfg.optimizer.lr),
                               milestones=list(s.milestones), gamma=float(s.gamma),
                               warmup_factor=float(s.warmup_factor),
                               warmup_iters=int(s.warmup_iters))
  source = ctx.clip_source() + ("" if baseline else " + stage1")
  return trainer.run_stage(
      cfg, workdir=ctx.workdir, stage="stage2", init=init,
      loss_fn=make_stage2_loss_fn(model, head, config, sie), rules=stage2_rules(config),
      loader=loader, make_tx=_make_tx(cfg, epoch_fn, loader), frozen_source=source)


def stage2_text_cache(ctx: Context, cls_ctx: np.ndarray) -> np.ndarray:
  """Text features of all identities from stage 1's tokens; cached next to stage 2."""
  path = os.path.join(ctx.stage_dir("stage2"), "text_features.npz")
  if os.path.isfile(path):
    with np.load(path) as f:
      if np.array_equal(f["cls_ctx"], cls_ctx):
        return f["features"]
  model, variables = ctx.clip
  prompt = clipreid.build_text_prompt(model, {"params": {"txt": variables["params"]["txt"]}},
                                      clipreid.template_for(ctx.dataset.name))
  feats = text_features_all(model, variables["params"]["txt"], prompt, cls_ctx,
                            chunk=int(ctx.config.stage2.batch_size))
  _save_cache(path, features=feats, cls_ctx=cls_ctx)
  return feats


# ============================================================================ evaluation


def read_trained_params_file(path: str) -> tuple[dict, dict]:
  """(params, model_state) from a full params file ('params/...' and 'batch_stats/...')."""
  from jaxprompt.convert.io import read_arrays, unflatten
  flat = read_arrays(path)
  if any(k.startswith(("params/", "batch_stats/")) for k in flat):
    tree = unflatten(flat)
    return tree.get("params", {}), ({"batch_stats": tree["batch_stats"]}
                                    if "batch_stats" in tree else {})
  return unflatten(flat), {}


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
  fn = ctx.embed_fn("test", ctx.sie_spec(), int(e.batch_size))
  v = fn.place(v)
  decode = ctx.decode(False)
  opts = dict(max_rank=int(e.max_rank), rerank=bool(e.rerank), k1=int(e.k1), k2=int(e.k2),
              lambda_value=float(e.lambda_value), block=int(e.block),
              grid_queries=int(e.grid_queries), grid_topk=int(e.grid_topk))
  label = f"{config.variant} {config.backbone} {ds.name}"
  result = {"key": key, "weights": origin, "dataset": ds.name}
  if _dataset_key(config.data.name) == "vehicleid":
    # Every trial splits the same test images: embed them once, index per trial.
    trials = reid_data.vehicleid_trials(config.data.root, int(config.data.vehicleid_test_size),
                                        int(config.seed), int(config.data.vehicleid_trials))
    records = trials[0][0] + trials[0][1]
    feats = fn(v, records, decode)
    row = {r.path: i for i, r in enumerate(records)}
    per_trial = []
    for t, (q, g) in enumerate(trials):
      qf = feats[[row[r.path] for r in q]]
      gf = feats[[row[r.path] for r in g]]
      res = common.evaluate_split(qf, gf, q, g, plot_dir=out_dir if (t == 0 and e.plots) else None,
                                  label=label, **opts)
      per_trial.append(res)
    for k in ("mAP", "R1", "R5", "R10"):
      result[k] = float(np.mean([r[k] for r in per_trial]))
    result["trials"] = [{k: r[k] for k in ("mAP", "R1", "R5", "R10")} for r in per_trial]
    result["cmc"] = per_trial[0]["cmc"]
  else:
    records = ds.query + ds.gallery
    feats = fn(v, records, decode)
    nq = len(ds.query)
    res = common.evaluate_split(feats[:nq], feats[nq:], ds.query, ds.gallery,
                                plot_dir=out_dir if e.plots else None, label=label, **opts)
    result.update(res)
  common.log_results(f"eval {label}{' (re-ranked)' if e.rerank else ''}", result)
  metrics_lib.write_json(results_path, result)
  return result


# ============================================================================ extraction


def run_extract(ctx: Context) -> dict:
  """Embeddings of every image under `extract.images` -> npz {paths, features}."""
  x = ctx.config.extract
  if not x.images or not x.out:
    raise ValueError("set extract.images (a folder) and extract.out (an .npz file)")
  paths = data_files.list_images(x.images)
  released = bool(ctx.config.model.released_checkpoint)
  if x.source == "pretrained" and released:
    raise ValueError("extract.source='pretrained' embeds with the CLIP tower before "
                     "fine-tuning: unset model.released_checkpoint and set model.clip_weights, "
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
  fn = ctx.embed_fn("test", sie, int(x.batch_size))
  feats = fn(fn.place(v), records, ctx.decode(False))
  if jax.process_index() == 0:
    out = os.path.expanduser(x.out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, paths=np.asarray(paths), features=feats.astype(np.float32))
  msg = f"extract: {len(paths)} embeddings ({feats.shape[1]}-d) from {origin} -> {x.out}"
  logging.info("%s", msg)
  print(msg, flush=True)
  return {"num_images": len(paths), "dim": int(feats.shape[1]), "out": x.out, "weights": origin}


# ============================================================================ the driver


def stages_of(config) -> tuple[str, ...]:
  return ("stage2", "eval") if _baseline(config) else ("stage1", "stage2", "eval")


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
